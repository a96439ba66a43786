"""Pure planning of an agent-scaling baseline: which N to run, and in how many rounds.

Kept apart from the runner so the choices can be tested without a model, Ray or a server.
"""
from __future__ import annotations

import math

from djinn.spec import Baseline, ExperimentSpec


def agent_counts(spec: ExperimentSpec, baseline: Baseline) -> list[int]:
    """The spec's agentCounts; for djinn_agents with ``djinnSweepCap`` also N doubled past the
    largest of them up to the cap (the cap itself last), so Djinn's limit is measured, not assumed."""
    counts = list(spec.agent_counts)
    if baseline != Baseline.djinn_agents or spec.djinn_sweep_cap is None:
        return counts
    n = counts[-1]
    while n < spec.djinn_sweep_cap:
        n = min(2 * n, spec.djinn_sweep_cap)
        counts.append(n)
    return counts


def stops_at_first_failure(spec: ExperimentSpec, baseline: Baseline) -> bool:
    """A swept djinn_agents stops at its first failure of any kind: the sweep looks for that N."""
    return baseline == Baseline.djinn_agents and spec.djinn_sweep_cap is not None


def rounds(spec: ExperimentSpec, n: int) -> int:
    """Rounds of fresh agents at ``n`` so that at least ``minSteps`` steps are measured.

    One round gives 2 x n x iterations steps. More iterations would grow each agent's history
    (about 130 tokens per cycle at 50 new tokens) past a server's --max-seq-len; more rounds do not.
    """
    if spec.min_steps is None:
        return 1
    return max(1, math.ceil(spec.min_steps / (2 * n * spec.iterations)))
