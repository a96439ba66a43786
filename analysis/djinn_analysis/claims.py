"""Pure functions: Table 2 rows -> the experiment's claims, each PASS, FAIL or N/A.

The claims are those the Djinn paper makes for its agent-scaling experiment (20x tenant
density over Ray keep-alive, 10x lower p99 than Ray serverless, Reflect 5-20x faster than
Reason) and the original experiment's acceptance bounds at N=32 (Djinn p99 < 200 ms,
serverless p99 > 5000 ms). Every claim carries the numbers it was computed from
(``inputs``) and a one-line ``reason``. Missing data gives ``N/A`` with ``value: null``,
never a made-up number; a bound that cannot decide the claim is N/A too.
"""
from __future__ import annotations

from typing import Optional

from .tables import MIN_P99_STEPS, BaselineSummary, Table2Row, summaries

PASS, FAIL, NA = "PASS", "FAIL", "N/A"

DJINN, KEEPALIVE, SERVERLESS = "djinn_agents", "ray_keepalive", "ray_serverless"
DENSITY_MIN = 20.0            # "20x density"
LATENCY_RATIO_MIN = 10.0      # "10x latency"
REFLECT_EXPECTED = (5.0, 20.0)  # "REFLECT latency ~5-20x faster than REASON"
CHECK_N = 32                  # the acceptance bounds are stated at N=32
DJINN_P99_MAX_MS = 200.0      # "Djinn ... latency stays <200ms"
SERVERLESS_P99_MIN_MS = 5000.0  # "Ray Serverless ... latency grows >5000ms"


def _claim(cid: str, text: str, status: str, value: Optional[float], threshold: str,
           reason: str, inputs: dict) -> dict:
    return {"id": cid, "claim": text, "status": status, "value": value, "threshold": threshold,
            "reason": reason, "inputs": inputs}


def _by(rows: list[Table2Row], baseline: str) -> dict[int, Table2Row]:
    return {r.n_agents: r for r in rows if r.baseline == baseline}


def _limit(s: BaselineSummary, needs_oom: bool) -> tuple[Optional[int], Optional[int], dict]:
    """(the largest N shown to fit, the largest N that might fit or None when unbounded, inputs).

    The first number is the largest N completed below the first failure. For Djinn any failure
    bounds it from above (counting one can only lower the ratio). For keep-alive only running out
    of memory does: a different failure first (cuBLAS unable to create a handle, say, recorded
    before such failures counted as out of memory) leaves its limit between that number and the
    largest N tried below its first out-of-memory."""
    f = s.first_failure
    lo = s.largest_n_before_failure
    if needs_oom and f is not None and not f.oom:
        hi = max((n for n in s.tested_n if n < s.first_oom_n), default=None) if s.first_oom_n else None
    else:
        hi = lo if f is not None else None
    if hi == lo and hi is not None:
        limit = "measured"
    elif hi is not None:
        limit = f"between N={lo} and N={hi}"
    else:
        limit = f"capped at N={lo if f else max(s.tested_n)}"
    return lo, hi, {
        "largest_n_without_failure": lo, "tested_n": list(s.tested_n),
        "first_failure_n": f.n_agents if f else None,
        "first_failure": f"{f.status}: {f.error}" if f and f.error else (f.status if f else None),
        "first_oom_n": s.first_oom_n, "limit": limit}


