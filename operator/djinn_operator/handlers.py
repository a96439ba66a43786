"""kopf wiring, kept thin: every trigger runs reconcile() for the experiment concerned."""
from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any, Optional

import kopf

from djinn.spec import GROUP, KIND, PLURAL, VERSION

from . import k8s
from .names import EXPERIMENT_LABEL
from .reconcile import reconcile

CHILDREN = {EXPERIMENT_LABEL: kopf.PRESENT}


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """kopf's own state in ``djinn.io/`` annotations only; nothing is written to status by kopf."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration")
    settings.posting.level = logging.WARNING
    settings.execution.default_backoff = 10  # a failed reconcile (API or S3 blip) is retried after 10 s
    memo.locks = collections.defaultdict(asyncio.Lock)


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
