"""Result documents: the original experiment scripts' schema, plus the agent-scaling fields.

One document per baseline (and per N for agent scaling), stored at
``results/<baseline>/<timestamp>.json`` (``<timestamp>_n<N>.json`` for agent runs).
"""
from __future__ import annotations

import math
import secrets
from datetime import datetime, timezone
from typing import Literal, Optional

from pydantic import BaseModel, Field


def percentile(values: list[float], q: float) -> Optional[float]:
    """Linear-interpolated percentile (numpy's default), None for no values."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def mean(values: list[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


class RunRecord(BaseModel):
    """One measured decode (Experiment 2.1): prompt prefill + ``new_tokens`` decode steps."""

    run_id: int
    total_ms: float
    per_token_ms: float
    tokens_generated: int
    gpu_util_pct: Optional[float] = None
    memory_bw_gbps: Optional[float] = None
    host_to_device_mb: Optional[float] = None
    device_to_host_mb: Optional[float] = None
    tokens: Optional[list[int]] = None


class StepRecord(BaseModel):
    """One Reason or Reflect step of one agent (Experiment 2.2)."""

    agent_id: int
    round: int = Field(0, description="Which round of fresh agents (minSteps) the step belongs to")
    iteration: int
    phase: Literal["REASON", "REFLECT"]
    latency_ms: float
    input_tokens: int = Field(description="Tokens sent for this step (prompt/history or only the new ones)")
    new_tokens: int
    kv_processed_len: int = Field(0, description="Tokens already in the server-side KV cache before the step")
    started_at_s: float = Field(description="Seconds since the run for this N started")


class Aggregates(BaseModel):
    mean_total_ms: Optional[float] = None
    p95_total_ms: Optional[float] = None
    mean_per_token_ms: Optional[float] = None
    mean_ms: Optional[float] = None
    p50_ms: Optional[float] = None
    p95_ms: Optional[float] = None
    p99_ms: Optional[float] = None
    reason_p50_ms: Optional[float] = None
    reason_p99_ms: Optional[float] = None
    reflect_p50_ms: Optional[float] = None
    reflect_p99_ms: Optional[float] = None
    bytes_per_token: Optional[float] = None


class ResultDocument(BaseModel):
    baseline: str
    experiment: Literal["decode", "agent_scaling"]
    model_id: str
    prompt_tokens: int
    new_tokens: int
    batch_size: int = 1
    n_agents: Optional[int] = None
    iterations: Optional[int] = None
    rounds: Optional[int] = Field(None, description="Rounds of fresh agents pooled into this N's steps")
    sleep_seconds: Optional[float] = None
    oom: bool = False
    error: Optional[str] = None
    traceback: Optional[str] = Field(None, description="The failure's whole traceback, remote parts included")
    backend: str = "native"
    device: str = "cpu"
    djinn_server: Optional[str] = None
    weights: str = Field("synthetic", description="pretrained | synthetic: what was loaded (auto resolved)")
    weights_source: Optional[str] = Field(None, description="Where the weights came from: the model directory "
                                                            "or HF snapshot, or the synthetic config and seed")
    dtype: str = "float32"
    tag: Optional[str] = None
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    runs: list[RunRecord] = Field(default_factory=list)
    steps: list[StepRecord] = Field(default_factory=list)
    aggregates: Aggregates = Field(default_factory=Aggregates)

    def finalize(self) -> "ResultDocument":
        """Fill ``aggregates`` from runs and steps."""
        a = self.aggregates
        totals = [r.total_ms for r in self.runs]
        a.mean_total_ms, a.p95_total_ms = mean(totals), percentile(totals, 95)
        a.mean_per_token_ms = mean([r.per_token_ms for r in self.runs])
        moved = [(r.host_to_device_mb or 0) + (r.device_to_host_mb or 0) for r in self.runs
                 if r.host_to_device_mb is not None]
        tokens = sum(r.tokens_generated for r in self.runs if r.host_to_device_mb is not None)
        a.bytes_per_token = sum(moved) * 1e6 / tokens if moved and tokens else None
        lat = [s.latency_ms for s in self.steps]
        a.mean_ms, a.p50_ms, a.p95_ms, a.p99_ms = (mean(lat), percentile(lat, 50),
                                                   percentile(lat, 95), percentile(lat, 99))
        for phase in ("REASON", "REFLECT"):
            xs = [s.latency_ms for s in self.steps if s.phase == phase]
            setattr(a, f"{phase.lower()}_p50_ms", percentile(xs, 50))
            setattr(a, f"{phase.lower()}_p99_ms", percentile(xs, 99))
        return self


def timestamp() -> str:
    """UTC timestamp plus a random suffix, so two runs never pick the same name."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ") + "-" + secrets.token_hex(3)


def result_key(baseline: str, n_agents: Optional[int] = None, stamp: Optional[str] = None) -> str:
    """Relative key of a result document: ``results/<baseline>/<timestamp>[_n<N>].json``."""
    suffix = f"_n{n_agents}" if n_agents is not None else ""
    return f"results/{baseline}/{stamp or timestamp()}{suffix}.json"
