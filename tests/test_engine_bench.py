"""bench-engine through the wire: a real server with the bench's flags serves every agent over its own connection."""
import argparse

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
