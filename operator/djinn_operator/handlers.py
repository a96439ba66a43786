"""kopf wiring, kept thin: every trigger runs reconcile() for the experiment concerned.

Besides kopf's triggers, one ticker reconciles every unfinished experiment each
``DJINN_RECONCILE_SECONDS`` (default 15), so deadlines fire and vanished children come back
while nothing in the cluster changes. It is a task of the operator, not a kopf timer: timers
put a finalizer on every object, and deletion must never wait for the operator.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import os
from typing import Any, Optional

import kopf

from djinn.spec import GROUP, KIND, PLURAL, VERSION

from . import k8s, plan
from .names import EXPERIMENT_LABEL
from .reconcile import reconcile

CHILDREN = {EXPERIMENT_LABEL: kopf.PRESENT}
log = logging.getLogger(__name__)


def reconcile_interval() -> float:
    raw = os.environ.get("DJINN_RECONCILE_SECONDS", "15")
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise SystemExit(f"DJINN_RECONCILE_SECONDS: expected seconds > 0, got {raw!r}")
    return value


async def tick(memo: kopf.Memo, interval: float) -> None:
    """Reconcile every unfinished experiment, forever; a failure is logged, the others go on, the next round retries."""
    while True:
        await asyncio.sleep(interval)
        try:
            experiments = await k8s.list_all(KIND)
        except Exception:  # noqa: BLE001  (the ticker outlives any one failure)
            log.exception("periodic reconcile: listing experiments failed; retrying in %s s", interval)
            continue
        for obj in experiments:
            if (obj.get("status") or {}).get("phase") in plan.FINISHED:
                continue
            ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
            try:
                await reconcile(ns, name, memo.locks[ns, name])
            except Exception:  # noqa: BLE001  (one experiment's failure must not stop the others' deadlines)
                log.exception("periodic reconcile of %s/%s failed; retrying in %s s", ns, name, interval)


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """kopf's own state in ``djinn.io/`` annotations only; nothing is written to status by kopf."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration")
    settings.posting.level = logging.WARNING
    settings.execution.default_backoff = 10  # a failed reconcile (API or S3 blip) is retried after 10 s
    memo.locks = collections.defaultdict(asyncio.Lock)
    memo.ticker = asyncio.create_task(tick(memo, reconcile_interval()))


@kopf.on.cleanup()
async def stop_ticker(memo: kopf.Memo, **_: Any) -> None:
    memo.ticker.cancel()


@kopf.on.login()
def login(**_: Any) -> kopf.ConnectionInfo:
    return k8s.connection_info()


@kopf.on.resume(GROUP, VERSION, PLURAL, id="resume")
@kopf.on.create(GROUP, VERSION, PLURAL, id="create")
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec", id="update")
async def experiment(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    """Plan, start or continue; a spec update after planning is refused in a condition."""
    await reconcile(namespace, name, memo.locks[namespace, name])


def owner(body: kopf.Body) -> Optional[str]:
    """Name of the experiment owning a child (children live in its namespace)."""
    refs = body.get("metadata", {}).get("ownerReferences") or []
    return next((r["name"] for r in refs
                 if r.get("kind") == KIND and r.get("apiVersion", "").startswith(f"{GROUP}/")), None)


@kopf.on.field("batch", "v1", "jobs", field="status.conditions", labels=CHILDREN, id="job")
@kopf.on.field("apps", "v1", "deployments", field="status", labels=CHILDREN, id="server")
@kopf.on.field("ray.io", "v1", "rayclusters", field="status", labels=CHILDREN, id="ray")
async def child(body: kopf.Body, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    """A child's status changed (Job finished, server or Ray head ready): step its experiment."""
    name = owner(body)
    if name:
        await reconcile(namespace, name, memo.locks[namespace, name])
