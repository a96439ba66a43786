"""Claims: PASS, FAIL and N/A, with the inputs they were computed from."""
import pytest

from analysis_testdata import agent_doc, scaling_docs
from djinn_analysis.claims import evaluate, status_counts
from djinn_analysis.tables import table2


def claims_of(docs):
    agent = {}
    for d in docs:
        agent.setdefault(d.baseline, {})[d.n_agents] = d
    return {c["id"]: c for c in evaluate(table2(agent))}


def test_seed_claims_pass_at_n32():
    # keep-alive fits one agent (OOM at N=2); Djinn and serverless reach N=32
    c = claims_of(scaling_docs(ns=(1, 2, 4, 8, 16, 32), keepalive_oom_at=2))
    d = c["tenant_density"]
    # Djinn never failed: 32 / 1 is a lower bound, and a lower bound >= 20 proves the claim
    assert d["status"] == "PASS" and d["value"] == pytest.approx(32.0)
    assert d["inputs"]["djinn_agents"]["largest_n_without_failure"] == 32
    assert d["inputs"]["djinn_agents"]["limit"] == "capped at N=32"
    assert d["inputs"]["ray_keepalive"]["largest_n_without_failure"] == 1
    assert d["inputs"]["ray_keepalive"]["first_failure_n"] == 2
    assert d["inputs"]["ray_keepalive"]["limit"] == "measured"
    assert d["inputs"]["capped"] == ["djinn_agents"] and "lower bound" in d["reason"]

    lat = c["latency_ratio"]
    assert lat["status"] == "PASS"
    per_n = {x["n_agents"]: x for x in lat["inputs"]["per_n"]}
    assert sorted(per_n) == [1, 2, 4, 8, 16, 32]
    assert per_n[4]["ray_serverless_p99_ms"] == pytest.approx(6293.0)
    assert per_n[4]["djinn_agents_p99_ms"] == pytest.approx(102.93)
    assert per_n[4]["ratio"] == pytest.approx(6293.0 / 102.93)
    assert lat["value"] == pytest.approx(min(x["ratio"] for x in per_n.values()))

    rs = c["reflect_speedup"]
    assert rs["status"] == "PASS"
    sp = {x["n_agents"]: x for x in rs["inputs"]["per_n"]}
    assert sp[1]["speedup"] == pytest.approx(100 / 10) and sp[1]["in_expected_range"]
    assert sp[32]["speedup"] == pytest.approx(115.5 / 25.5) and not sp[32]["in_expected_range"]

    # N=32: Djinn p99 over 64 steps (REFLECT 10..41, REASON 100..131): rank 62.37
    xs = sorted([10 + a for a in range(32)] + [100 + a for a in range(32)])
    assert c["djinn_p99_n32"]["status"] == "PASS"
    assert c["djinn_p99_n32"]["value"] == pytest.approx(xs[62] + 0.37 * (xs[63] - xs[62]))
    assert c["serverless_p99_n32"]["status"] == "PASS" and c["serverless_p99_n32"]["value"] > 5000


def test_density_lower_bound_below_20_decides_nothing():
    c = claims_of(scaling_docs())  # keep-alive OOM at 4 -> 2 measured; Djinn capped at 8
    d = c["tenant_density"]
    assert d["status"] == "N/A" and d["value"] is None
    assert d["inputs"]["density_lower_bound"] == pytest.approx(4.0) and d["inputs"]["capped"] == ["djinn_agents"]
    assert "8 / 2" in d["reason"] and "djinnSweepCap" in d["reason"]


@pytest.mark.parametrize("failure", [{"oom": True, "error": "DjinnError: out of KV memory"},
                                     {"error": "ConcurrencyLimitExceeded: 65 active requests >= 64 limit"}])
