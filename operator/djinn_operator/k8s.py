"""The operator's only door to the Kubernetes API (kubernetes' client, run in threads).

``API_CALLS`` lists every (apiGroup, resource, verb) the operator can use, kopf's own
needs included, so the Helm chart's RBAC can be checked against it; ``_call`` refuses
anything not listed.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import uuid
from datetime import datetime, timezone
from typing import Any, Optional

import kopf
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from djinn.spec import GROUP, KIND, PLURAL, VERSION

RESOURCES = {  # kind -> (apiGroup, version, plural)
    KIND: (GROUP, VERSION, PLURAL),
    "Job": ("batch", "v1", "jobs"),
    "Deployment": ("apps", "v1", "deployments"),
    "Service": ("", "v1", "services"),
    "RayCluster": ("ray.io", "v1", "rayclusters"),
    "Event": ("", "v1", "events"),
    "Pod": ("", "v1", "pods"),
    "Secret": ("", "v1", "secrets"),
}

_WATCHED = ("list", "watch", "patch")  # kopf watches these and keeps its annotations on them
API_CALLS: tuple[tuple[str, str, str], ...] = (
    # kopf: resource discovery, namespace scanning, k8s events about handled objects
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
    ("", "namespaces", "list"),
    ("", "namespaces", "watch"),
    ("", "events", "create"),  # also the reconciler's own Events
    # the custom resource: kopf watches and annotates it; the reconciler reads it (and lists its GPU pool's
    # queue) and writes status
    *((GROUP, PLURAL, v) for v in _WATCHED),
    (GROUP, PLURAL, "get"),
    (GROUP, f"{PLURAL}/status", "patch"),
    # ownerReferences with blockOwnerDeletion (kopf.adopt) need it under OwnerReferencesPermissionEnforcement
    (GROUP, f"{PLURAL}/finalizers", "update"),
    # children
    *(("batch", "jobs", v) for v in ("get", "create", *_WATCHED)),
    *(("apps", "deployments", v) for v in ("get", "create", "delete", *_WATCHED)),
    ("", "services", "get"),
    ("", "pods", "list"),  # a failed child's termination message, quoted in the status
    ("", "secrets", "get"),  # the Djinn server's bearer token, created with it
    ("", "secrets", "create"),
    ("", "services", "create"),
    # deleted (not suspended) when Kueue owns spec.suspend
    *(("ray.io", "rayclusters", v) for v in ("get", "create", "delete", *_WATCHED)),
)

_api: Optional[client.ApiClient] = None


def configure() -> client.Configuration:
    """In-cluster service account, else $KUBECONFIG / ~/.kube/config."""
    global _api
    cfg = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=cfg)
    except config.ConfigException:
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None, client_configuration=cfg)
    _api = client.ApiClient(cfg)
    return cfg


def connection_info() -> kopf.ConnectionInfo:
    """The same credentials for kopf's own connection (used by its login handler)."""
    cfg = configure()
    header = cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix("authorization") or ""
    scheme, _, token = header.rpartition(" ")
    return kopf.ConnectionInfo(
        server=cfg.host, ca_path=cfg.ssl_ca_cert, insecure=not cfg.verify_ssl,
        username=cfg.username or None, password=cfg.password or None,
        scheme=scheme or None, token=token or None,
        certificate_path=cfg.cert_file, private_key_path=cfg.key_file)


def watched_namespaces() -> list[str]:
    """WATCH_NAMESPACE (comma-separated); empty: cluster-wide."""
    return [n.strip() for n in os.environ.get("WATCH_NAMESPACE", "").split(",") if n.strip()]


async def _call(verb: str, kind: str, namespace: Optional[str], name: Optional[str] = None,
                body: Any = None, subresource: Optional[str] = None, selector: Optional[str] = None) -> Any:
    group, version, plural = RESOURCES[kind]
    resource = f"{plural}/{subresource}" if subresource else plural
    if (group, resource, verb) not in API_CALLS:
        raise PermissionError(f"{verb} {group or 'core'}/{resource} is not in API_CALLS")
    path = (f"/apis/{group}/{version}" if group else f"/api/{version}") + \
        (f"/namespaces/{namespace}" if namespace else "") + f"/{plural}"
    path += "".join(f"/{p}" for p in (name, subresource) if p)
    method = {"get": "GET", "list": "GET", "create": "POST", "patch": "PATCH", "delete": "DELETE"}[verb]
    headers = {"Accept": "application/json"}
    if verb == "patch":
        headers["Content-Type"] = "application/merge-patch+json"
    query = [("propagationPolicy", "Background")] if verb == "delete" else []
    if selector:
        query.append(("labelSelector", selector))
    if _api is None:
        await asyncio.to_thread(configure)
    api = _api

    def call() -> Any:
        resp = api.call_api(path, method, query_params=query, header_params=headers, body=body,
                            auth_settings=["BearerToken"], _preload_content=False, _return_http_data_only=True)
        return json.loads(resp.data or b"null")

    return await asyncio.to_thread(call)


async def get(kind: str, namespace: str, name: str) -> Optional[dict]:
    """The object, or None when it does not exist."""
    try:
        return await _call("get", kind, namespace, name)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


async def list_all(kind: str) -> list[dict]:
    """Every object of ``kind`` the operator watches: per watched namespace, or cluster-wide."""
    spaces: list[Optional[str]] = list(watched_namespaces()) or [None]
    out: list[dict] = []
    for ns in spaces:
        out += (await _call("list", kind, ns))["items"]
    return out


async def list_pods(namespace: str, labels: dict[str, str]) -> list[dict]:
    selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    return (await _call("list", "Pod", namespace, selector=selector))["items"]


async def create(obj: dict) -> bool:
    """Create; False when it already exists (a retry or a restarted operator adopts it)."""
    try:
        await _call("create", obj["kind"], obj["metadata"]["namespace"], body=obj)
        return True
    except ApiException as exc:
        if exc.status == 409:
            return False
        raise


async def delete(kind: str, namespace: str, name: str) -> None:
    try:
        await _call("delete", kind, namespace, name)
    except ApiException as exc:
        if exc.status != 404:
            raise


async def patch(kind: str, namespace: str, name: str, body: dict, subresource: Optional[str] = None) -> None:
    """JSON merge patch (null removes a key)."""
    await _call("patch", kind, namespace, name, body=body, subresource=subresource)


async def event(owner: dict, type_: str, reason: str, message: str) -> None:
    """Post a core/v1 Event about ``owner`` (what ``kubectl describe`` lists)."""
    meta = owner["metadata"]
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    body = {"apiVersion": "v1", "kind": "Event",
            # <= 253 characters, as any object name, however long the owner's
            "metadata": {"name": f"{meta['name'][:236].rstrip('.-')}.{uuid.uuid4().hex[:16]}",
                         "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta.get("uid")},
            "type": type_, "reason": reason, "message": message[:1024],
            "source": {"component": "djinn-operator"}, "reportingComponent": "djinn.io/operator",
            "reportingInstance": socket.gethostname()[:128],
            "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1}
    await _call("create", "Event", meta["namespace"], body=body)
