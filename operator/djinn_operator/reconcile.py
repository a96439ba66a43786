"""One level-triggered reconcile of an experiment: read CR and children, step the plan, write.

Every trigger (CR created/resumed/updated, a child's status changed) runs the same
function, serialised per experiment. The status is patched before any action is applied,
so a child's name is always on record before the child exists.
"""
from __future__ import annotations

import asyncio
from datetime import datetime, timezone

import kopf

from djinn.spec import KIND

from . import k8s, plan, results
from .manifests import Experiment


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


async def observe(exp: Experiment, st: plan.Status) -> plan.Observed:
    """Read the children the current step depends on (and the result of a finished run)."""
    ns, job, result, analysis = exp.namespace, None, None, None
    i = plan.current(st)
    if i is not None and st.runs[i].state == "Running":
        job = await k8s.get("Job", ns, st.runs[i].job)
        if plan.job_outcome(job)[0] == "Succeeded":
            result = await asyncio.to_thread(results.find, exp.results_uri, exp.spec.output, st.runs[i])
    if st.analysis and st.analysis.state == "Running":
        analysis = await k8s.get("Job", ns, st.analysis.job)
    server = await k8s.get("Deployment", ns, exp.server_name) if exp.server_name else None
    ray = await k8s.get("RayCluster", ns, exp.ray_name) if exp.ray_name else None
    return plan.Observed(job=job, result=result, server=server, ray=ray, analysis=analysis)


async def apply(action: plan.Action, owner: dict, namespace: str) -> None:
    if isinstance(action, plan.Create):
        kopf.adopt(action.obj, owner=owner)
        await k8s.create(action.obj)
    elif isinstance(action, plan.Delete):
        await k8s.delete(action.kind, namespace, action.name)
    else:
        await k8s.patch("RayCluster", namespace, action.name, {"spec": {"suspend": action.suspend}})


async def reconcile(namespace: str, name: str, lock: asyncio.Lock) -> None:
    async with lock:
        body = await k8s.get(KIND, namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return
        old = plan.Status.model_validate(body.get("status") or {})
        st, exp = plan.prepare(name, namespace, body.get("spec") or {}, body.get("status") or {}, now())
        actions: list[plan.Action] = []
        if exp is not None:
            st, actions = plan.advance(exp, st, await observe(exp, st), now())
        if st.to_dict() != old.to_dict():
            await k8s.patch(KIND, namespace, name, {"status": st.to_dict()}, subresource="status")
        for action in actions:
            await apply(action, body, namespace)
