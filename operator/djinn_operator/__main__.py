"""``python -m djinn_operator``: kopf with the handlers; WATCH_NAMESPACE (comma-separated) or, empty, cluster-wide."""
from __future__ import annotations

import os
from typing import Any

import kopf

from . import handlers  # noqa: F401  (registers the handlers)
from .k8s import watched_namespaces


def kopf_args(namespaces: list[str]) -> dict[str, Any]:
    return {"standalone": True, "clusterwide": not namespaces, "namespaces": namespaces}


def main() -> None:
    kopf.configure()
    handlers.reconcile_interval()  # a bad value stops here with one line, not in the ticker
    kopf.run(**kopf_args(watched_namespaces()),
             liveness_endpoint=os.environ.get("LIVENESS_ENDPOINT") or None)


if __name__ == "__main__":
    main()
