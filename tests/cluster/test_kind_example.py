"""What a kind user runs, executed: ``helm install`` with values-kind.yaml and the example turned on.

Every pod runs as a process (operator, MinIO bucket hook, Djinn server, Ray head, each run Job,
the analysis Job) with the command, args, env and Service addresses the chart and the operator
wrote; a wrong one fails a pod and so the experiment.
"""
from __future__ import annotations

import asyncio
import json
import re
import time

import pytest

from cluster import NAMESPACE, outside_env

from djinn.spec import parse_spec

pytestmark = pytest.mark.timeout(1200)  # the scenario's own deadline fires first, with the pod logs


def _documents(s3, bucket: str, prefix: str) -> dict[str, dict]:
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for o in page.get("Contents", [])]
    return {k[len(prefix):]: json.loads(s3.get_object(Bucket=bucket, Key=k)["Body"].read()) for k in keys}


def _bucket_prefix(uri: str) -> tuple[str, str]:
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    return bucket, prefix


def test_kind_example_runs_to_success_with_real_processes(kind, tmp_path):
    async def scenario(c):
        t0 = time.monotonic()
        name, raw = await c.kind_up()
        spec = parse_spec(raw)
        status = await c.wait_phase(name, ("Succeeded", "Failed"), timeout=840)
        elapsed = time.monotonic() - t0
        print(f"kind example: {status['phase']} after {elapsed:.0f} s, {len(status['runs'])} runs")
        assert status["phase"] == "Succeeded", json.dumps(status, indent=1)

        runs = {(r["baseline"], r.get("n")): r for r in status["runs"]}
        keepalive = sorted(n for (b, n), r in runs.items() if b == "ray_keepalive" and r["state"] == "OOM")
        assert keepalive, "the emulated device memory must run out for Ray keep-alive"
        assert all(r["state"] == "Skipped" for (b, n), r in runs.items() if b == "ray_keepalive" and n > keepalive[0])
        assert all(r["state"] == "Succeeded" for (b, _), r in runs.items() if b != "ray_keepalive")

        # every result document was written by that run's client process, with that run's numbers
        bucket, prefix = _bucket_prefix(status["resultsUri"])
        s3 = c.s3()
        docs = _documents(s3, bucket, f"{prefix}/results/")
        server = f"{name}-djinn-server.{NAMESPACE}.svc:5556"
        for (baseline, n), run in runs.items():
            if run["state"] == "Skipped":
                continue
            doc = docs[run["resultKey"].removeprefix("results/")]
            log = c.logs(run["job"])
            assert doc["baseline"] == baseline and doc.get("n_agents") == n and doc["model_id"] == spec.model_id
            assert doc["device"] == "cpu" and doc["weights"] == "synthetic"
            if n is None:  # a decode mode: every measured run decoded newTokens tokens
                assert len(doc["runs"]) == spec.runs and all(r["tokens_generated"] == spec.new_tokens
                                                              for r in doc["runs"])
                mean = sum(r["total_ms"] for r in doc["runs"]) / spec.runs
                assert f"{baseline}: {spec.runs} runs, mean {mean:.1f} ms" in log, log[-2000:]
                continue
            if doc["oom"]:
                assert "emulated device out of memory" in doc["error"] and f"{baseline} N={n}: OOM" in log
                continue
            assert len(doc["steps"]) == 2 * n * spec.iterations
            assert all(s["latency_ms"] > 0 and s["new_tokens"] == spec.new_tokens for s in doc["steps"])
            assert re.search(rf"{baseline} N={n}: .*p50 {doc['aggregates']['p50_ms']:.1f} ms", log), log[-2000:]
            if baseline == "djinn_agents":
                assert doc["djinn_server"] == server  # the Service name the operator gave the Job
                assert [s["kv_processed_len"] > 0 for s in doc["steps"] if s["phase"] == "REFLECT"] == [True] * n

        # the analysis Job's outputs, reproduced from outside the cluster
        analysis = {k.rsplit("/", 1)[-1]: s3.get_object(Bucket=bucket, Key=k)["Body"].read()
                    for k in [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/analysis/")
                              .get("Contents", [])]}
        assert {"figure6.png", "table2.md", "claims.json", "decode_modes.png"} <= set(analysis)
        assert analysis["figure6.png"].startswith(b"\x89PNG")
        proc = await asyncio.create_subprocess_exec(
            "djinn-bench", "analyze", "--input", status["resultsUri"], "--output", str(tmp_path / "mine"),
            "--endpoint-url", c.s3_endpoint, env=outside_env(c))
        assert await proc.wait() == 0
        mine = tmp_path / "mine" / "analysis"
        assert (mine / "table2.md").read_bytes() == analysis["table2.md"]
        theirs, ours = json.loads(analysis["claims.json"]), json.loads((mine / "claims.json").read_text())
        assert {k: v for k, v in ours.items() if k != "generated_at"} == \
            {k: v for k, v in theirs.items() if k != "generated_at"}

        # finished: the GPU holders are released, only the operator keeps running
        await c.wait("only the operator left", lambda: _only_operator(c), 60)

    kind(scenario, timeout=900)


async def _only_operator(c) -> bool:
    return [p.meta.name.rsplit("-", 1)[0] for p in c.kubelet.pods()] == ["djinn-bench-operator"]
