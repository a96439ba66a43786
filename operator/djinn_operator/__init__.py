"""Kubernetes operator (kopf) for the ``AgentScalingExperiment`` custom resource."""
