"""A kind node this machine can run: API server, pod network, S3, the process kubelet; ``helm install``.

Everything binds the pod network's bridge (no uplink) or a pod's own namespace. moto's S3
server stands in for the chart's MinIO (its Service resolves to moto); every other object the
chart renders is applied, and every pod runs as a process: the operator Deployment, the MinIO
bucket hook Job, and then whatever the operator creates. Pods reach the API server through a
kubeconfig (the stand-in for the mounted service-account token).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import site
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import aiohttp
import boto3
import kmock
import yaml
from moto.server import ThreadedMotoServer

from apiserver import KINDS, Api, ApiServer, write_kubeconfig
from images import ROOT
from kubelet import Kubelet
from podnet import PodNetwork, reap_abandoned, service_names

sys.path.insert(0, str(ROOT / "tests" / "deploy"))
from deploy_support import CHART, Helm, objects_of, profile_values  # noqa: E402

NAMESPACE, RELEASE = "djinn", "djinn-bench"
S3_PORT = 9000  # the chart's MinIO Service port
STATE_DIR = Path("/var/tmp")  # the node's files: hosts, kubeconfig, pod home directories


def hooks(obj: dict) -> set[str]:
    """Helm hook phases of an object (empty for an ordinary release object)."""
    value = ((obj.get("metadata") or {}).get("annotations") or {}).get("helm.sh/hook", "")
    return {h.strip() for h in value.split(",") if h.strip()}


def replaced_by_moto(obj: dict) -> bool:
    """The chart's MinIO server itself; its Secret, Service and bucket Job stay."""
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return obj["kind"] == "Deployment" and labels.get("app.kubernetes.io/component") == "minio"


