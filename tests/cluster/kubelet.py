"""The process kubelet and the controllers a kind cluster runs, reporting status as they do.

- Deployment (one replica): a pod restarted when its container exits (restartPolicy Always,
  CrashLoopBackOff delays), ready only once the manifest's readinessProbe passes against the
  process; a livenessProbe that fails ``failureThreshold`` times restarts it; status with
  readyReplicas, Available and Progressing (ProgressDeadlineExceeded after progressDeadlineSeconds).
- Job: one pod at a time; exit 0 -> Complete; a failure re-runs it after the Job controller's
  back-off until ``backoffLimit`` failures are exceeded (Failed, BackoffLimitExceeded);
  ``activeDeadlineSeconds`` kills it (Failed, DeadlineExceeded); ``suspend`` stops it.
- RayCluster: KubeRay's head pod and head Service (kuberay.py); ``suspend`` stops the head.
- Service: its DNS names resolve to a ready pod its selector matches (the node, which refuses,
  when none is), or to a fixed address the harness gives (moto in place of MinIO).
- Garbage collector: an object whose every owner (by uid) is gone is deleted; a deleted
  object's pods get SIGTERM, then SIGKILL after their grace period.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import aiohttp

import kuberay
from apiserver import Api, owner_uids
from images import ImagePullError
from podnet import PodNetwork, service_names
from pods import Pod, PodConfigError, PodMeta

log = logging.getLogger("kubelet")
OWNED = ("Job", "Deployment", "Service", "RayCluster")  # what the garbage collector looks at
CRASH_BACKOFF_S, CRASH_BACKOFF_MAX_S = 10.0, 300.0
JOB_BACKOFF_S = 10.0  # the Job controller's: 10 s, doubled after each failure


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def key_of(obj: dict) -> tuple[str, str, str]:
    m = obj["metadata"]
    return m.get("namespace", ""), m["name"], m.get("uid", "")


@dataclass
class Probe:
    """Consecutive results of one probe, judged with its thresholds."""

    spec: dict
    started: float = field(default_factory=time.monotonic)
    next_at: float = 0.0
    successes: int = 0
    failures: int = 0

    def due(self, now: float) -> bool:
        return now >= max(self.next_at, self.started + float(self.spec.get("initialDelaySeconds", 0)))

    def record(self, ok: bool, now: float) -> None:
        self.next_at = now + float(self.spec.get("periodSeconds", 10))
        self.successes, self.failures = (self.successes + 1, 0) if ok else (0, self.failures + 1)

    @property
    def passing(self) -> bool:
        return self.successes >= int(self.spec.get("successThreshold", 1))

    @property
    def failed(self) -> bool:
        return self.failures >= int(self.spec.get("failureThreshold", 3))


@dataclass
class Replica:
    """A restartPolicy-Always pod: restarts with CrashLoopBackOff, readiness, liveness."""

    pod: Pod
    ready_check: Any  # async (Replica) -> bool
    readiness: Optional[Probe] = None
    liveness: Optional[Probe] = None
    next_start: float = 0.0
    ready: bool = False
    waiting: str = ""  # why the container is not running (CreateContainerConfigError, ...)
    progress_at: float = field(default_factory=time.monotonic)  # the Deployment's last progress


@dataclass
class JobRun:
    pod: Optional[Pod] = None
    attempts: int = 0  # pods started
    failed: int = 0
    succeeded: int = 0
    start_time: Optional[str] = None
    started: float = 0.0
    next_start: float = 0.0
    done: bool = False


class Kubelet:
    def __init__(self, api: Api, net: PodNetwork, log_dir: Path, pod_env: dict[str, str],
                 fixed_services: dict[tuple[str, str], str]):
        self.api, self.net, self.log_dir, self.pod_env = api, net, log_dir, pod_env
        self.fixed_services = fixed_services
        self.replicas: dict[tuple[str, str, str, str], Replica] = {}  # (kind, ns, name, uid)
        self.jobs: dict[tuple[str, str, str], JobRun] = {}
        self.status_cache: dict[tuple[str, str, str, str], dict] = {}
        self.http: Optional[aiohttp.ClientSession] = None
        self.errors: list[str] = []

    # -- the loop ---------------------------------------------------------------------
    async def run(self, period_s: float = 0.3) -> None:
        async with aiohttp.ClientSession() as self.http:
            while True:
                try:
                    await self.tick()
                except Exception as exc:  # a harness bug must be seen, not hang the scenario
                    log.exception("kubelet tick failed")
                    self.errors.append(repr(exc))
                await asyncio.sleep(period_s)

    async def tick(self) -> None:
        objs = {kind: await self.api.list(kind) for kind in (*OWNED, "AgentScalingExperiment")}
        await self.collect_garbage(objs)
        live = {kind: {key_of(o): o for o in objs[kind] if not o["metadata"].get("deletionTimestamp")}
                for kind in OWNED}
        for dep in live["Deployment"].values():
            await self.sync_deployment(dep)
        for rc in live["RayCluster"].values():
            await self.sync_raycluster(rc)
        for job in live["Job"].values():
            await self.sync_job(job)
        await self.forget(live)
        self.sync_dns(objs["Service"])

    async def collect_garbage(self, objs: dict[str, list[dict]]) -> None:
        uids = {o["metadata"].get("uid") for items in objs.values() for o in items}
        for kind in OWNED:
            for obj in objs[kind]:
                refs = owner_uids(obj)
                if refs and not any(u in uids for u in refs):
                    log.info("gc: deleting %s %s (owner gone)", kind, obj["metadata"]["name"])
                    await self.api.delete(kind, obj["metadata"]["namespace"], obj["metadata"]["name"])

    async def forget(self, live: dict[str, dict]) -> None:
        """Pods of objects that are gone (deleted, garbage-collected) stop; they are listed until they have."""
        for key in [k for k in self.replicas if k[1:] not in live[k[0]]]:
            await self.replicas[key].pod.delete()
            del self.replicas[key]
        for key in [k for k in self.jobs if k not in live["Job"]]:
            if self.jobs[key].pod:
                await self.jobs[key].pod.delete()
            del self.jobs[key]

    async def shutdown(self) -> None:
        for replica in self.replicas.values():
            await replica.pod.delete(grace_s=5)
        for run in self.jobs.values():
            if run.pod:
                await run.pod.delete(grace_s=5)
        self.replicas.clear()
        self.jobs.clear()

    def pods(self) -> list[Pod]:
        return [r.pod for r in self.replicas.values()] + [j.pod for j in self.jobs.values() if j.pod]

    # -- pods -------------------------------------------------------------------------
    def new_pod(self, obj: dict, template: dict, suffix: str, extra_labels: Optional[dict] = None) -> Pod:
        meta = template.get("metadata") or {}
        pod_meta = PodMeta(name=f"{obj['metadata']['name']}-{suffix}{secrets.token_hex(3)[:5]}",
                           namespace=obj["metadata"]["namespace"],
                           labels={**(meta.get("labels") or {}), **(extra_labels or {})},
                           annotations=dict(meta.get("annotations") or {}))
        spec = template["spec"]
        no_token = spec.get("automountServiceAccountToken") is False
        env = {k: v for k, v in self.pod_env.items() if not (no_token and k == "KUBECONFIG")}
        return Pod(self.net, self.api, pod_meta, spec, self.log_dir, extra_env=env)

    async def _start(self, pod: Pod) -> str:
        """'' when started, else the waiting reason the kubelet would report."""
        try:
            await pod.start()
            return ""
        except ImagePullError as exc:
            return f"ErrImagePull: {exc}"
        except PodConfigError as exc:
            return f"CreateContainerConfigError: {exc}"

    async def sync_replica(self, r: Replica) -> None:
        now = time.monotonic()
        code = r.pod.exit_code
        if code is not None:
            await r.pod.reap()
            r.pod.restarts += 1
            r.pod.proc = None
            r.ready = False
            # the first restart is immediate, then 10 s doubling up to 5 min (CrashLoopBackOff)
            delay = 0.0 if r.pod.restarts == 1 else min(CRASH_BACKOFF_S * 2 ** (r.pod.restarts - 2),
                                                         CRASH_BACKOFF_MAX_S)
            r.next_start = now + delay
            log.info("%s exited with %s; restart %d in %.0f s", r.pod.meta.name, code, r.pod.restarts, delay)
        if r.pod.proc is None:
            if now < r.next_start:
                return
            r.waiting = await self._start(r.pod)
            if r.waiting:
                r.next_start = now + CRASH_BACKOFF_S
                return
            probes = r.pod.container
            r.readiness = Probe(probes["readinessProbe"]) if probes.get("readinessProbe") else None
            r.liveness = Probe(probes["livenessProbe"]) if probes.get("livenessProbe") else None
            return
        if r.liveness and r.liveness.due(now):
            r.liveness.record(await r.pod.check(r.liveness.spec, self.http), now)
            if r.liveness.failed:
                log.info("%s failed its liveness probe: restarting", r.pod.meta.name)
                await r.pod.kill_container()
                return
        r.ready = await r.ready_check(r)

    async def _probe_ready(self, r: Replica) -> bool:
        if r.readiness is None:
            return True
        now = time.monotonic()
        if r.readiness.due(now):
            r.readiness.record(await r.pod.check(r.readiness.spec, self.http), now)
        return r.readiness.passing

    async def _patch_status(self, kind: str, obj: dict, status: dict) -> None:
        key = (kind, *key_of(obj))
        if self.status_cache.get(key) != status:
            ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
            if await self.api.patch(kind, ns, name, {"status": status}, status=True):
                self.status_cache[key] = status

    # -- Deployment -------------------------------------------------------------------
    async def sync_deployment(self, dep: dict) -> None:
        key = ("Deployment", *key_of(dep))
        spec = dep["spec"]
        r = self.replicas.get(key)
        if spec.get("replicas", 1) == 0:
            if r:
                await r.pod.delete()
                del self.replicas[key]
            return
        if r is None:
            pod = self.new_pod(dep, spec["template"], "")
            r = self.replicas[key] = Replica(pod, self._probe_ready)
        was_ready = r.ready
        await self.sync_replica(r)
        if r.ready and not was_ready:
            r.progress_at = time.monotonic()
        stamp = dep["metadata"].get("creationTimestamp") or now_iso()
        stuck = not r.ready and time.monotonic() - r.progress_at > float(spec.get("progressDeadlineSeconds", 600))
        progressing = ({"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                        "message": f'ReplicaSet "{dep["metadata"]["name"]}" has timed out progressing.'}
                       if stuck else {"type": "Progressing", "status": "True",
                                      "reason": "NewReplicaSetAvailable" if r.ready else "ReplicaSetUpdated"})
        available = {"type": "Available", "status": "True" if r.ready else "False",
                     "reason": "MinimumReplicasAvailable" if r.ready else "MinimumReplicasUnavailable"}
        await self._patch_status("Deployment", dep, {
            "observedGeneration": dep["metadata"].get("generation", 1), "replicas": 1, "updatedReplicas": 1,
            "readyReplicas": int(r.ready), "availableReplicas": int(r.ready), "unavailableReplicas": int(not r.ready),
            "conditions": [{**available, "lastTransitionTime": stamp}, {**progressing, "lastTransitionTime": stamp}]})

    # -- RayCluster (KubeRay) -----------------------------------------------------------
    async def _ray_ready(self, r: Replica) -> bool:
        return await r.pod.exec_in_pod(kuberay.PROBE_ARGV, timeout=5) == 0

    async def sync_raycluster(self, rc: dict) -> None:
        key = ("RayCluster", *key_of(rc))
        r = self.replicas.get(key)
        if rc["spec"].get("suspend"):
            if r:
                await r.pod.delete()
                del self.replicas[key]
            await self._patch_status("RayCluster", rc, kuberay.status(rc, False, "", "", now_iso()))
            return
        ns = rc["metadata"]["namespace"]
        if await self.api.get("Service", ns, kuberay.head_service_name(rc["metadata"]["name"])) is None:
            await self.api.create(kuberay.head_service(rc))
        if r is None:
            meta, spec = kuberay.head_pod(rc)
            pod = self.new_pod(rc, {"metadata": meta, "spec": spec}, "head-")
            r = self.replicas[key] = Replica(pod, self._ray_ready)
        await self.sync_replica(r)
        await self._patch_status("RayCluster", rc, kuberay.status(rc, r.ready, r.pod.ip, r.pod.meta.name,
                                                                   rc["metadata"].get("creationTimestamp", "")))

    # -- Job --------------------------------------------------------------------------
    async def sync_job(self, job: dict) -> None:
        key, spec = key_of(job), job["spec"]
        run = self.jobs.setdefault(key, JobRun())
        if run.done:
            return
        now = time.monotonic()
        if spec.get("suspend"):
            if run.pod:
                await run.pod.delete()
                run.pod = None
            await self._job_status(job, run, [{"type": "Suspended", "status": "True", "reason": "JobSuspended",
                                               "message": "Job suspended"}])
            return
        deadline = spec.get("activeDeadlineSeconds")
        if run.start_time and deadline is not None and now - run.started > float(deadline):
            await self._finish(job, run, "Failed", "DeadlineExceeded", "Job was active longer than specified deadline")
            return
        if run.pod is not None and run.pod.exit_code is not None:
            code = run.pod.exit_code
            await run.pod.delete(grace_s=0)
            run.pod = None
            if code == 0:
                run.succeeded = 1
                await self._finish(job, run, "Complete", "", "")
                return
            run.failed += 1
            log.info("job %s: pod failed with exit code %s (%d failures)", key[1], code, run.failed)
            if run.failed > int(spec.get("backoffLimit", 6)):
                await self._finish(job, run, "Failed", "BackoffLimitExceeded",
                                   "Job has reached the specified backoff limit")
                return
            run.next_start = now + JOB_BACKOFF_S * 2 ** (run.failed - 1)
        if run.pod is None and now >= run.next_start:
            run.pod = self.new_pod(job, spec["template"], "", {"batch.kubernetes.io/job-name": key[1]})
            if not run.start_time:
                run.start_time, run.started = now_iso(), now
            waiting = await self._start(run.pod)
            run.attempts += not waiting
            if waiting:  # the Job stays active with a pod that cannot start; only its deadline ends it
                log.info("job %s: %s", key[1], waiting)
                await run.pod.delete(grace_s=0)
                run.pod, run.next_start = None, now + CRASH_BACKOFF_S
        await self._job_status(job, run, [])

    async def _job_status(self, job: dict, run: JobRun, conditions: list[dict], **extra: str) -> None:
        status: dict[str, Any] = {"active": int(run.pod is not None), "failed": run.failed, "succeeded": run.succeeded,
                                  **extra}
        if run.start_time:
            status["startTime"] = run.start_time
        if conditions:
            stamp = now_iso()
            status["conditions"] = [{**c, "lastProbeTime": stamp, "lastTransitionTime": stamp} for c in conditions]
        await self._patch_status("Job", job, status)

    async def _finish(self, job: dict, run: JobRun, kind: str, reason: str, message: str) -> None:
        if run.pod:
            await run.pod.delete()
            run.pod = None
        run.done = True
        why = {"reason": reason, "message": message} if reason else {}
        target = "SuccessCriteriaMet" if kind == "Complete" else "FailureTarget"  # Kubernetes >= 1.31 sets both
        conds = [{"type": target, "status": "True", **why}, {"type": kind, "status": "True", **why}]
        await self._job_status(job, run, conds, **({"completionTime": now_iso()} if kind == "Complete" else {}))

    # -- Services -> DNS ----------------------------------------------------------------
    def sync_dns(self, services: list[dict]) -> None:
        ready = [r.pod for r in self.replicas.values() if r.ready and r.pod.ip]
        ready += [j.pod for j in self.jobs.values() if j.pod and j.pod.ip]
        names: dict[str, str] = {}
        for svc in services:
            ns, name = svc["metadata"]["namespace"], svc["metadata"]["name"]
            ip = self.fixed_services.get((ns, name))
            if ip is None:
                selector = (svc.get("spec") or {}).get("selector") or {}
                match = [p for p in ready if selector and all(p.meta.labels.get(k) == v for k, v in selector.items())]
                ip = match[0].ip if match else self.net.node_ip  # no endpoints: the node refuses the connection
            names.update({n: ip for n in service_names(name, ns)})
        if names != self.net.names:
            self.net.set_names(names)
