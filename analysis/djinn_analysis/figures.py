"""Figure 6 (p99 step latency vs N) and the Experiment 2.1 decode-mode plot.

Figures are drawn on matplotlib's Agg canvas without pyplot (no global state, no
display needed) and returned as bytes, so the caller decides where they go.
"""
from __future__ import annotations

import io
import math
from typing import Mapping, Optional

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, NullLocator

from djinn.results import ResultDocument, mean, percentile

from .names import AGENT_BASELINES, DECODE_MODES, label, ordered
from .tables import MIN_P99_STEPS, Table2Row

COLORS = {"ray_keepalive": "#d95f02", "ray_serverless": "#1f78b4", "djinn_agents": "#1b9e77",
          "native_pytorch": "#7f7f7f", "semantic_blind": "#d95f02", "partially_aware": "#e6ab02",
          "full_djinn": "#1b9e77"}
MARKERS = {"ray_keepalive": "s", "ray_serverless": "^", "djinn_agents": "o"}
FALLBACK = ["#7570b3", "#e7298a", "#66a61e", "#a6761d", "#666666"]


def _color(name: str, i: int) -> str:
    return COLORS.get(name, FALLBACK[i % len(FALLBACK)])


def render(fig: Figure, fmt: str) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=150 if fmt == "png" else None, bbox_inches="tight")
    return buf.getvalue()


def figure6(rows: list[Table2Row]) -> Figure:
    """p99 step latency vs N per baseline; log y; a red X where a baseline ran out of memory;
    a hollow marker where the p99 rests on fewer than MIN_P99_STEPS steps."""
    fig = Figure(figsize=(7.5, 4.8))
    ax = fig.add_subplot()
    baselines = ordered({r.baseline for r in rows}, AGENT_BASELINES)
    ok_values = [r.p99_ms for r in rows if r.ok and r.p99_ms and r.p99_ms > 0]
    y_fallback = (min(ok_values) * max(ok_values)) ** 0.5 if ok_values else 100.0
    handles, any_oom, any_err, any_thin = [], False, False, False
    for i, b in enumerate(baselines):
        mine = sorted((r for r in rows if r.baseline == b), key=lambda r: r.n_agents)
        ok = [r for r in mine if r.ok and r.p99_ms and r.p99_ms > 0]
        color = _color(b, i)
        (line,) = ax.plot([r.n_agents for r in ok], [r.p99_ms for r in ok], color=color, lw=2,
                          marker=MARKERS.get(b, "D"), ms=7, label=label(b), zorder=3)
        handles.append(line)
        thin = [r for r in ok if r.thin_p99]
        if thin:  # hollow: a p99 of fewer than MIN_P99_STEPS steps is close to the maximum
            any_thin = True
            ax.plot([r.n_agents for r in thin], [r.p99_ms for r in thin], marker=MARKERS.get(b, "D"), ms=7,
                    mfc="white", mec=color, mew=1.5, ls="none", zorder=4)
        first_oom = True
        for r in mine:
            if r.ok:
                continue
            before = [o for o in ok if o.n_agents < r.n_agents]
            y = before[-1].p99_ms if before else (ok[0].p99_ms if ok else y_fallback)
            if r.oom:
                any_oom = True
                if before:  # dotted stub from the last completed N: the line ends at the OOM
                    ax.plot([before[-1].n_agents, r.n_agents], [y, y], color=color, lw=1.2, ls=":", zorder=2)
                ax.plot([r.n_agents], [y], marker="X", color="red", ms=14, mec="darkred", mew=1.2,
                        ls="none", zorder=5)
                if first_oom:
                    ax.annotate(f"{label(b)}: OOM at N={r.n_agents}", (r.n_agents, y),
                                textcoords="offset points", xytext=(10, -10), va="top", color="darkred",
                                fontsize=9, fontweight="bold",
                                bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.85})
                    first_oom = False
            else:
                any_err = True
                ax.plot([r.n_agents], [y], marker="D", mfc="none", mec="black", ms=9, mew=1.5,
                        ls="none", zorder=5)
    if any_oom:
        handles.append(Line2D([], [], marker="X", color="red", mec="darkred", ms=11, ls="none",
                              label="out of GPU memory (line stops)"))
    if any_err:
        handles.append(Line2D([], [], marker="D", mfc="none", mec="black", ms=8, ls="none",
                              label="run failed (non-OOM error)"))
    if any_thin:
        handles.append(Line2D([], [], marker="o", mfc="white", mec="black", ms=7, ls="none",
                              label=f"hollow: p99 of fewer than {MIN_P99_STEPS} steps"))
    ns = sorted({r.n_agents for r in rows})
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(ns))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels(_spaced_labels(ns))
    if ns:
        ax.set_xlim(ns[0] / 1.3, ns[-1] * 1.5)
    ax.set_yscale("log")
    if ok_values:  # headroom for the OOM label and at least one decade label above and below
        ax.set_ylim(min(ok_values) / 2.5, max(ok_values) * 2.5)
    ax.set_xlabel("Concurrent agents (N)")
    ax.set_ylabel("p99 step latency (ms, log scale)")
    ax.set_title("Figure 6: p99 step latency vs concurrent agents")
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", axis="y", alpha=0.12)
    if handles:
        # below the axes: with N up to the thousands every corner of the plot holds data
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3,
                  frameon=False, fontsize=9)
    if not rows:
        ax.text(0.5, 0.5, "no agent-scaling results", transform=ax.transAxes, ha="center")
    fig.tight_layout()
    return fig


