"""What a child's pods said when they failed: the last line of a container's termination message.

Every container the operator creates has ``terminationMessagePolicy: FallbackToLogsOnError``, so
the kubelet keeps the tail of its log there; the status quotes that line instead of "see the log".
"""
from __future__ import annotations

from typing import Any, Optional

CRASH_RESTARTS = 2  # a server container that exited this often is crash-looping, not starting


def _terminations(pod: dict) -> list[dict[str, Any]]:
    out = []
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        for state in (cs.get("state") or {}, cs.get("lastState") or {}):
            if state.get("terminated"):
                out.append(state["terminated"])
    return out


def last_words(pods: list[dict]) -> Optional[str]:
    """The last non-empty line a failed container of the newest pod left, at most 400 characters."""
    for pod in sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp") or "", reverse=True):
        for term in _terminations(pod):
            lines = [ln.strip() for ln in (term.get("message") or "").splitlines() if ln.strip()]
            if lines and term.get("exitCode", 1) != 0:
                return lines[-1][:400]
    return None


def crash_loop(pods: list[dict]) -> Optional[str]:
    """The last words of a container that keeps exiting (None while it has not failed twice)."""
    looping = [p for p in pods if any(cs.get("restartCount", 0) >= CRASH_RESTARTS
                                      for cs in (p.get("status") or {}).get("containerStatuses") or [])]
    return last_words(looping) if looping else None
