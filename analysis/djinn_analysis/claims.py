"""Pure functions: Table 2 rows -> the seed README's claims, each PASS, FAIL or N/A.

Every claim carries the numbers it was computed from (``inputs``) and a one-line
``reason``.  Missing data gives ``N/A`` with ``value: null``, never a made-up number.
"""
from __future__ import annotations

from typing import Optional

from .tables import Table2Row, summaries

PASS, FAIL, NA = "PASS", "FAIL", "N/A"

DJINN, KEEPALIVE, SERVERLESS = "djinn_agents", "ray_keepalive", "ray_serverless"
DENSITY_MIN = 20.0            # "20x density"
LATENCY_RATIO_MIN = 10.0      # "10x latency"
REFLECT_EXPECTED = (5.0, 20.0)  # "REFLECT latency ~5-20x faster than REASON"
CHECK_N = 32                  # validation checklist: "scales to N=32"
DJINN_P99_MAX_MS = 200.0      # "Djinn ... latency stays <200ms"
SERVERLESS_P99_MIN_MS = 5000.0  # "Ray Serverless ... latency grows >5000ms"


def _claim(cid: str, text: str, status: str, value: Optional[float], threshold: str,
           reason: str, inputs: dict) -> dict:
    return {"id": cid, "claim": text, "status": status, "value": value, "threshold": threshold,
            "reason": reason, "inputs": inputs}


def _by(rows: list[Table2Row], baseline: str) -> dict[int, Table2Row]:
    return {r.n_agents: r for r in rows if r.baseline == baseline}


def tenant_density(rows: list[Table2Row]) -> dict:
    text = "Djinn hosts >= 20x more concurrent agents than Ray Keep-Alive before running out of memory"
    thr = f">= {DENSITY_MIN:g}"
    s = summaries(rows)
    dj, ka = s.get(DJINN), s.get(KEEPALIVE)
    inputs = {
        "djinn_agents_max_n_without_oom": dj and dj.max_n_without_oom,
        "djinn_agents_first_oom_n": dj and dj.first_oom_n,
        "djinn_agents_tested_n": list(dj.tested_n) if dj else [],
        "ray_keepalive_max_n_without_oom": ka and ka.max_n_without_oom,
        "ray_keepalive_first_oom_n": ka and ka.first_oom_n,
        "ray_keepalive_tested_n": list(ka.tested_n) if ka else [],
    }
    missing = [b for b, x in ((DJINN, dj), (KEEPALIVE, ka)) if x is None]
    if missing:
        return _claim("tenant_density", text, NA, None, thr,
                      f"no agent-scaling results for {', '.join(missing)}", inputs)
    if ka.max_n_without_oom is None:
        return _claim("tenant_density", text, NA, None, thr,
                      "ray_keepalive completed no N (failed at every tested N); density undefined", inputs)
    dj_n = dj.max_n_without_oom or 0
    ratio = dj_n / ka.max_n_without_oom
    formula = f"{dj_n} / {ka.max_n_without_oom} = {ratio:.2f}"
    if ka.first_oom_n is None:
        inputs["density_upper_bound"] = ratio
        if ratio < DENSITY_MIN:
            return _claim("tenant_density", text, FAIL, ratio, thr,
                          f"{formula} < {DENSITY_MIN:g} even though ray_keepalive never ran out of memory "
                          f"(so this is an upper bound)", inputs)
        return _claim("tenant_density", text, NA, None, thr,
                      f"ray_keepalive never ran out of memory up to N={max(ka.tested_n)}; its capacity is "
                      f"unknown, so density is only bounded above by {formula}; test larger N", inputs)
    note = "" if dj.first_oom_n is not None else \
        f" (Djinn did not run out of memory up to N={max(dj.tested_n)}: a lower bound)"
    ok = ratio >= DENSITY_MIN
    return _claim("tenant_density", text, PASS if ok else FAIL, ratio, thr,
                  f"{formula} {'>=' if ok else '<'} {DENSITY_MIN:g}{note}", inputs)


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
                      "ratio": a.p99_ms / b.p99_ms})
    inputs = {"per_n": per_n, "excluded_n": excluded}
    if not per_n:
        return _claim("latency_ratio", text, NA, None, thr,
                      "no N at which both ray_serverless and djinn_agents completed", inputs)
    worst = min(per_n, key=lambda x: x["ratio"])
    ok = all(x["ratio"] >= LATENCY_RATIO_MIN for x in per_n)
    failing = [x["n_agents"] for x in per_n if x["ratio"] < LATENCY_RATIO_MIN]
    reason = (f"smallest ratio {worst['ratio']:.2f} at N={worst['n_agents']} over N="
              f"{', '.join(str(x['n_agents']) for x in per_n)}"
              + ("" if ok else f"; below {LATENCY_RATIO_MIN:g} at N={', '.join(map(str, failing))}"))
    return _claim("latency_ratio", text, PASS if ok else FAIL, worst["ratio"], thr, reason, inputs)


def reflect_speedup(rows: list[Table2Row]) -> dict:
    text = ("Djinn REFLECT is faster than REASON (KV-cache reuse): REASON p50 / REFLECT p50 > 1 at every N; "
            f"seed expects {REFLECT_EXPECTED[0]:g}-{REFLECT_EXPECTED[1]:g}x")
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
              "p99_ms": r.p99_ms if r else None, "limit_ms": limit}
    if r is None:
        return _claim(cid, text, NA, None, thr, f"{baseline} was not run at N={CHECK_N}", inputs)
    if not r.ok:
        return _claim(cid, text, FAIL, None, thr, f"{baseline} did not complete N={CHECK_N} ({r.status})", inputs)
    ok = r.p99_ms < limit if below else r.p99_ms > limit
    op = ("<" if ok else ">=") if below else (">" if ok else "<=")
    return _claim(cid, text, PASS if ok else FAIL, r.p99_ms, thr,
                  f"p99 {r.p99_ms:.1f} ms {op} {limit:g} ms at N={CHECK_N}", inputs)


def djinn_p99_at_32(rows: list[Table2Row]) -> dict:
    return _p99_at(rows, DJINN, "djinn_p99_n32", f"Djinn scales to N={CHECK_N} with p99 < 200 ms",
                   DJINN_P99_MAX_MS, below=True)


def serverless_p99_at_32(rows: list[Table2Row]) -> dict:
    return _p99_at(rows, SERVERLESS, "serverless_p99_n32",
                   f"Ray Serverless scales to N={CHECK_N} with p99 > 5000 ms", SERVERLESS_P99_MIN_MS, below=False)


def evaluate(rows: list[Table2Row]) -> list[dict]:
    """All claims, in the order the seed README states them."""
    return [tenant_density(rows), latency_ratio(rows), reflect_speedup(rows),
            djinn_p99_at_32(rows), serverless_p99_at_32(rows)]


def status_counts(claims: list[dict]) -> dict[str, int]:
    return {s: sum(c["status"] == s for c in claims) for s in (PASS, FAIL, NA)}
