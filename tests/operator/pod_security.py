"""Pod Security Standards, profile ``restricted`` (Kubernetes 1.30), as the admission plugin checks a pod
template; plus the operator's own rule that every container has CPU and memory requests."""
from __future__ import annotations

ALLOWED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                   "projected", "secret"}


def violations(pod: dict) -> list[str]:
    """What a namespace enforcing ``restricted`` would refuse in this pod spec (empty: admitted)."""
    out = [f"{k}: true" for k in ("hostNetwork", "hostPID", "hostIPC") if pod.get(k)]
    psc = pod.get("securityContext") or {}
    for v in pod.get("volumes") or []:
        kinds = set(v) - {"name"}
        if not kinds <= ALLOWED_VOLUMES:
            out.append(f"volume {v['name']}: {sorted(kinds - ALLOWED_VOLUMES)}")
    containers = (pod.get("initContainers") or []) + pod["containers"]
    for c in containers:
        sc, name = c.get("securityContext") or {}, c["name"]
        if sc.get("privileged"):
            out.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation != false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{name}: capabilities.drop lacks ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            out.append(f"{name}: capabilities.add {caps['add']}")
        if not (sc.get("runAsNonRoot", psc.get("runAsNonRoot"))):
            out.append(f"{name}: runAsNonRoot != true")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            out.append(f"{name}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccompProfile {seccomp}")
        if any(p.get("hostPort") for p in c.get("ports") or []):
            out.append(f"{name}: hostPort")
        requests = (c.get("resources") or {}).get("requests") or {}
        if not {"cpu", "memory"} <= set(requests):
            out.append(f"{name}: requests {sorted(requests)} (cpu and memory wanted)")
    return out


def pod_spec(obj: dict) -> dict:
    """The pod template of a Deployment, Job or RayCluster head."""
    if obj["kind"] == "RayCluster":
        return obj["spec"]["headGroupSpec"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]