@dataclass
class Cluster:
    server: ApiServer
    api: Api
    net: PodNetwork
    kubelet: Kubelet
    s3_endpoint: str
    log_dir: Path

    credentials: Optional[dict[str, str]] = None  # the chart's MinIO Secret, once installed

    def s3(self) -> Any:
        """boto3 against the S3 the pods use, with the chart's MinIO credentials."""
        return boto3.client("s3", endpoint_url=self.s3_endpoint, region_name="us-east-1",
                            aws_access_key_id=self.credentials["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.credentials["AWS_SECRET_ACCESS_KEY"])

    async def helm(self, action: str, **overrides: Any) -> list[dict]:
        """``helm <install|upgrade> djinn-bench charts/djinn-bench -n djinn -f values-kind.yaml --set ... --wait``.

        CRDs first (install), then every release object, then --wait for the Deployments, then the
        post-install / post-upgrade hook Jobs (a previous one deleted first: before-hook-creation).
        """
        objs = objects_of(Helm().render(profile_values("kind", **overrides), name=RELEASE, namespace=NAMESPACE))
        if action == "install":
            for crd in sorted((CHART / "crds").glob("*.yaml")):
                await self.api.apply(yaml.safe_load(crd.read_text()))
        for obj in objs:
            if not hooks(obj) and not replaced_by_moto(obj):
                await self.api.apply(obj)
        secret = next(o for o in objs if o["kind"] == "Secret" and "AWS_ACCESS_KEY_ID" in o.get("stringData", {}))
        self.credentials = secret["stringData"]
        for dep in [o for o in objs if o["kind"] == "Deployment" and not replaced_by_moto(o)]:
            await self.wait(f"Deployment {dep['metadata']['name']} ready", lambda d=dep: self.ready(d), 120)
        for hook in [o for o in objs if f"post-{action}" in hooks(o) and o["kind"] == "Job"]:
            await self.api.delete("Job", NAMESPACE, hook["metadata"]["name"])
            await self.wait("the previous hook Job gone", lambda h=hook: self.gone("Job", h), 30)
            await self.api.create(hook)
            await self.wait(f"hook Job {hook['metadata']['name']}", lambda h=hook: self.job_done(h), 120)
        return objs

    async def kind_up(self, **spec: Any) -> tuple[str, dict]:
        """What scripts/kind-up.sh does: install, then upgrade with the example on (``spec`` overrides
        fields of values-kind.yaml's example spec); returns the example's name and spec as applied."""
        await self.helm("install")
        objs = await self.helm("upgrade", example={"enabled": True, **({"spec": spec} if spec else {})})
        cr = next(o for o in objs if o["kind"] == "AgentScalingExperiment")
        return cr["metadata"]["name"], cr["spec"]

    async def gone(self, kind: str, obj: dict) -> bool:
        return await self.api.get(kind, NAMESPACE, obj["metadata"]["name"]) is None

    async def ready(self, dep: dict) -> bool:
        got = await self.api.get("Deployment", NAMESPACE, dep["metadata"]["name"])
        return bool(got and (got.get("status") or {}).get("readyReplicas"))

    async def job_done(self, job: dict) -> bool:
        got = await self.api.get("Job", NAMESPACE, job["metadata"]["name"])
        conds = {c["type"]: c for c in ((got or {}).get("status") or {}).get("conditions") or []}
        if "Failed" in conds:
            raise AssertionError(f"Job {job['metadata']['name']} failed: {conds['Failed']}\n{self.logs('')[-3000:]}")
        return "Complete" in conds

    async def wait(self, what: str, check: Callable[[], Awaitable[Any]], timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.kubelet.errors:
                raise AssertionError(f"kubelet failed: {self.kubelet.errors}")
            if result := await check():
                return result
            await asyncio.sleep(0.25)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")

    async def experiment(self, name: str) -> dict:
        return await self.api.get("AgentScalingExperiment", NAMESPACE, name) or {}

    async def wait_phase(self, name: str, phases: tuple[str, ...], timeout: float) -> dict:
        async def check() -> Optional[dict]:
            st = (await self.experiment(name)).get("status") or {}
            return st if st.get("phase") in phases else None
        return await self.wait(f"{name} in {phases}", check, timeout)

    def created(self, kind: str) -> list[str]:
        """Names of every object of ``kind`` created through the API, in order (repeats included)."""
        plural = KINDS[kind][1]
        return [(r.data or {}).get("metadata", {}).get("name") for r in self.server
                if r.resource is not None and r.resource.plural == plural and str(r.method.value) == "POST"]

    def logs(self, prefix: str) -> str:
        """Every pod log whose pod name starts with ``prefix``, oldest first."""
        files = sorted(self.log_dir.glob(f"{NAMESPACE}_{prefix}*.log"), key=lambda p: p.stat().st_mtime)
        return "".join(f"==> {p.name}\n{p.read_text(errors='replace')}" for p in files)


@contextlib.asynccontextmanager
async def kind_node(log_dir: Path) -> AsyncIterator[Cluster]:
    """Bring the node up; on exit every pod stops and the network goes."""
    logging.getLogger("kubelet").setLevel(logging.INFO)
    reap_abandoned(STATE_DIR)
    root = Path(tempfile.mkdtemp(prefix="djinn-cluster-", dir=STATE_DIR))
    net = PodNetwork(root, keep=paths_under_tmp()).up()
    moto = ThreadedMotoServer(ip_address=net.node_ip, port=S3_PORT, verbose=False)
    minio = (NAMESPACE, f"{RELEASE}-minio")
    # MinIO serves path-style under its Service name; moto needs to be told that host is not a bucket
    before = os.environ.get("MOTO_S3_CUSTOM_ENDPOINTS")
    os.environ["MOTO_S3_CUSTOM_ENDPOINTS"] = ",".join(f"http://{n}:{S3_PORT}" for n in service_names(*minio[::-1]))
    try:
        moto.start()
        async with ApiServer() as k, kmock.Server(k, host=net.node_ip) as srv, aiohttp.ClientSession() as http:
            url = str(srv.url).rstrip("/")
            kubeconfig = write_kubeconfig(root / "kubeconfig", url)
            api = Api(url, http)
            # what every pod gets besides its manifest: the API server (for the service-account token) and
            # the install the tests run from (a scratch copy on PYTHONPATH runs in the pods too)
            pod_env = {"KUBECONFIG": str(kubeconfig),
                       **({"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else {})}
            kubelet = Kubelet(api, net, log_dir, pod_env, {minio: net.node_ip})
            kubelet_task = asyncio.create_task(kubelet.run())
            cluster = Cluster(k, api, net, kubelet, f"http://{net.node_ip}:{S3_PORT}", log_dir)
            try:
                yield cluster
            finally:
                kubelet_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await kubelet_task
                await kubelet.shutdown()
    finally:
        moto.stop()
        net.down()
        shutil.rmtree(root, ignore_errors=True)
        os.environ.pop("MOTO_S3_CUSTOM_ENDPOINTS")
        if before is not None:
            os.environ["MOTO_S3_CUSTOM_ENDPOINTS"] = before


def paths_under_tmp() -> tuple[str, ...]:
    """What pods run from that lives under /tmp (a checkout, a virtualenv, PYTHONPATH entries), outermost first."""
    candidates = {str(ROOT), sys.prefix, sys.base_prefix, *site.getsitepackages(),
                  *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))}
    under = sorted(os.path.realpath(p) for p in candidates if os.path.realpath(p).startswith("/tmp/"))
    return tuple(p for i, p in enumerate(under) if not any(p.startswith(q + "/") for q in under[:i]))


def outside_env(cluster: Cluster) -> dict[str, str]:
    """A shell on the user's machine pointed at the cluster's S3 (``djinn-bench analyze --input s3://...``)."""
    return {**os.environ, **{k: cluster.credentials[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")},
            "AWS_DEFAULT_REGION": "us-east-1"}
