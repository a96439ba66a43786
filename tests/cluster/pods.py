"""A pod as the kubelet runs it: the container's command and args, its resolved env, its probes.

The container runs as a process tree in the pod's network namespace (podnet.py) with the
image's environment (images.py) under the manifest's own env, ``valueFrom`` and ``envFrom``
resolved from the API like the kubelet does; a Secret or ConfigMap that is missing keeps the
pod from starting (CreateContainerConfigError), an image no Dockerfile builds fails as a pull.
"""
from __future__ import annotations

import asyncio
import re
import secrets
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import aiohttp

from apiserver import Api, secret_value
from images import Image, resolve
from podnet import PodNetwork

IP = shutil.which("ip") or "ip"
_FIELD = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


class PodConfigError(RuntimeError):
    """The pod cannot start yet (a Secret, ConfigMap or key it needs is missing)."""


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) references: defined names are replaced, $$ escapes, others stay."""
    return re.sub(r"\$\$|\$\((\w+)\)", lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


@dataclass
class PodMeta:
    name: str
    namespace: str
    labels: dict[str, str]
    annotations: dict[str, str]
    uid: str = field(default_factory=lambda: secrets.token_hex(8))


def _field_ref(path: str, meta: PodMeta, spec: dict, ip: str) -> str:
    simple = {"metadata.name": meta.name, "metadata.namespace": meta.namespace, "metadata.uid": meta.uid,
              "spec.serviceAccountName": spec.get("serviceAccountName", "default"), "spec.nodeName": "kind-worker",
              "status.podIP": ip, "status.hostIP": ip}
    if path in simple:
        return simple[path]
    m = _FIELD.match(path)
    if m:
        return (meta.labels if m.group(1) == "labels" else meta.annotations).get(m.group(2), "")
    raise PodConfigError(f"fieldRef {path!r} is not supported by the Kubernetes downward API")


async def _source(api: Api, kind: str, namespace: str, ref: dict) -> Optional[dict[str, str]]:
    obj = await api.get(kind, namespace, ref["name"])
    if obj is None:
        if ref.get("optional"):
            return None
        raise PodConfigError(f'{kind.lower()} "{ref["name"]}" not found')
    if kind == "Secret":
        return {k: secret_value(obj, k) for k in obj.get("data") or {}}
    return dict(obj.get("data") or {})


async def container_env(api: Api, image: Image, meta: PodMeta, spec: dict, container: dict, ip: str
                        ) -> dict[str, str]:
    """The image's ENV, then envFrom, then env (later wins), as the kubelet assembles it."""
    env = dict(image.env)
    env["HOSTNAME"] = meta.name
    for source in container.get("envFrom") or []:
        kind, ref = ("Secret", source["secretRef"]) if "secretRef" in source else ("ConfigMap", source["configMapRef"])
        for key, value in ((await _source(api, kind, meta.namespace, ref)) or {}).items():
            env[source.get("prefix", "") + key] = value
    for var in container.get("env") or []:
        if "valueFrom" not in var:
            env[var["name"]] = expand(var.get("value", ""), env)
            continue
        src = var["valueFrom"]
        if "fieldRef" in src:
            env[var["name"]] = _field_ref(src["fieldRef"]["fieldPath"], meta, spec, ip)
            continue
        kind, ref = ("Secret", src["secretKeyRef"]) if "secretKeyRef" in src else ("ConfigMap", src["configMapKeyRef"])
        values = await _source(api, kind, meta.namespace, ref)
        if values is None:
            continue
        if ref["key"] not in values:
            if ref.get("optional"):
                continue
            raise PodConfigError(f'couldn\'t find key {ref["key"]} in {kind} {meta.namespace}/{ref["name"]}')
        env[var["name"]] = values[ref["key"]]
    return env


def container_argv(image: Image, container: dict, env: dict[str, str]) -> list[str]:
    """command/args over the image's ENTRYPOINT/CMD, with $(VAR) expanded."""
    command, args = container.get("command"), container.get("args")
    argv = (command or image.entrypoint) + (args if args is not None else ([] if command else image.cmd))
    if not argv:
        raise PodConfigError("no command specified")
    return [expand(a, env) for a in argv]