def test_density_measured_on_both_sides(failure):
    # a swept Djinn that fails at 16, for any reason, has a measured limit of 8
    docs = scaling_docs() + [agent_doc("djinn_agents", 16, 0, 0, **failure)]
    d = claims_of(docs)["tenant_density"]
    assert d["status"] == "FAIL" and d["value"] == pytest.approx(4.0) and d["inputs"]["capped"] == []
    assert d["inputs"]["djinn_agents"]["first_failure_n"] == 16 and "both limits measured" in d["reason"]
    docs = scaling_docs(ns=(1, 2, 4, 8, 16, 32, 64), keepalive_oom_at=2) + [agent_doc("djinn_agents", 128, 0, 0, **failure)]
    d = claims_of(docs)["tenant_density"]
    assert d["status"] == "PASS" and d["value"] == pytest.approx(64.0)


def test_keepalive_failure_that_is_not_an_oom_does_not_measure_its_limit():
    docs = [d for d in scaling_docs(keepalive_oom_at=None) if not (d.baseline == "ray_keepalive" and d.n_agents == 8)]
    docs += [agent_doc("ray_keepalive", 8, 0, 0, error="ModuleNotFoundError: No module named 'x'"),
             agent_doc("djinn_agents", 16, 0, 0, oom=True, error="out of memory")]
    d = claims_of(docs)["tenant_density"]
    ka = d["inputs"]["ray_keepalive"]
    assert ka["limit"] == "capped at N=4" and ka["first_failure"].startswith("error: ModuleNotFoundError")
    assert d["inputs"]["capped"] == ["ray_keepalive"] and "not out-of-memory" in d["reason"]
    assert d["status"] == "FAIL" and d["inputs"]["density_upper_bound"] == pytest.approx(2.0)


def test_keepalive_limit_between_a_failure_and_the_first_oom():
    """The 2026-12-04 H200 record: keep-alive failed otherwise at N=11 and ran out of memory at N=12,
    so it holds 10 or 11 agents; Djinn never failed up to 1,024: density >= 1024 / 11."""
    docs = [agent_doc("ray_keepalive", n, 80, 70) for n in range(1, 11)]
    docs += [agent_doc("ray_keepalive", 11, 0, 0, error="RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED"),
             agent_doc("ray_keepalive", 12, 0, 0, oom=True, error="OutOfMemoryError: CUDA out of memory")]
    djinn = [agent_doc("djinn_agents", n, 100, 10) for n in (1, 32, 1024)]
    d = claims_of(docs + djinn)["tenant_density"]
    ka = d["inputs"]["ray_keepalive"]
    assert ka["limit"] == "between N=10 and N=11" and ka["first_oom_n"] == 12
    assert d["status"] == "PASS" and d["value"] == pytest.approx(1024 / 11)
    assert d["inputs"]["capped"] == ["djinn_agents", "ray_keepalive"] and "lower bound" in d["reason"]
    # Djinn measured at 32 (it failed at 64): 32 / 11 <= density <= 32 / 10, FAIL even as an upper bound
    djinn = [agent_doc("djinn_agents", n, 100, 10) for n in (1, 32)] + [agent_doc("djinn_agents", 64, 0, 0, error="x")]
    d = claims_of(docs + djinn)["tenant_density"]
    assert d["status"] == "FAIL" and d["value"] == pytest.approx(3.2)
    assert d["inputs"]["density_lower_bound"] == pytest.approx(32 / 11)


def test_latency_ratio_fails_at_one_n():
    docs = [d for d in scaling_docs() if not (d.baseline == "ray_serverless" and d.n_agents == 2)]
    docs.append(agent_doc("ray_serverless", 2, reason_base=500, reflect_base=400))  # only ~5x Djinn
    lat = claims_of(docs)["latency_ratio"]
    assert lat["status"] == "FAIL"
    assert lat["value"] == pytest.approx(500.99 / 101.0, rel=1e-3)
    assert "N=2" in lat["reason"]


