"""Deterministic child names and labels: DNS-1035 labels, hash-truncated when too long."""
from __future__ import annotations

import hashlib
import re
from typing import Optional

EXPERIMENT_LABEL = "djinn.io/experiment"
COMPONENT_LABEL = "djinn.io/component"
MANAGED_BY = {"app.kubernetes.io/managed-by": "djinn-operator"}
RAY_NAME_MAX = 47  # KubeRay refuses longer RayCluster names (its services append suffixes)


def dns_name(*parts: str, limit: int = 63) -> str:
    """Join ``parts`` into a DNS-1035 label; any rewrite or truncation appends a hash of the input."""
    raw = "-".join(parts)
    name = re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", raw.lower())).strip("-")
    if not name[:1].isalpha():
        name = f"x-{name}"
    if name == raw and len(name) <= limit:
        return name
    digest = hashlib.sha256(raw.encode()).hexdigest()[:8]
    return f"{name[:limit - 9].rstrip('-')}-{digest}"


def server(experiment: str) -> str:
    """Djinn server Deployment and Service."""
    return dns_name(experiment, "djinn-server")


def auth_secret(experiment: str) -> str:
    """Secret holding the bearer token of our Djinn server (key ``token``)."""
    return dns_name(experiment, "djinn-auth")


def ray(experiment: str) -> str:
    """RayCluster; clients use ``<name>-head-svc``."""
    return dns_name(experiment, "ray", limit=RAY_NAME_MAX)


def run_job(experiment: str, baseline: str, n: Optional[int]) -> str:
    """Client Job of one (baseline, N), or of one decode mode when ``n`` is None."""
    parts = [experiment, baseline.replace("_", "-")] + ([f"n{n}"] if n is not None else [])
    return dns_name(*parts)


def analysis_job(experiment: str) -> str:
    return dns_name(experiment, "analysis")


def labels(experiment: str, component: str, **extra: str) -> dict[str, str]:
    """Labels of every child; the experiment value is a valid label value even for long names."""
    value = experiment if len(experiment) <= 63 else dns_name(experiment)
    return {**MANAGED_BY, EXPERIMENT_LABEL: value, COMPONENT_LABEL: component, **extra}
