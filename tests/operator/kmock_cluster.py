"""End-to-end harness: the real operator (``python -m djinn_operator``) against the cluster tests' API
server (kmock's KubernetesEmulator plus server-side metadata) and moto S3, all on 127.0.0.1.

kmock has no controllers, so ``Kubelet`` plays them: it writes each run's result document
to S3 with boto3 and then marks the Job Complete (or Failed), and reports the Djinn server
and the Ray head ready.
"""
from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import aiohttp
import kmock

from djinn.results import ResultDocument, result_key
from djinn.spec import API_VERSION, KIND

sys.path.insert(0, str(Path(__file__).parents[1] / "cluster"))
from apiserver import KINDS, MERGE, ApiServer, write_kubeconfig  # noqa: E402

BUCKET, PREFIX, NS = "djinn-results", "exp", "lab"
RECONCILE_SECONDS = "0.5"  # the operator's periodic reconcile, fast for the tests (default 15 s)


@dataclass
class Kubelet:
    """Finishes Jobs by ``outcomes[job]``: ok (default), oom, fail, missing (no result), hold (leave running).
    Deployments and RayClusters get ready unless named in ``unready``."""

    h: "Harness"
    outcomes: dict[str, str] = field(default_factory=dict)
    unready: set[str] = field(default_factory=set)
    most_active: int = 0

    async def tick(self) -> None:
        jobs = await self.h.list("Job")
        active = [j for j in jobs if not (j.get("status") or {}).get("conditions")]
        self.most_active = max(self.most_active, len(active))
        for job in active:
            name = job["metadata"]["name"]
            outcome = self.outcomes.get(name, "ok")
            if outcome == "hold":
                continue
            if outcome in ("ok", "oom") and job["metadata"]["labels"].get("djinn.io/component") == "run":
                await asyncio.to_thread(self.write_result, job, outcome == "oom")
            cond = ({"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                     "message": "Job has reached the specified backoff limit"} if outcome == "fail"
                    else {"type": "Complete", "status": "True"})
            await self.h.patch("Job", name, {"status": {"conditions": [cond], "succeeded": int(outcome != "fail")}},
                               status=True)
        for dep in await self.h.list("Deployment"):
            if not (dep.get("status") or {}).get("readyReplicas") and dep["metadata"]["name"] not in self.unready:
                await self.h.patch("Deployment", dep["metadata"]["name"], {"status": {"readyReplicas": 1}}, status=True)
        for rc in await self.h.list("RayCluster"):
            if rc["metadata"]["name"] in self.unready:
                continue
            state = "suspended" if rc["spec"].get("suspend") else "ready"
            if (rc.get("status") or {}).get("state") != state:
                await self.h.patch("RayCluster", rc["metadata"]["name"], {"status": {"state": state}}, status=True)

    def write_result(self, job: dict, oom: bool) -> None:
        labels, owner = job["metadata"]["labels"], job["metadata"]["ownerReferences"][0]["name"]
        n = int(labels["djinn.io/agents"]) if "djinn.io/agents" in labels else None
        doc = ResultDocument(baseline=labels["djinn.io/baseline"], model_id="sshleifer/tiny-gpt2",
                             experiment="decode" if n is None else "agent_scaling", prompt_tokens=72,
                             new_tokens=50, n_agents=n, oom=oom, error="CUDA out of memory" if oom else None)
        key = f"{PREFIX}/{NS}/{owner}/{result_key(doc.baseline, n)}"
        self.h.s3.put_object(Bucket=BUCKET, Key=key, Body=doc.model_dump_json().encode())

    async def run(self) -> None:
        while True:
            await self.tick()
            await asyncio.sleep(0.05)


@dataclass
class Harness:
    k: ApiServer
    url: str
    http: aiohttp.ClientSession
    s3: Any
    log_path: str
    operator: Optional[asyncio.subprocess.Process] = None
    kubelet: Optional[Kubelet] = None
    kubelet_task: Optional[asyncio.Task] = None

    async def start_operator(self) -> None:
        """A separate process: kopf owns its event loop (it cancels every task it did not start)."""
        with open(self.log_path, "ab") as log:
            self.operator = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "djinn_operator", stdout=log, stderr=log,
                env={**os.environ, "DJINN_RECONCILE_SECONDS": RECONCILE_SECONDS})

    async def stop_operator(self, kill: bool = False) -> None:
        """SIGTERM (graceful) or SIGKILL (a crash)."""
        if kill:
            self.operator.kill()
        else:
            self.operator.terminate()
        await asyncio.wait_for(self.operator.wait(), 15)

    def start_kubelet(self, outcomes: Optional[dict[str, str]] = None) -> Kubelet:
        self.kubelet = Kubelet(self, dict(outcomes or {}))
        self.kubelet_task = asyncio.create_task(self.kubelet.run())
        return self.kubelet

    def _url(self, kind: str, name: str = "", status: bool = False, ns: str = NS) -> str:
        path, plural, _, _ = KINDS[kind]
        return f"{self.url}/{path}/namespaces/{ns}/{plural}" + (f"/{name}" if name else "") + \
            ("/status" if status else "")

    async def list(self, kind: str) -> list[dict]:
        async with self.http.get(self._url(kind)) as r:
            return (await r.json())["items"]

    async def get(self, kind: str, name: str) -> Optional[dict]:
        async with self.http.get(self._url(kind, name)) as r:
            return await r.json() if r.status == 200 else None

    async def patch(self, kind: str, name: str, body: dict, status: bool = False) -> None:
        async with self.http.patch(self._url(kind, name, status), json=body, headers=MERGE) as r:
            assert r.status == 200, await r.text()

    async def k8s_create(self, obj: dict) -> dict:
        async with self.http.post(self._url(obj["kind"], ns=obj["metadata"]["namespace"]), json=obj) as r:
            assert r.status in (200, 201), await r.text()
            return await r.json()

    async def create_experiment(self, name: str, spec: dict) -> dict:
        """The stored object: the API server set its uid, generation and creationTimestamp."""
        body = {"apiVersion": API_VERSION, "kind": KIND, "spec": spec, "metadata": {"name": name, "namespace": NS}}
        async with self.http.post(self._url(KIND), json=body) as r:
            assert r.status in (200, 201), await r.text()
            return await r.json()

    async def events(self, name: str) -> list[tuple[str, str, str]]:
        """(type, reason, message) of the Events about experiment ``name``, in order."""
        return [(e["type"], e["reason"], e["message"]) for e in await self.list("Event")
                if e["involvedObject"]["kind"] == KIND and e["involvedObject"]["name"] == name]

    async def wait_events(self, name: str, check: Callable[[list], Any], timeout: float = 10) -> list[tuple[str, str, str]]:
        """The Events about ``name`` once ``check(events)`` holds: kopf posts Events from a background queue,
        so they can land after the status patch that a test has just seen."""
        async def ready():
            events = await self.events(name)
            return events if check(events) else None
        return await self.wait(f"Events of {name}", ready, timeout)

    async def delete(self, kind: str, name: str) -> None:
        async with self.http.delete(self._url(kind, name)) as r:
            assert r.status == 200, await r.text()

    async def status(self, name: str) -> dict:
        return (await self.get(KIND, name) or {}).get("status") or {}

    async def wait(self, what: str, check: Callable[[], Awaitable[Any]], timeout: float = 20) -> Any:
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            if result := await check():
                return result
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")

    async def wait_phase(self, name: str, *phases: str, timeout: float = 20) -> dict:
        async def check():
            st = await self.status(name)
            return st if st.get("phase") in phases else None
        return await self.wait(f"{name} in {phases}", check, timeout)

    def writes(self) -> list[tuple[str, str, str, Optional[str], Optional[str], Any]]:
        """(who, method, plural, name, subresource, body) of every write in order; who: operator or kubelet."""
        return [("kubelet" if r.headers.get("User-Agent") == "kubelet" else "operator", str(r.method.value),
                 r.resource.plural, r.name or (r.data or {}).get("metadata", {}).get("name"), r.subresource, r.data)
                for r in self.k if r.resource is not None and str(r.method.value) in ("POST", "PATCH", "DELETE")]

    def created(self, plural: str) -> list[str]:
        return [name for who, m, p, name, _, _ in self.writes() if who == "operator" and m == "POST" and p == plural]


async def session(s3, tmp_path, monkeypatch, scenario) -> None:
    """A fresh emulator, a kubeconfig pointing at it, the operator process; then ``scenario(harness)``."""
    async with ApiServer() as k, kmock.Server(k) as srv:
        url = str(srv.url).rstrip("/")
        monkeypatch.setenv("KUBECONFIG", write_kubeconfig(tmp_path / "kubeconfig", url, NS))
        async with aiohttp.ClientSession(headers={"User-Agent": "kubelet"}) as http:
            h = Harness(k=k, url=url, http=http, s3=s3, log_path=str(tmp_path / "operator.log"))
            await h.start_operator()
            try:
                await scenario(h)
            except BaseException:
                print((tmp_path / "operator.log").read_text()[-6000:])
                raise
            finally:
                if h.kubelet_task:
                    h.kubelet_task.cancel()
                if h.operator.returncode is None:
                    await h.stop_operator(kill=True)


def experiment_spec(s3_endpoint: str, **kw) -> dict:
    return {"output": {"uri": f"s3://{BUCKET}/{PREFIX}", "endpointUrl": s3_endpoint},
            "cluster": {"image": "djinn-bench:test"}, **kw}
