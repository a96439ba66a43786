"""bench-engine through the wire: a real server with the bench's flags serves every agent over its own connection."""
import argparse
import re

import pytest

from djinn.bench import engine_bench


def test_bench_engine_through_the_wire_drives_a_server_sized_for_the_largest_wave(tmp_path):
    p = argparse.ArgumentParser()
    engine_bench.add_arguments(p)
    log = tmp_path / "server.log"
    args = p.parse_args(["--model-id", "sshleifer/tiny-gpt2", "--weights", "synthetic", "--new-tokens", "4",
                         "--agent-counts", "70", "--act-seconds", "0.05", "--through-the-wire",
                         "--server-log", str(log)])
    report = engine_bench.run(args)
    (row,) = report["agents"]
    assert report["through_the_wire"] and "hf_generate_reason_ms" not in report
    # 70 agents at once pass the server's default --max-concurrent (64) only because the bench sizes it
    assert report["server"]["argv"][report["server"]["argv"].index("--max-concurrent") + 1] == "70"
    # the server's own counters saw the wave: 70 prompts and 70 observations prefilled there (each after
    # Reason's last token, whose K/V the Reflect step computes)
    assert row["tokens_prefilled"] == 70 * (report["prompt_tokens"] + 1 + report["observation_tokens"])
    assert row["decode_steps"] >= 3 and row["reason_p99_ms"] >= row["reason_p50_ms"] > 0
    assert report["engine"]["kv_blocks"] > 0 and report["engine_per_token_ms"] > 0
    assert "Reusing session" in log.read_text()  # each agent's Reflect continued its Reason's session
    assert "engine N=1 through the wire" in engine_bench.format_report(report)


@pytest.mark.parametrize("argv, message", [
    (["--agent-counts", "8", "0"], "--agent-counts: each N must be >= 1"),
    (["--new-tokens", "1"], "--new-tokens: must be >= 2"),
    (["--act-seconds", "-1"], "--act-seconds: must be >= 0"),
    (["--through-the-wire", "--server-log", "/nonexistent/dir/server.log"], "--server-log: directory /nonexistent/dir does not exist"),
    (["--json", "/nonexistent/dir/report.json"], "--json: directory /nonexistent/dir does not exist"),
])
def test_bad_bench_flags_are_refused_before_anything_loads(argv, message, monkeypatch):
    import djinn.models.loader as loader

    monkeypatch.setattr(loader, "load_model", lambda *a, **k: pytest.fail("loaded a model for a bad flag"))
    monkeypatch.setattr(loader, "model_on_meta", lambda *a, **k: pytest.fail("read a model for a bad flag"))
    p = argparse.ArgumentParser()
    engine_bench.add_arguments(p)
    with pytest.raises(SystemExit, match="^" + re.escape(message)):
        engine_bench.main(p.parse_args(["--model-id", "sshleifer/tiny-gpt2", "--weights", "synthetic", *argv]))
