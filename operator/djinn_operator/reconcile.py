"""One level-triggered reconcile of an experiment: read CR and children, step the plan, write.

Every trigger (CR created/resumed/updated, a child's status changed, the periodic tick) runs
the same function, serialised per experiment. The status is patched before any action is
applied, so a child's name is always on record before the child exists. Each status change
is told as Events; a child the API server refuses is recorded in the status, not retried blind.
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
from datetime import datetime, timezone
from typing import Any, Callable, Optional

import kopf
from kubernetes.client.exceptions import ApiException

from djinn.spec import KIND, ExperimentSpec, SpecError

from . import k8s, plan, pods, results
from .manifests import Experiment, server_labels
from .status import Status, condition, observe_generation

log = logging.getLogger(__name__)
RETRIED = (408, 409, 429)  # client-side statuses that are not a refusal: timeout, conflict, throttling


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _owner_uids(obj: dict) -> list[str]:
    return [r.get("uid") for r in obj.get("metadata", {}).get("ownerReferences") or []]


def _queue_key(obj: dict) -> tuple[str, str, str]:
    meta = obj["metadata"]
    return meta.get("creationTimestamp") or "", meta.get("namespace") or "", meta["name"]


def _peer(obj: dict) -> Optional[tuple[Experiment, Status]]:
    """Another experiment as the queue sees it: its planned spec, else its spec as it would be planned."""
    meta, st = obj["metadata"], Status.model_validate(obj.get("status") or {})
    if meta.get("deletionTimestamp") or st.phase in (*plan.FINISHED, "Analyzing"):
        return None
    try:
        spec = (ExperimentSpec.model_validate_json(st.planned_spec) if st.planned_spec
                else plan.validate(obj.get("spec") or {}))
    except (SpecError, ValueError):
        return None
    if not plan.started(st) and (c := condition(st, "ResultStoreUnreachable")) is not None and c.status == "True":
        return None  # it waits for its store, not for the GPU: not in line until the store answers
    return Experiment(meta["name"], meta["namespace"], spec), st


async def gpu_turn(exp: Experiment, body: dict) -> Optional[plan.Turn]:
    """Whose turn the GPU pool is: None when ours. Started experiments keep the pool; the rest queue by
    creation time (then namespace/name), so two reconciles racing each other still agree."""
    mine, holding, ahead = plan.pool(exp), [], []
    for obj in await k8s.list_all(KIND):
        if obj["metadata"].get("uid") == body["metadata"].get("uid") or (peer := _peer(obj)) is None:
            continue
        other, st = peer
        if not plan.holds_gpu(other) or other.spec.cluster.queue_name or plan.pool(other) != mine:
            continue
        label = f"{other.namespace}/{other.name}"
        if plan.started(st):
            holding.append(label)
        elif _queue_key(obj) < _queue_key(body):
            ahead.append((_queue_key(obj), label))
    if not holding and not ahead:
        return None
    return plan.Turn(holder=holding[0] if holding else min(ahead)[1], position=len(ahead) + 1)


async def _from_store(read: Callable[..., Any], *args: Any) -> tuple[Any, Optional[plan.StoreProblem]]:
    """A blocking S3 read, in a thread; what S3 refused or left unanswered becomes a StoreProblem."""
    try:
        return await asyncio.to_thread(read, *args), None
    except results.STORE_ERRORS as exc:
        return None, results.store_problem(exc)


async def observe(exp: Experiment, st: Status, body: dict) -> plan.Observed:
    """Read the children the current step depends on (and the result of a finished run).
    A child owned by another uid reads as absent and is listed as foreign, never adopted."""
    ns, uid, foreign = exp.namespace, body["metadata"].get("uid"), []

    async def child(kind: str, name: Optional[str]) -> Optional[dict]:
        obj = await k8s.get(kind, ns, name) if name else None
        if obj is not None and uid not in _owner_uids(obj):
            foreign.append(f"{kind}/{name}")
            return None
        return obj

    job = result = analysis = turn = said = crash = store = None
    i = plan.current(st)
    if i is not None and st.runs[i].state == "Running":
        job = await child("Job", st.runs[i].job)
        outcome = plan.job_outcome(job)[0]
        if outcome in ("Succeeded", "Failed"):
            result, store = await _from_store(results.find, exp.results_uri, exp.spec.output, st.runs[i])
        if outcome == "Failed":
            said = pods.last_words(await k8s.list_pods(ns, {"batch.kubernetes.io/job-name": st.runs[i].job}))
    elif not plan.started(st):  # before any GPU time is spent: can the results be read back at all?
        _, store = await _from_store(results.probe, exp.results_uri, exp.spec.output)
    if st.analysis and st.analysis.state == "Running":
        analysis = await child("Job", st.analysis.job)
    if not plan.started(st) and plan.holds_gpu(exp) and not exp.spec.cluster.queue_name:
        turn = await gpu_turn(exp, body)
    server = await child("Deployment", exp.server_name)
    if server is not None and plan.server_state(server) != "Ready":
        crash = pods.crash_loop(await k8s.list_pods(ns, server_labels(exp)))
    return plan.Observed(job=job, result=result, job_message=said, analysis=analysis, turn=turn, server=server,
                         server_crash=crash, store=store, service=await child("Service", exp.server_name),
                         auth_secret=await child("Secret", exp.server_name and exp.token_secret),
                         new_token=secrets.token_urlsafe(32),
                         ray=await child("RayCluster", exp.ray_name), foreign=tuple(foreign))


async def apply(action: plan.Action, owner: dict, namespace: str) -> None:
    if isinstance(action, plan.Create):
        kopf.adopt(action.obj, owner=owner)
        await k8s.create(action.obj)
    elif isinstance(action, plan.Delete):
        await k8s.delete(action.kind, namespace, action.name)
    else:
        await k8s.patch("RayCluster", namespace, action.name, {"spec": {"suspend": action.suspend}})


def refusal(exc: ApiException) -> Optional[str]:
    """The API server's one-line reason when it refused a write (422 invalid, 403 quota/forbidden...)."""
    if not 400 <= (exc.status or 0) < 500 or exc.status in RETRIED:
        return None
    try:
        message = json.loads(exc.body or "{}").get("message") or exc.reason
    except (ValueError, AttributeError):
        message = exc.reason
    return f"{exc.status} {exc.reason}: {' '.join(str(message).split())}"