def test_reflect_slower_than_reason_fails():
    docs = [d for d in scaling_docs() if d.baseline != "djinn_agents"]
    docs += [agent_doc("djinn_agents", n, reason_base=50, reflect_base=60) for n in (1, 2, 4, 8)]
    rs = claims_of(docs)["reflect_speedup"]
    assert rs["status"] == "FAIL" and rs["value"] < 1


def test_n32_checks_fail_on_slow_djinn_and_oom():
    docs = [agent_doc("djinn_agents", 32, reason_base=300, reflect_base=250),
            agent_doc("ray_serverless", 32, 0, 0, oom=True, error="CUDA out of memory")]
    c = claims_of(docs)
    assert c["djinn_p99_n32"]["status"] == "FAIL" and c["djinn_p99_n32"]["value"] > 200
    sv = c["serverless_p99_n32"]
    assert sv["status"] == "FAIL" and sv["value"] is None and "OOM" in sv["reason"]


def test_missing_data_is_na_without_numbers():
    c = claims_of([d for d in scaling_docs() if d.baseline == "djinn_agents"])
    for cid in ("tenant_density", "latency_ratio", "djinn_p99_n32", "serverless_p99_n32"):
        assert c[cid]["status"] == "N/A" and c[cid]["value"] is None and c[cid]["reason"], cid
    assert "ray_keepalive" in c["tenant_density"]["reason"]
    assert c["reflect_speedup"]["status"] == "PASS"
    assert status_counts(list(c.values())) == {"PASS": 1, "FAIL": 0, "N/A": 4}
    assert all(cl["status"] == "N/A" for cl in claims_of([]).values())


def test_density_when_keepalive_never_ooms():
    # keep-alive's capacity unknown: an upper bound >= 20 cannot be claimed ...
    docs = [agent_doc("ray_keepalive", 1, 80, 70)] + [agent_doc("djinn_agents", n, 100, 10) for n in (1, 32)]
    docs.append(agent_doc("djinn_agents", 64, 0, 0, error="ConcurrencyLimitExceeded"))
    d = claims_of(docs)["tenant_density"]
    assert d["status"] == "N/A" and d["value"] is None and d["inputs"]["density_upper_bound"] == 32
    assert d["inputs"]["capped"] == ["ray_keepalive"] and "upper bound" in d["reason"]
    # ... but a ratio below 20 is a FAIL even as an upper bound
    docs = [agent_doc("ray_keepalive", 2, 80, 70)] + [agent_doc("djinn_agents", n, 100, 10) for n in (1, 8)]
    docs.append(agent_doc("djinn_agents", 16, 0, 0, oom=True, error="out of memory"))
    d = claims_of(docs)["tenant_density"]
    assert d["status"] == "FAIL" and d["value"] == pytest.approx(4.0)
    # neither side failed: the ratio bounds nothing
    docs = [agent_doc("ray_keepalive", 2, 80, 70), agent_doc("djinn_agents", 64, 100, 10)]
    d = claims_of(docs)["tenant_density"]
    assert d["status"] == "N/A" and d["inputs"]["capped"] == ["djinn_agents", "ray_keepalive"]
    assert "neither limit measured" in d["reason"]


def test_p99_claims_say_when_their_p99_rests_on_few_steps():
    c = claims_of([agent_doc("djinn_agents", 32, 100, 10), agent_doc("ray_serverless", 32, 6000, 5500)])
    assert "fewer than 100 steps at N=32" in c["djinn_p99_n32"]["reason"]
    assert c["djinn_p99_n32"]["inputs"]["steps"] == 64
    assert "fewer than 100 steps at N=32" in c["latency_ratio"]["reason"]
    c = claims_of([agent_doc("djinn_agents", 32, 100, 10, iterations=2), agent_doc("ray_serverless", 32, 6000, 5500, iterations=2)])
    assert "fewer than" not in c["djinn_p99_n32"]["reason"] and "fewer than" not in c["latency_ratio"]["reason"]