def tenant_density(rows: list[Table2Row]) -> dict:
    """Djinn's limit over keep-alive's, each known exactly or only as a bound: a lower bound on the
    ratio (Djinn's shown / keep-alive's most) can pass the claim, an upper bound (Djinn's measured /
    keep-alive's shown) can fail it, and a ratio bounded on neither side decides nothing."""
    text = ("Djinn hosts >= 20x more concurrent agents than Ray Keep-Alive: Djinn's largest N without "
            "failure over keep-alive's largest N without running out of memory")
    thr = f">= {DENSITY_MIN:g}"
    s = summaries(rows)
    missing = [b for b in (DJINN, KEEPALIVE) if b not in s]
    if missing:
        return _claim("tenant_density", text, NA, None, thr,
                      f"no agent-scaling results for {', '.join(missing)}", {})
    dj_lo, dj_hi, dj_in = _limit(s[DJINN], needs_oom=False)
    ka_lo, ka_hi, ka_in = _limit(s[KEEPALIVE], needs_oom=True)
    capped = [b for b, i in ((DJINN, dj_in), (KEEPALIVE, ka_in)) if i["limit"] != "measured"]
    inputs = {DJINN: dj_in, KEEPALIVE: ka_in, "capped": capped}
    if not ka_lo:
        return _claim("tenant_density", text, NA, None, thr,
                      "ray_keepalive completed no N; density undefined", inputs)
    dj = dj_lo or 0
    low = dj / ka_hi if ka_hi else None               # Djinn at least dj, keep-alive at most ka_hi
    high = dj_hi / ka_lo if dj_hi is not None else None  # Djinn at most dj_hi, keep-alive at least ka_lo
    notes = "; ".join(_limit_note(b, s[b]) for b in capped)
    if not capped:
        ok = high >= DENSITY_MIN
        return _claim("tenant_density", text, PASS if ok else FAIL, high, thr,
                      f"{dj} / {ka_lo} = {high:.2f} {'>=' if ok else '<'} {DENSITY_MIN:g}, both limits measured", inputs)
    if low is not None:
        inputs["density_lower_bound"] = low
    if high is not None:
        inputs["density_upper_bound"] = high
    if low is not None and low >= DENSITY_MIN:
        return _claim("tenant_density", text, PASS, low, thr,
                      f"{dj} / {ka_hi} = {low:.2f} >= {DENSITY_MIN:g}, a lower bound: {notes}", inputs)
    if high is not None and high < DENSITY_MIN:
        return _claim("tenant_density", text, FAIL, high, thr,
                      f"{dj_hi} / {ka_lo} = {high:.2f} < {DENSITY_MIN:g} even as an upper bound: {notes}", inputs)
    if low is None and high is None:
        return _claim("tenant_density", text, NA, None, thr,
                      f"neither limit measured ({notes}); {dj} / {ka_lo} bounds nothing", inputs)
    bound = (f"density >= {dj} / {ka_hi} = {low:.2f}, a lower bound" if low is not None
             else f"density <= {dj_hi} / {ka_lo} = {high:.2f}, an upper bound")
    return _claim("tenant_density", text, NA, None, thr,
                  f"{bound}: {notes}; sweep Djinn further (djinnSweepCap) or keep-alive to its first OOM", inputs)


def _limit_note(baseline: str, s: BaselineSummary) -> str:
    """Why ``baseline``'s limit is only a bound."""
    f = s.first_failure
    if f is None:
        return f"{baseline} did not {'run out of memory' if baseline == KEEPALIVE else 'fail'} up to N={max(s.tested_n)}"
    oom = f", its first out-of-memory at N={s.first_oom_n}" if s.first_oom_n else ""
    return f"{baseline}'s first failure (N={f.n_agents}) was not out-of-memory{oom}"


def _thin(per_n: list[dict], key: str) -> str:
    thin = [x["n_agents"] for x in per_n if x[key] < MIN_P99_STEPS]
    return f"; p99 from fewer than {MIN_P99_STEPS} steps at N={', '.join(map(str, thin))}" if thin else ""


def latency_ratio(rows: list[Table2Row]) -> dict:
    text = "Ray Serverless p99 step latency is >= 10x Djinn's at every N both complete"
    thr = f">= {LATENCY_RATIO_MIN:g} at every common N"
    dj, sv = _by(rows, DJINN), _by(rows, SERVERLESS)
    per_n, excluded = [], []
    for n in sorted(set(dj) | set(sv)):
        a, b = sv.get(n), dj.get(n)
        if not (a and b and a.ok and b.ok and a.p99_ms is not None and b.p99_ms and b.p99_ms > 0):
            excluded.append({"n_agents": n, "ray_serverless": a.status if a else "not run",
                             "djinn_agents": b.status if b else "not run"})
            continue
        per_n.append({"n_agents": n, "ray_serverless_p99_ms": a.p99_ms, "djinn_agents_p99_ms": b.p99_ms,
                      "ratio": a.p99_ms / b.p99_ms, "min_steps": min(a.steps, b.steps)})
    inputs = {"per_n": per_n, "excluded_n": excluded}
    if not per_n:
        return _claim("latency_ratio", text, NA, None, thr,
                      "no N at which both ray_serverless and djinn_agents completed", inputs)
    worst = min(per_n, key=lambda x: x["ratio"])
    ok = all(x["ratio"] >= LATENCY_RATIO_MIN for x in per_n)
    failing = [x["n_agents"] for x in per_n if x["ratio"] < LATENCY_RATIO_MIN]
    reason = (f"smallest ratio {worst['ratio']:.2f} at N={worst['n_agents']} over N="
              f"{', '.join(str(x['n_agents']) for x in per_n)}"
              + ("" if ok else f"; below {LATENCY_RATIO_MIN:g} at N={', '.join(map(str, failing))}")
              + _thin(per_n, "min_steps"))
    return _claim("latency_ratio", text, PASS if ok else FAIL, worst["ratio"], thr, reason, inputs)


