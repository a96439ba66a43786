"""What the KubeRay operator (v1.4) does to a RayCluster's head pod before it runs.

From ray-operator/controllers/ray/common/pod.go: the Ray container's command is replaced by
``ulimit -n 65536; ray start --head <rayStartParams> --block`` run by ``/bin/bash -c`` (a user
command is kept in front, joined by ``&&``) unless it already holds ``ray start`` or the pod
carries ``ray.io/overwrite-container-cmd: "true"``; missing params are filled in (dashboard-host,
metrics-export-port, dashboard-agent-listen-port, num-cpus / memory / num-gpus from the
container's resources); env and labels are added; the head Service ``<cluster>-head-svc`` is
created; the head is ready when its injected probe (the dashboard agent's raylet health and the
dashboard's GCS health both answering ``success``) passes.
"""
from __future__ import annotations

import copy
import math
import shlex
import sys
from typing import Any

from djinn.spec import parse_quantity

HEAD_PORTS = {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "metrics": 8080, "serve": 8000}
DASHBOARD_AGENT_PORT = 52365
# KubeRay's probe is `wget -T 2 -q -O- http://localhost:<port>/<path> | grep success` for both paths, run in the pod.
PROBE = ("import urllib.request\n"
         "for port, path in ((52365, 'api/local_raylet_healthz'), (8265, 'api/gcs_healthz')):\n"
         "    body = urllib.request.urlopen(f'http://localhost:{port}/{path}', timeout=2).read()\n"
         "    assert b'success' in body\n")
PROBE_ARGV = [sys.executable, "-c", PROBE]


def head_service_name(cluster: str) -> str:
    return f"{cluster}-head-svc"


def head_labels(cluster: str) -> dict[str, str]:
    return {"ray.io/cluster": cluster, "ray.io/node-type": "head", "ray.io/group": "headgroup",
            "ray.io/identifier": f"{cluster}-head", "app.kubernetes.io/created-by": "kuberay-operator"}


def _params(params: dict[str, str], resources: dict[str, Any]) -> dict[str, str]:
    p = {"dashboard-host": "0.0.0.0", **params, "block": "true"}
    p.setdefault("metrics-export-port", str(HEAD_PORTS["metrics"]))
    p.setdefault("dashboard-agent-listen-port", str(DASHBOARD_AGENT_PORT))
    limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
    cpu = limits.get("cpu") or requests.get("cpu")
    if "num-cpus" not in p and cpu:
        cpu = str(cpu)  # Quantity.Value() rounds up: 500m -> 1
        p["num-cpus"] = str(math.ceil(float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)))
    if "memory" not in p and limits.get("memory"):
        p["memory"] = str(parse_quantity(limits["memory"]))
    if "num-gpus" not in p and limits.get("nvidia.com/gpu"):
        p["num-gpus"] = str(limits["nvidia.com/gpu"])
    return p


def ray_start_command(params: dict[str, str], resources: dict[str, Any]) -> str:
    flags = "".join(f" --{k} " if v.lower() == "true" else "" if v.lower() == "false" else f" --{k}={v} "
                    for k, v in sorted(_params(params, resources).items()))
    return f"ray start --head {flags}"


def _field(name: str, path: str) -> dict:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def head_pod(cluster: dict) -> tuple[dict, dict]:
    """(pod metadata, pod spec) of the head as KubeRay builds it from headGroupSpec.template."""
    name = cluster["metadata"]["name"]
    group = cluster["spec"]["headGroupSpec"]
    template = copy.deepcopy(group["template"])
    meta, spec = template.get("metadata") or {}, template["spec"]
    meta["labels"] = {**(meta.get("labels") or {}), **head_labels(name)}
    ray = spec["containers"][0]
    start = ray_start_command(group.get("rayStartParams") or {}, ray.get("resources") or {})
    user = " ".join(shlex.quote(a) for a in (ray.get("command") or []) + (ray.get("args") or []))
    overwrite = (meta.get("annotations") or {}).get("ray.io/overwrite-container-cmd", "").lower() == "true"
    if not overwrite and "ray start" not in user:
        generated = f"ulimit -n 65536; {start}"
        ray["command"] = ["/bin/bash", "-c", "--"]
        ray["args"] = [f"{user} && {generated}" if user else generated]
    ray["env"] = [*(ray.get("env") or []),
                  _field("RAY_CLUSTER_NAME", "metadata.labels['ray.io/cluster']"),
                  _field("RAY_CLOUD_INSTANCE_ID", "metadata.name"),
                  _field("RAY_NODE_TYPE_NAME", "metadata.labels['ray.io/group']"),
                  {"name": "KUBERAY_GEN_RAY_START_CMD", "value": start},
                  {"name": "RAY_PORT", "value": "6379"},
                  {"name": "RAY_ADDRESS", "value": "127.0.0.1:6379"},
                  {"name": "RAY_USAGE_STATS_KUBERAY_IN_USE", "value": "1"},
                  {"name": "RAY_DASHBOARD_ENABLE_K8S_DISK_USAGE", "value": "1"}]
    return meta, spec


def head_service(cluster: dict) -> dict:
    meta = cluster["metadata"]
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": head_service_name(meta["name"]), "namespace": meta["namespace"],
                         "labels": head_labels(meta["name"]),
                         "ownerReferences": [{"apiVersion": "ray.io/v1", "kind": "RayCluster", "name": meta["name"],
                                              "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}]},
            "spec": {"selector": {"ray.io/cluster": meta["name"], "ray.io/node-type": "head"},
                     "ports": [{"name": n, "port": p, "targetPort": p} for n, p in HEAD_PORTS.items()]}}


def status(cluster: dict, ready: bool, pod_ip: str, pod_name: str, now: str) -> dict:
    """KubeRay's status: ``state`` plus the HeadPodReady / RayClusterProvisioned conditions."""
    if cluster["spec"].get("suspend"):
        return {"state": "suspended", "conditions": [
            {"type": "RayClusterSuspended", "status": "True", "reason": "RayClusterSuspended",
             "lastTransitionTime": now}]}
    cond = "True" if ready else "False"
    out: dict[str, Any] = {"conditions": [
        {"type": "HeadPodReady", "status": cond, "reason": "HeadPodRunningAndReady" if ready else "HeadPodNotReady",
         "lastTransitionTime": now},
        {"type": "RayClusterProvisioned", "status": cond,
         "reason": "AllPodRunningAndReadyFirstTime" if ready else "RayClusterPodsProvisioning",
         "lastTransitionTime": now}],
        "desiredWorkerReplicas": 0, "readyWorkerReplicas": 0, "availableWorkerReplicas": 0}
    if ready:
        out["state"] = "ready"
        out["head"] = {"podIP": pod_ip, "podName": pod_name, "serviceIP": pod_ip}
    return out
