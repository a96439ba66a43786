"""``python -m djinn_operator``: kopf with the handlers; WATCH_NAMESPACE (comma-separated) or, empty, cluster-wide."""
from __future__ import annotations

import os
from typing import Any

import kopf

from . import handlers  # noqa: F401  (registers the handlers)


def kopf_args(watch_namespace: str) -> dict[str, Any]:
    namespaces = [n.strip() for n in watch_namespace.split(",") if n.strip()]
    return {"standalone": True, "clusterwide": not namespaces, "namespaces": namespaces}


def main() -> None:
    kopf.configure()
    kopf.run(**kopf_args(os.environ.get("WATCH_NAMESPACE", "")),
             liveness_endpoint=os.environ.get("LIVENESS_ENDPOINT") or None)


if __name__ == "__main__":
    main()
