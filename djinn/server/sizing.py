"""Djinn server flags sized from an experiment spec.

The local runner and the operator both start a server for an experiment; both take its
flags from here, so a spec that runs locally is admitted the same way on Kubernetes.
"""
from __future__ import annotations

from dataclasses import replace

from djinn.server.config import ServerConfig
from djinn.spec import ExperimentSpec

MIN_CONCURRENT = 64  # the server's own default: the decode modes and small runs never need more


def largest_agent_count(spec: ExperimentSpec) -> int:
    """The most agents that will talk to the server at once (djinn_agents swept up to its cap included)."""
    return max(max(spec.agent_counts), spec.djinn_sweep_cap or 0)


def max_concurrent(spec: ExperimentSpec) -> int:
    """Each agent keeps one request in flight; twice that leaves room for a request a dropped
    client left behind while its retry arrives, so admission never refuses the experiment itself."""
    return max(MIN_CONCURRENT, 2 * largest_agent_count(spec))


def idle_allowance_s(spec: ExperimentSpec) -> float:
    """How long an agent's session and connection may sit idle: its Act phase (sleepSeconds, up to an
    hour) twice over, plus a minute, and never less than the server's defaults."""
    return 2 * spec.sleep_seconds + 60


def server_config(spec: ExperimentSpec, **overrides) -> ServerConfig:
    """The server ``spec`` needs: its model, admission for every agent, sessions and connections that
    outlive the Act phase. The local runner starts it as is; the operator overrides placement."""
    base = ServerConfig()
    idle = idle_allowance_s(spec)
    config = ServerConfig(model_id=spec.model_id, weights=spec.weights, dtype=spec.dtype, device=spec.device,
                          seed=spec.seed, max_concurrent=max_concurrent(spec),
                          session_ttl_s=max(base.session_ttl_s, idle), idle_timeout_s=max(base.idle_timeout_s, idle))
    return replace(config, **overrides)
