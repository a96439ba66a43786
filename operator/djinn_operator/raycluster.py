"""KubeRay ``RayCluster`` (ray.io/v1) as small typed models; the official client is not on PyPI."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

API_VERSION = "ray.io/v1"
CLIENT_PORT = 10001


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class HeadGroupSpec(_Model):
    ray_start_params: dict[str, str]
    service_type: Literal["ClusterIP"] = "ClusterIP"
    template: dict[str, Any]  # a core/v1 PodTemplateSpec


class RayClusterSpec(_Model):
    suspend: bool = False
    head_group_spec: HeadGroupSpec


class RayCluster(_Model):
    api_version: Literal["ray.io/v1"] = API_VERSION
    kind: Literal["RayCluster"] = "RayCluster"
    metadata: dict[str, Any]
    spec: RayClusterSpec

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True)


def client_address(name: str, namespace: str) -> str:
    """Ray Client address of a RayCluster's head service."""
    return f"ray://{name}-head-svc.{namespace}.svc:{CLIENT_PORT}"


def is_ready(rc: dict | None) -> bool:
    """Head up and not suspended (KubeRay's ``state`` or its ``HeadPodReady`` condition)."""
    if not rc or rc.get("spec", {}).get("suspend"):
        return False
    status = rc.get("status") or {}
    conds = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    return status.get("state") == "ready" or conds.get("HeadPodReady") == "True"


def is_suspended(rc: dict) -> bool:
    return bool(rc.get("spec", {}).get("suspend"))