class Pod:
    """One pod with a single container; ``start`` raises PodConfigError / ImagePullError like the kubelet reports."""

    def __init__(self, net: PodNetwork, api: Api, meta: PodMeta, spec: dict, log_dir: Path,
                 extra_env: Optional[dict[str, str]] = None):
        containers = spec.get("containers") or []
        if len(containers) != 1:
            raise PodConfigError(f"pod {meta.name}: the process kubelet runs one container, got {len(containers)}")
        self.net, self.api, self.meta, self.spec, self.container = net, api, meta, spec, containers[0]
        self.extra_env = extra_env or {}
        self.log_path = log_dir / f"{meta.namespace}_{meta.name}.log"
        self.netns, self.ip = "", ""
        self.proc: Optional[asyncio.subprocess.Process] = None
        self.restarts = 0

    @property
    def grace_s(self) -> float:
        return float(self.spec.get("terminationGracePeriodSeconds", 30))

    async def start(self) -> None:
        """(Re)start the container; the pod keeps its network namespace and IP across restarts."""
        home = self.net.root / "pods" / self.meta.name
        image = resolve(self.container["image"], str(home))
        if not self.netns:
            self.netns, self.ip = await asyncio.to_thread(self.net.add_pod)
        env = await container_env(self.api, image, self.meta, self.spec, self.container, self.ip)
        env.update(self.extra_env)
        argv = container_argv(image, self.container, env)
        workdir = self.container.get("workingDir") or image.workdir
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {' '.join(argv)[:300]}\n".encode())
            self.proc = await asyncio.create_subprocess_exec(
                IP, *self.net.argv(self.netns, workdir, argv)[1:], env=env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=log, start_new_session=True)

    @property
    def exit_code(self) -> Optional[int]:
        return None if self.proc is None else self.proc.returncode

    async def kill_container(self, grace_s: Optional[float] = None) -> None:
        """SIGTERM every process of the pod, SIGKILL what is left after the grace period."""
        if not self.netns:
            return
        grace = self.grace_s if grace_s is None else grace_s
        await asyncio.to_thread(self.net.signal_pod, self.netns, signal.SIGTERM)
        if self.proc is not None:
            try:
                await asyncio.wait_for(self.proc.wait(), grace)
            except asyncio.TimeoutError:
                pass
        await asyncio.to_thread(self.net.signal_pod, self.netns, signal.SIGKILL)
        if self.proc is not None:
            await self.proc.wait()

    async def reap(self) -> None:
        """The container exited: nothing of it outlives its main process (the runtime kills the cgroup)."""
        await asyncio.to_thread(self.net.signal_pod, self.netns, signal.SIGKILL)

    async def delete(self, grace_s: Optional[float] = None) -> None:
        await self.kill_container(grace_s)
        if self.netns:
            await asyncio.to_thread(self.net.remove_pod, self.netns)
            self.netns = ""

    def port(self, port: Any) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for p in self.container.get("ports") or []:
            if p.get("name") == port:
                return int(p["containerPort"])
        raise PodConfigError(f"probe port {port!r} is not a named port of the container")

    async def check(self, probe: dict, http: aiohttp.ClientSession) -> bool:
        """One httpGet or tcpSocket probe against the pod IP, as the kubelet sends it from the node."""
        timeout = float(probe.get("timeoutSeconds", 1))
        try:
            if "httpGet" in probe:
                get = probe["httpGet"]
                url = f"http://{self.ip}:{self.port(get['port'])}{get.get('path', '/')}"
                async with http.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                    return 200 <= r.status < 400
            if "tcpSocket" in probe:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.ip, self.port(probe["tcpSocket"]["port"])), timeout)
                writer.close()
                return True
        except (OSError, asyncio.TimeoutError, aiohttp.ClientError):
            return False
        raise PodConfigError(f"probe {sorted(probe)} is not supported by the process kubelet")

    async def exec_in_pod(self, argv: list[str], timeout: float) -> int:
        """Run a command in the pod's network namespace (KubeRay's exec probes run inside the pod)."""
        proc = await asyncio.create_subprocess_exec(IP, "netns", "exec", self.netns, *argv,
                                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            return await asyncio.wait_for(proc.wait(), timeout)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            return -1

