"""Pure functions: result documents -> CSV rows and Table 2 (rows, markdown, CSV text)."""
from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass
from typing import Iterable, Mapping, Optional

from djinn.results import ResultDocument, StepRecord, mean, percentile

from .load import Entry
from .names import AGENT_BASELINES, label, ordered

AgentDocs = Mapping[str, Mapping[int, ResultDocument]]

# Below this many samples a linear-interpolated p99 lies between the two largest samples:
# it is close to the maximum, not an estimate of the tail, so Table 2 marks it.
MIN_P99_STEPS = 100

RESULT_COLUMNS = [
    "experiment", "baseline", "n_agents", "oom", "source_key",
    # agent-scaling step rows
    "agent_id", "iteration", "phase", "latency_ms", "input_tokens", "new_tokens",
    "kv_processed_len", "started_at_s",
    # decode run rows
    "run_id", "total_ms", "per_token_ms", "tokens_generated", "gpu_util_pct",
    "memory_bw_gbps", "host_to_device_mb", "device_to_host_mb",
]


def result_rows(entries: Iterable[Entry]) -> list[dict]:
    """One row per agent step (agent_scaling) and one per decode run (decode)."""
    rows: list[dict] = []
    for e in entries:
        d = e.doc
        base = {"experiment": d.experiment, "baseline": d.baseline, "n_agents": d.n_agents,
                "oom": d.oom, "source_key": e.key}
        if d.experiment == "agent_scaling":
            for s in sorted(d.steps, key=lambda s: (s.agent_id, s.iteration, s.phase != "REASON")):
                rows.append({**base, "agent_id": s.agent_id, "iteration": s.iteration, "phase": s.phase,
                             "latency_ms": s.latency_ms, "input_tokens": s.input_tokens,
                             "new_tokens": s.new_tokens, "kv_processed_len": s.kv_processed_len,
                             "started_at_s": s.started_at_s})
        else:
            for r in d.runs:
                rows.append({**base, "run_id": r.run_id, "total_ms": r.total_ms,
                             "per_token_ms": r.per_token_ms, "tokens_generated": r.tokens_generated,
                             "gpu_util_pct": r.gpu_util_pct, "memory_bw_gbps": r.memory_bw_gbps,
                             "host_to_device_mb": r.host_to_device_mb,
                             "device_to_host_mb": r.device_to_host_mb})
    return rows


@dataclass(frozen=True)
class Table2Row:
    baseline: str
    n_agents: int
    status: str            # "ok", "OOM", "error" or "no steps"
    oom: bool
    steps: int
    reason_steps: int
    reflect_steps: int
    mean_ms: Optional[float]
    p50_ms: Optional[float]
    p99_ms: Optional[float]
    reason_p50_ms: Optional[float]
    reason_p99_ms: Optional[float]
    reflect_p50_ms: Optional[float]
    reflect_p99_ms: Optional[float]
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def thin_p99(self) -> bool:
        """The p99 over all steps rests on fewer than MIN_P99_STEPS samples."""
        return self.steps < MIN_P99_STEPS


@dataclass(frozen=True)
class BaselineSummary:
    baseline: str
    tested_n: tuple[int, ...]
    max_n_without_oom: Optional[int]   # largest N that completed (no OOM, no error, has steps)
    first_oom_n: Optional[int]         # smallest N that ran out of memory
    first_failure: Optional[Table2Row] = None   # smallest N that did not complete, for any reason
    completed_n: tuple[int, ...] = ()

    @property
    def largest_n_before_failure(self) -> Optional[int]:
        """Largest completed N below the first failure (the largest completed N when none failed)."""
        limit = self.first_failure.n_agents if self.first_failure else float("inf")
        ok = [n for n in self.completed_n if n < limit]
        return max(ok) if ok else None


def status_of(doc: ResultDocument) -> str:
    if doc.oom:
        return "OOM"
    if doc.error:
        return "error"
    if not doc.steps:
        return "no steps"
    return "ok"


def step_stats(steps: list[StepRecord]) -> dict[str, Optional[float]]:
    """mean/p50/p99 over all steps, p50/p99 per phase (None where there are no steps)."""
    lat = [s.latency_ms for s in steps]
    reason = [s.latency_ms for s in steps if s.phase == "REASON"]
    reflect = [s.latency_ms for s in steps if s.phase == "REFLECT"]
    return {"mean_ms": mean(lat), "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99),
            "reason_p50_ms": percentile(reason, 50), "reason_p99_ms": percentile(reason, 99),
            "reflect_p50_ms": percentile(reflect, 50), "reflect_p99_ms": percentile(reflect, 99)}


def table2(agent: AgentDocs) -> list[Table2Row]:
    """One row per baseline and N, baselines in paper order, N ascending."""
    rows = []
    for b in ordered(agent, AGENT_BASELINES):
        for n in sorted(agent[b]):
            d = agent[b][n]
            rows.append(Table2Row(baseline=b, n_agents=n, status=status_of(d), oom=d.oom, steps=len(d.steps),
                                  reason_steps=sum(s.phase == "REASON" for s in d.steps),
                                  reflect_steps=sum(s.phase == "REFLECT" for s in d.steps),
                                  error=d.error, **step_stats(d.steps)))
    return rows