def decode_stats(decode: Mapping[str, ResultDocument]) -> list[dict]:
    """Per mode: mean/p50/p95 per-token latency and bytes moved per generated token."""
    out = []
    for mode in ordered(decode, DECODE_MODES):
        d = decode[mode]
        per_tok = [r.per_token_ms for r in d.runs]
        agg = d.model_copy(deep=True).finalize().aggregates  # bytes/token as the runner defines it
        out.append({"mode": mode, "runs": len(d.runs), "mean_per_token_ms": mean(per_tok),
                    "p50_per_token_ms": percentile(per_tok, 50), "p95_per_token_ms": percentile(per_tok, 95),
                    "bytes_per_token": agg.bytes_per_token})
    return out


def _human_bytes(x: Optional[float]) -> str:
    if x is None:
        return "n/a"
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if x >= f:
            return f"{x / f:.3g} {unit}"
    return f"{x:.3g} B"


def decode_figure(stats: list[dict]) -> Figure:
    """Experiment 2.1: per-token latency and bytes/token per decode mode (bytes on a log axis)."""
    fig = Figure(figsize=(10, 4.3))
    ax_lat, ax_b = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    xs = list(range(len(stats)))
    names = [label(s["mode"]) for s in stats]
    colors = [_color(s["mode"], i) for i, s in enumerate(stats)]

    lat = [s["mean_per_token_ms"] or 0 for s in stats]
    err_hi = [max(0.0, (s["p95_per_token_ms"] or 0) - (s["mean_per_token_ms"] or 0)) for s in stats]
    ax_lat.bar(xs, lat, color=colors, yerr=[[0] * len(xs), err_hi], capsize=4, edgecolor="black", lw=0.6)
    positive = [v for v in lat if v > 0]
    if positive and max(positive) / min(positive) > 20:
        ax_lat.set_yscale("log")
        ax_lat.set_ylim(min(positive) / 3, max(positive) * 3)
    for x, s, v in zip(xs, stats, lat):
        ax_lat.annotate("n/a" if s["mean_per_token_ms"] is None else f"{v:.3g} ms", (x, v or 0),
                        textcoords="offset points", xytext=(0, 4), ha="center", fontsize=8)
    ax_lat.set_ylabel("per-token latency (ms; bar mean, whisker p95)")
    ax_lat.set_title("Per-token decode latency")

    bpt = [s["bytes_per_token"] for s in stats]
    heights = [v if v and v > 0 else 0 for v in bpt]
    ax_b.bar(xs, heights, color=colors, edgecolor="black", lw=0.6)
    ax_b.set_yscale("log")
    pos = [h for h in heights if h > 0]
    if pos:
        ax_b.set_ylim(min(pos) / 5, max(pos) * 8)
    base = min(pos) / 5 if pos else 1
    for x, v in zip(xs, bpt):
        ax_b.annotate(_human_bytes(v) if v else ("0 B" if v == 0 else "n/a"), (x, v if v and v > 0 else base),
                      textcoords="offset points", xytext=(0, 4), ha="center", fontsize=8)
    ax_b.set_ylabel("host↔device bytes per token (log scale)")
    ax_b.set_title("Data moved per generated token")
    for ax in (ax_lat, ax_b):
        ax.set_xticks(xs)
        ax.set_xticklabels(names, rotation=15)
        ax.grid(True, axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    fig.suptitle("Experiment 2.1: decode modes")
    fig.tight_layout()
    return fig


def _spaced_labels(ns: list[int], min_gap: float = 0.4) -> list[str]:
    """A label for each tick at least ``min_gap`` octaves from the last labelled one (keep-alive
    at every N from 1 to 12 would print its labels on top of each other); the others stay blank."""
    labels, last = [], None
    for n in ns:
        show = last is None or math.log2(n) - math.log2(last) >= min_gap
        labels.append(str(n) if show else "")
        last = n if show else last
    return labels