async def write(body: dict, old: Status, new: Status) -> None:
    """Patch the status if it changed, then tell the change as Events (best effort)."""
    observe_generation(new, body["metadata"].get("generation"))
    if new.to_dict() == old.to_dict():
        return
    meta = body["metadata"]
    await k8s.patch(KIND, meta["namespace"], meta["name"], {"status": new.to_dict()}, subresource="status")
    for ev in plan.events(old, new):
        try:
            await k8s.event(body, ev.type, ev.reason, ev.message)
        except Exception as exc:  # an Event lost must not fail the reconcile that caused it
            log.warning("event %s for %s not posted: %s", ev.reason, meta["name"], exc)


async def reconcile(namespace: str, name: str, lock: asyncio.Lock) -> None:
    async with lock:
        body = await k8s.get(KIND, namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return
        stored = Status.model_validate(body.get("status") or {})
        st, exp = plan.prepare(name, namespace, body.get("spec") or {}, body.get("status") or {}, now())
        actions: list[plan.Action] = []
        if exp is not None:
            st, actions = plan.advance(exp, st, await observe(exp, st, body), now())
        await write(body, stored, st)
        for action in actions:
            try:
                await apply(action, body, namespace)
            except ApiException as exc:
                reason = refusal(exc)
                if reason is None:
                    raise
                await write(body, st, plan.rejected(st, action, reason, now()))
                return
        if actions and st.child_rejections:
            await write(body, st, plan.accepted(st))