def summaries(rows: list[Table2Row]) -> dict[str, BaselineSummary]:
    out = {}
    for b in dict.fromkeys(r.baseline for r in rows):
        mine = [r for r in rows if r.baseline == b]
        ok = [r.n_agents for r in mine if r.ok]
        oom = [r.n_agents for r in mine if r.oom]
        failed = [r for r in mine if not r.ok]
        out[b] = BaselineSummary(b, tuple(r.n_agents for r in mine), max(ok) if ok else None,
                                 min(oom) if oom else None,
                                 min(failed, key=lambda r: r.n_agents) if failed else None, tuple(ok))
    return out


def _fmt(x: Optional[float]) -> str:
    if x is None:
        return "—"
    return f"{x:,.2f}" if abs(x) < 100 else f"{x:,.0f}" if abs(x) >= 10_000 else f"{x:,.1f}"


def _p99(x: Optional[float], samples: int) -> str:
    """A p99 cell; ``*`` when it rests on fewer than MIN_P99_STEPS samples."""
    return _fmt(x) + ("*" if x is not None and samples < MIN_P99_STEPS else "")


def _first_failure(s: BaselineSummary) -> str:
    f = s.first_failure
    if f is None:
        return f"none up to N={max(s.tested_n)} (capped)"
    return f"N={f.n_agents} ({f.status})"


def table2_markdown(rows: list[Table2Row]) -> str:
    if not rows:
        return "# Table 2: agent scaling\n\nNo agent-scaling result documents were found.\n"
    lines = [
        "# Table 2: agent scaling (step latency, ms)",
        "",
        "Latency over all REASON and REFLECT steps of all agents at each N; each latency column "
        "is computed from the step count in the Steps column to its left. Percentiles are "
        f"linear-interpolated; `*` marks a p99 from fewer than {MIN_P99_STEPS} steps, which lies between "
        "the largest two samples: close to the maximum, not a tail estimate.",
        "",
        "| Baseline | N | Status | Steps | Mean | p50 | p99 | REASON steps | REASON p50 | REASON p99 "
        "| REFLECT steps | REFLECT p50 | REFLECT p99 |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {label(r.baseline)} | {r.n_agents} | {r.status} | {r.steps} | {_fmt(r.mean_ms)} "
                     f"| {_fmt(r.p50_ms)} | {_p99(r.p99_ms, r.steps)} | {r.reason_steps} | {_fmt(r.reason_p50_ms)} "
                     f"| {_p99(r.reason_p99_ms, r.reason_steps)} | {r.reflect_steps} | {_fmt(r.reflect_p50_ms)} "
                     f"| {_p99(r.reflect_p99_ms, r.reflect_steps)} |")
    lines += ["", "## Largest N without failure", "",
              "| Baseline | Tested N | Largest N without failure | First failure | First OOM at N |",
              "|---|---|---:|---|---:|"]
    for s in summaries(rows).values():
        best = s.largest_n_before_failure
        lines.append(f"| {label(s.baseline)} | {', '.join(map(str, s.tested_n))} "
                     f"| {best if best is not None else 'none'} | {_first_failure(s)} "
                     f"| {s.first_oom_n if s.first_oom_n is not None else 'no OOM'} |")
    errors = [r for r in rows if r.error]
    if errors:
        lines += ["", "Errors recorded by the runs:", ""]
        lines += [f"- {label(r.baseline)} N={r.n_agents}: {r.error.splitlines()[0][:200]}" for r in errors]
    return "\n".join(lines) + "\n"


THIN_P99_COLUMN = f"p99_from_fewer_than_{MIN_P99_STEPS}_steps"
TABLE2_COLUMNS = ["baseline", "n_agents", "status", "oom", "steps", "mean_ms", "p50_ms", "p99_ms",
                  "reason_steps", "reason_p50_ms", "reason_p99_ms", "reflect_steps", "reflect_p50_ms",
                  "reflect_p99_ms", THIN_P99_COLUMN, "baseline_largest_n_without_failure",
                  "baseline_first_failure_n", "baseline_max_n_without_oom", "baseline_first_oom_n", "error"]


def table2_csv(rows: list[Table2Row]) -> str:
    s = summaries(rows)
    return to_csv([{**asdict(r), THIN_P99_COLUMN: r.thin_p99,
                    "baseline_largest_n_without_failure": s[r.baseline].largest_n_before_failure,
                    "baseline_first_failure_n": s[r.baseline].first_failure and s[r.baseline].first_failure.n_agents,
                    "baseline_max_n_without_oom": s[r.baseline].max_n_without_oom,
                    "baseline_first_oom_n": s[r.baseline].first_oom_n} for r in rows], TABLE2_COLUMNS)


def to_csv(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buf.getvalue()