def reflect_speedup(rows: list[Table2Row]) -> dict:
    text = ("Djinn REFLECT is faster than REASON (KV-cache reuse): REASON p50 / REFLECT p50 > 1 at every N; "
            f"the paper expects {REFLECT_EXPECTED[0]:g}-{REFLECT_EXPECTED[1]:g}x")
    thr = "> 1 at every N"
    per_n = []
    for n, r in sorted(_by(rows, DJINN).items()):
        if r.ok and r.reason_p50_ms is not None and r.reflect_p50_ms:
            sp = r.reason_p50_ms / r.reflect_p50_ms
            per_n.append({"n_agents": n, "reason_p50_ms": r.reason_p50_ms, "reflect_p50_ms": r.reflect_p50_ms,
                          "speedup": sp,
                          "in_expected_range": REFLECT_EXPECTED[0] <= sp <= REFLECT_EXPECTED[1]})
    inputs = {"per_n": per_n, "expected_range": list(REFLECT_EXPECTED)}
    if not per_n:
        return _claim("reflect_speedup", text, NA, None, thr,
                      "no completed djinn_agents N with both REASON and REFLECT steps", inputs)
    worst = min(per_n, key=lambda x: x["speedup"])
    ok = all(x["speedup"] > 1 for x in per_n)
    in_range = sum(x["in_expected_range"] for x in per_n)
    return _claim("reflect_speedup", text, PASS if ok else FAIL, worst["speedup"], thr,
                  f"smallest speedup {worst['speedup']:.2f}x at N={worst['n_agents']}; "
                  f"{in_range}/{len(per_n)} N within the expected "
                  f"{REFLECT_EXPECTED[0]:g}-{REFLECT_EXPECTED[1]:g}x", inputs)


def _p99_at(rows, baseline, cid, text, limit, below: bool) -> dict:
    thr = f"p99 {'<' if below else '>'} {limit:g} ms at N={CHECK_N}"
    r = _by(rows, baseline).get(CHECK_N)
    inputs = {"baseline": baseline, "n_agents": CHECK_N, "status": r.status if r else "not run",
              "p99_ms": r.p99_ms if r else None, "steps": r.steps if r else 0, "limit_ms": limit}
    if r is None:
        return _claim(cid, text, NA, None, thr, f"{baseline} was not run at N={CHECK_N}", inputs)
    if not r.ok:
        return _claim(cid, text, FAIL, None, thr, f"{baseline} did not complete N={CHECK_N} ({r.status})", inputs)
    ok = r.p99_ms < limit if below else r.p99_ms > limit
    op = ("<" if ok else ">=") if below else (">" if ok else "<=")
    return _claim(cid, text, PASS if ok else FAIL, r.p99_ms, thr,
                  f"p99 {r.p99_ms:.1f} ms {op} {limit:g} ms at N={CHECK_N}"
                  + _thin([{"n_agents": CHECK_N, "steps": r.steps}], "steps"), inputs)


def djinn_p99_at_32(rows: list[Table2Row]) -> dict:
    return _p99_at(rows, DJINN, "djinn_p99_n32", f"Djinn scales to N={CHECK_N} with p99 < 200 ms",
                   DJINN_P99_MAX_MS, below=True)


def serverless_p99_at_32(rows: list[Table2Row]) -> dict:
    return _p99_at(rows, SERVERLESS, "serverless_p99_n32",
                   f"Ray Serverless scales to N={CHECK_N} with p99 > 5000 ms", SERVERLESS_P99_MIN_MS, below=False)


def evaluate(rows: list[Table2Row]) -> list[dict]:
    """All claims, in the order the original experiment states them."""
    return [tenant_density(rows), latency_ratio(rows), reflect_speedup(rows),
            djinn_p99_at_32(rows), serverless_p99_at_32(rows)]


def status_counts(claims: list[dict]) -> dict[str, int]:
    return {s: sum(c["status"] == s for c in claims) for s in (PASS, FAIL, NA)}
