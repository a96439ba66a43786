"""The API server of the stand-in cluster: kmock's emulator plus the writes the real one makes itself.

kmock stores objects as given. A real API server also assigns ``uid``, ``creationTimestamp``,
``generation`` (bumped on every spec change) and turns a Secret's ``stringData`` into ``data``;
the operator and the garbage collector depend on those, so they are added here. ``refuse``
makes it answer a create as an admission plugin would (a ResourceQuota's 403, a webhook's 422).
"""
from __future__ import annotations

import base64
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import aiohttp
import attrs
import kmock
import yaml

from djinn.spec import GROUP, KIND, PLURAL, VERSION

RW = ["get", "list", "watch", "create", "update", "patch", "delete"]
# kind -> (api path, plural, namespaced, subresources): what a kind cluster with KubeRay serves
KINDS: dict[str, tuple[str, str, bool, tuple[str, ...]]] = {
    KIND: (f"apis/{GROUP}/{VERSION}", PLURAL, True, ("status",)),
    "RayCluster": ("apis/ray.io/v1", "rayclusters", True, ("status",)),
    "Job": ("apis/batch/v1", "jobs", True, ("status",)),
    "Deployment": ("apis/apps/v1", "deployments", True, ("status",)),
    "Service": ("api/v1", "services", True, ()),
    "Secret": ("api/v1", "secrets", True, ()),
    "Pod": ("api/v1", "pods", True, ("status",)),
    "ConfigMap": ("api/v1", "configmaps", True, ()),
    "ServiceAccount": ("api/v1", "serviceaccounts", True, ()),
    "Event": ("api/v1", "events", True, ()),
    "Namespace": ("api/v1", "namespaces", False, ()),
    "Role": ("apis/rbac.authorization.k8s.io/v1", "roles", True, ()),
    "RoleBinding": ("apis/rbac.authorization.k8s.io/v1", "rolebindings", True, ()),
    "ClusterRole": ("apis/rbac.authorization.k8s.io/v1", "clusterroles", False, ()),
    "ClusterRoleBinding": ("apis/rbac.authorization.k8s.io/v1", "clusterrolebindings", False, ()),
    "CustomResourceDefinition": ("apis/apiextensions.k8s.io/v1", "customresourcedefinitions", False, ()),
}
MERGE = {"Content-Type": "application/merge-patch+json"}


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@attrs.frozen(kw_only=True)
class Refusal(kmock.KubernetesError):
    status: int
    reason: str
    message: str


class ApiServer(kmock.KubernetesEmulator):
    """kmock with server-side metadata; every kind of ``KINDS`` registered with its verbs."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for kind, (path, plural, namespaced, subresources) in KINDS.items():
            self.resources[f"{path.split('/', 1)[1]}/{plural}"] = {
                "kind": kind, "namespaced": namespaced, "verbs": RW, "subresources": list(subresources)}
        self.refusals: dict[tuple[str, str], Refusal] = {}

    def refuse(self, plural: str, name: str, status: int, reason: str, message: str) -> None:
        """Answer every create of ``plural/name`` with this error until ``refusals`` is cleared."""
        self.refusals[plural, name] = Refusal(status=status, reason=reason, message=message)

    async def _handle(self, request):  # noqa: ANN001  (kmock's Request)
        data = request.data
        if request.resource is not None and isinstance(data, dict):
            meta = data.setdefault("metadata", {})
            refusal = self.refusals.get((request.resource.plural, meta.get("name")))
            if str(request.method.value) == "POST" and refusal is not None:
                raise refusal
            if str(request.method.value) == "POST":
                meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1, resourceVersion="1")
                if "stringData" in data:
                    data.setdefault("data", {}).update(
                        {k: base64.b64encode(v.encode()).decode() for k, v in data.pop("stringData").items()})
            elif str(request.method.value) in ("PATCH", "PUT") and request.subresource is None and "spec" in data:
                key = (request.resource, request.namespace, request.name)
                current = self._objects[key] if key in self._objects else None
                if current is not None and not current.deleted:
                    meta["generation"] = int(current.get("metadata", {}).get("generation") or 1) + 1
        try:
            return await super()._handle(request)
        finally:
            if str(request.method.value) == "GET":
                self._forget(request)

    def _forget(self, request) -> None:  # noqa: ANN001
        """kmock matches every request against its whole request log (quadratic over a long run: the
        harness's own CPU hog); reads are dropped from the log once answered, writes stay for assertions."""
        log = self._requests
        for i in range(len(log) - 1, -1, -1):
            if log[i] is request:
                del log[i]
                return


def write_kubeconfig(path: Any, url: str, namespace: Optional[str] = None) -> str:
    """A kubeconfig for the emulator at ``url`` (the operator's stand-in for its service-account token)."""
    context = {"cluster": "kind-djinn", "user": "sa", **({"namespace": namespace} if namespace else {})}
    Path(path).write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kind-djinn",
        "clusters": [{"name": "kind-djinn", "cluster": {"server": url}}],
        "users": [{"name": "sa", "user": {"token": "service-account-token"}}],
        "contexts": [{"name": "kind-djinn", "context": context}]}))
    return str(path)


