"""Table 2 and CSV rows against hand-computed numbers."""
import csv
import io

import pytest

from analysis_testdata import agent_doc, decode_docs, scaling_docs
from djinn_analysis.load import Entry, select_documents
from djinn_analysis.tables import (RESULT_COLUMNS, result_rows, summaries, table2, table2_csv,
                                   table2_markdown, to_csv)


def agent_map(docs):
    out = {}
    for d in docs:
        out.setdefault(d.baseline, {})[d.n_agents] = d
    return out


def row(rows, baseline, n):
    (r,) = [r for r in rows if r.baseline == baseline and r.n_agents == n]
    return r


def test_djinn_n4_numbers_match_hand_computed_percentiles():
    rows = table2(agent_map(scaling_docs()))
    r = row(rows, "djinn_agents", 4)
    # steps: REASON 100,101,102,103 and REFLECT 10,11,12,13 -> sorted 10..13,100..103
    assert r.status == "ok" and r.steps == 8 and not r.oom
    assert r.mean_ms == pytest.approx((10 + 11 + 12 + 13 + 100 + 101 + 102 + 103) / 8)  # 56.5
    assert r.p50_ms == pytest.approx((13 + 100) / 2)              # rank 3.5
    assert r.p99_ms == pytest.approx(102 + 0.93 * (103 - 102))   # rank 6.93
    assert r.reason_p50_ms == pytest.approx(101.5)
    assert r.reason_p99_ms == pytest.approx(102 + 0.97)          # rank 2.97 of 4
    assert r.reflect_p50_ms == pytest.approx(11.5)
    assert r.reflect_p99_ms == pytest.approx(12.97)


def test_serverless_n8_p99_over_all_agents():
    r = row(table2(agent_map(scaling_docs())), "ray_serverless", 8)
    # REFLECT 5500..6200 and REASON 6000..6700 step 100: 16 values, p99 rank 14.85
    xs = sorted([5500 + 100 * a for a in range(8)] + [6000 + 100 * a for a in range(8)])
    assert xs[14] == 6600 and xs[15] == 6700
    assert r.p99_ms == pytest.approx(6600 + 0.85 * 100)
    assert r.mean_ms == pytest.approx(sum(xs) / 16)


def test_oom_row_and_largest_n_without_oom():
    rows = table2(agent_map(scaling_docs()))
    oom = row(rows, "ray_keepalive", 4)
    assert oom.oom and oom.status == "OOM" and oom.steps == 0 and oom.p99_ms is None
    s = summaries(rows)
    assert s["ray_keepalive"].max_n_without_oom == 2 and s["ray_keepalive"].first_oom_n == 4
    assert s["djinn_agents"].max_n_without_oom == 8 and s["djinn_agents"].first_oom_n is None
    assert [r.baseline for r in rows][:3] == ["ray_keepalive"] * 3  # paper order, N ascending
    assert [r.n_agents for r in rows if r.baseline == "djinn_agents"] == [1, 2, 4, 8]


def test_error_run_is_not_counted_as_completed():
    docs = scaling_docs() + [agent_doc("djinn_agents", 16, 0, 0, error="ConnectionRefusedError: [Errno 111]"),
                             agent_doc("djinn_agents", 32, 100, 10)]
    s = summaries(table2(agent_map(docs)))
    assert s["djinn_agents"].max_n_without_oom == 32 and s["djinn_agents"].first_oom_n is None
    # the first failure ends what the baseline is known to sustain, whatever completed after it
    assert s["djinn_agents"].first_failure.n_agents == 16 and s["djinn_agents"].largest_n_before_failure == 8
    assert s["djinn_agents"].tested_n == (1, 2, 4, 8, 16, 32)


def test_markdown_and_csv():
    rows = table2(agent_map(scaling_docs()))
    md = table2_markdown(rows)
    # every latency cell next to its sample count; p99 of 8 (or 4) steps is marked
    assert "| Djinn | 4 | ok | 8 | 56.50 | 56.50 | 102.9* | 4 | 101.5 | 103.0* | 4 | 11.50 | 12.97* |" in md
    assert "| Ray Keep-Alive | 1, 2, 4 | 2 | N=4 (OOM) | 4 |" in md
    assert "| Djinn | 1, 2, 4, 8 | 8 | none up to N=8 (capped) | no OOM |" in md
    assert "| Ray Keep-Alive | 4 | OOM | 0 | — | — | — | 0 | — | — | 0 | — | — |" in md
    parsed = list(csv.DictReader(io.StringIO(table2_csv(rows))))
    assert len(parsed) == 11  # 3 keep-alive + 4 serverless + 4 djinn
    ka4 = [p for p in parsed if p["baseline"] == "ray_keepalive" and p["n_agents"] == "4"][0]
    assert ka4["oom"] == "True" and ka4["p99_ms"] == "" and ka4["baseline_max_n_without_oom"] == "2"
    assert ka4["baseline_first_failure_n"] == "4" and ka4["baseline_largest_n_without_failure"] == "2"
    dj4 = [p for p in parsed if p["baseline"] == "djinn_agents" and p["n_agents"] == "4"][0]
    assert float(dj4["p99_ms"]) == pytest.approx(102.93)
    assert (dj4["steps"], dj4["reason_steps"], dj4["reflect_steps"]) == ("8", "4", "4")
    assert dj4["p99_from_fewer_than_100_steps"] == "True"


def test_p99_of_100_steps_or_more_is_not_marked():
    # 52 iterations x 1 agent: 104 steps, 52 per phase
    [r] = table2(agent_map([agent_doc("djinn_agents", 1, 100, 10, iterations=52)]))
    assert (r.steps, r.reason_steps, r.reflect_steps, r.thin_p99) == (104, 52, 52, False)
    line = [l for l in table2_markdown([r]).splitlines() if l.startswith("| Djinn | 1 |")][0]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[3] == "104" and not cells[6].endswith("*")        # all steps: 104, unmarked
    assert cells[7] == "52" and cells[9].endswith("*")             # REASON: 52 steps, marked
    assert cells[10] == "52" and cells[12].endswith("*")
    assert table2_markdown([]).startswith("# Table 2") and "No agent-scaling" in table2_markdown([])


def test_result_rows_one_per_step_and_per_decode_run():
    docs = scaling_docs() + decode_docs()
    entries, _, _ = select_documents(Entry(f"results/{d.baseline}/{i}.json", d) for i, d in enumerate(docs))
    rows = result_rows(entries)
    steps = sum(len(d.steps) for d in docs)
    assert steps == 2 * (1 + 2 + 4 + 8) * 2 + 2 * (1 + 2)   # djinn+serverless, keep-alive N=1,2
    assert len(rows) == steps + 4 * 3
    parsed = list(csv.DictReader(io.StringIO(to_csv(rows, RESULT_COLUMNS))))
    assert list(parsed[0]) == RESULT_COLUMNS
    dj = [p for p in parsed if p["baseline"] == "djinn_agents" and p["n_agents"] == "2"]
    assert [(p["agent_id"], p["phase"], p["latency_ms"]) for p in dj] == [
        ("0", "REASON", "100.0"), ("0", "REFLECT", "10.0"), ("1", "REASON", "101.0"), ("1", "REFLECT", "11.0")]
    fd = [p for p in parsed if p["baseline"] == "full_djinn"]
    assert [p["per_token_ms"] for p in fd] == ["20.0", "21.0", "22.0"] and fd[0]["phase"] == ""
