"""Djinn server flags sized from an experiment spec.

The local runner and the operator both start a server for an experiment; both take its
flags from here, so a spec that runs locally is admitted the same way on Kubernetes.
"""
from __future__ import annotations

from djinn.server.limits import DEFAULT_IDLE_TIMEOUT_S
from djinn.spec import ExperimentSpec

MIN_CONCURRENT = 64  # the server's own default: the decode modes and small runs never need more
SESSION_TTL_S = 600.0  # the server's --session-ttl default


def largest_agent_count(spec: ExperimentSpec) -> int:
    """The most agents that will talk to the server at once (djinn_agents swept up to its cap included)."""
    return max(max(spec.agent_counts), spec.djinn_sweep_cap or 0)


def max_concurrent(spec: ExperimentSpec) -> int:
    """Each agent keeps one request in flight; twice that leaves room for a request a dropped
    client left behind while its retry arrives, so admission never refuses the experiment itself."""
    return max(MIN_CONCURRENT, 2 * largest_agent_count(spec))


def idle_allowance_s(spec: ExperimentSpec) -> float:
    """How long an agent's session and connection may sit idle: its Act phase (sleepSeconds, up to an
    hour) twice over, plus a minute, and never less than the server's defaults."""
    return 2 * spec.sleep_seconds + 60


def sizing_flags(spec: ExperimentSpec) -> list[str]:
    """The size flags of ``python -m djinn.server.server_main`` for ``spec``."""
    idle = idle_allowance_s(spec)
    flags = ["--max-concurrent", str(max_concurrent(spec))]
    if idle > SESSION_TTL_S:
        flags += ["--session-ttl", f"{idle:g}"]
    if idle > DEFAULT_IDLE_TIMEOUT_S:
        flags += ["--idle-timeout", f"{idle:g}"]
    return flags