class Api:
    """The harness's own client (kubectl's role): plain JSON over HTTP."""

    def __init__(self, url: str, http: aiohttp.ClientSession):
        self.url, self.http = url.rstrip("/"), http

    def _path(self, kind: str, namespace: Optional[str], name: str = "", sub: str = "") -> str:
        path, plural, namespaced, _ = KINDS[kind]
        ns = f"/namespaces/{namespace}" if namespaced and namespace else ""
        return f"{self.url}/{path}{ns}/{plural}" + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")

    async def list(self, kind: str, namespace: Optional[str] = None) -> list[dict]:
        async with self.http.get(self._path(kind, namespace)) as r:
            return (await r.json())["items"] if r.status == 200 else []

    async def get(self, kind: str, namespace: Optional[str], name: str) -> Optional[dict]:
        async with self.http.get(self._path(kind, namespace, name)) as r:
            return await r.json() if r.status == 200 else None

    async def create(self, obj: dict) -> dict:
        meta = obj["metadata"]
        async with self.http.post(self._path(obj["kind"], meta.get("namespace")), json=obj) as r:
            if r.status not in (200, 201):
                raise AssertionError(f"create {obj['kind']} {meta['name']}: {r.status} {await r.text()}")
            return await r.json()

    async def patch(self, kind: str, namespace: Optional[str], name: str, body: dict, status: bool = False) -> bool:
        """Merge patch; False when the object is gone."""
        async with self.http.patch(self._path(kind, namespace, name, "status" if status else ""),
                                   json=body, headers=MERGE) as r:
            return r.status == 200

    async def delete(self, kind: str, namespace: Optional[str], name: str) -> bool:
        async with self.http.delete(self._path(kind, namespace, name)) as r:
            return r.status == 200

    async def apply(self, obj: dict) -> dict:
        """Create, or merge the given fields into the existing object (``kubectl apply`` for a harness)."""
        meta = obj["metadata"]
        current = await self.get(obj["kind"], meta.get("namespace"), meta["name"])
        if current is None:
            return await self.create(obj)
        await self.patch(obj["kind"], meta.get("namespace"), meta["name"], {k: v for k, v in obj.items()
                                                                           if k not in ("apiVersion", "kind")})
        return await self.get(obj["kind"], meta.get("namespace"), meta["name"])


def secret_value(secret: dict, key: str) -> Optional[str]:
    raw = (secret.get("data") or {}).get(key)
    return None if raw is None else base64.b64decode(raw).decode()


def owner_uids(obj: dict) -> list[str]:
    return [r["uid"] for r in obj.get("metadata", {}).get("ownerReferences") or [] if r.get("uid")]


def owned_by(obj: dict, owner: dict) -> bool:
    return owner["metadata"].get("uid") in owner_uids(obj)


def name_of(obj: dict) -> tuple[Any, str]:
    return obj["metadata"].get("namespace"), obj["metadata"]["name"]
