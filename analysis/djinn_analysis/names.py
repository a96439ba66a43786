"""Baseline names, display labels and ordering shared by tables and figures."""
from __future__ import annotations

from typing import Iterable

AGENT_BASELINES = ("ray_keepalive", "ray_serverless", "djinn_agents")
DECODE_MODES = ("native_pytorch", "semantic_blind", "partially_aware", "full_djinn")

LABELS = {
    "ray_keepalive": "Ray Keep-Alive",
    "ray_serverless": "Ray Serverless",
    "djinn_agents": "Djinn",
    "native_pytorch": "Native PyTorch",
    "semantic_blind": "Semantic-blind",
    "partially_aware": "Partially aware",
    "full_djinn": "Full Djinn",
}


def label(baseline: str) -> str:
    return LABELS.get(baseline, baseline)


def ordered(names: Iterable[str], preferred: tuple[str, ...]) -> list[str]:
    """Known names in ``preferred`` order first, then the rest alphabetically."""
    names = set(names)
    return [n for n in preferred if n in names] + sorted(names - set(preferred))
