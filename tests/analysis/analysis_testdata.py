"""Realistic result documents built in code for the analysis tests.

Latencies are chosen so percentiles can be worked out by hand:
agent ``a`` at N has REASON = reason_base + a * step and REFLECT = reflect_base + a * step.
"""
from __future__ import annotations

from typing import Optional

from djinn.results import ResultDocument, RunRecord, StepRecord, result_key
from djinn.storage import LocalStore, put_json


def agent_doc(baseline: str, n: int, reason_base: float, reflect_base: float, step: float = 1.0,
              iterations: int = 1, oom: bool = False, error: Optional[str] = None,
              created_at: Optional[str] = None) -> ResultDocument:
    steps = []
    if not oom and error is None:
        for a in range(n):
            for it in range(iterations):
                t0 = it * 12.0
                steps.append(StepRecord(agent_id=a, iteration=it, phase="REASON",
                                        latency_ms=reason_base + a * step, input_tokens=72, new_tokens=50,
                                        kv_processed_len=0, started_at_s=t0))
                steps.append(StepRecord(agent_id=a, iteration=it, phase="REFLECT",
                                        latency_ms=reflect_base + a * step,
                                        input_tokens=16 if baseline == "djinn_agents" else 138,
                                        new_tokens=50, kv_processed_len=122 if baseline == "djinn_agents" else 0,
                                        started_at_s=t0 + 10.5))
    extra = {"created_at": created_at} if created_at else {}
    return ResultDocument(baseline=baseline, experiment="agent_scaling", model_id="sshleifer/tiny-gpt2",
                          prompt_tokens=72, new_tokens=50, n_agents=n, iterations=iterations,
                          sleep_seconds=10.0, oom=oom, error=error, backend="ray" if "ray" in baseline else "djinn",
                          steps=steps, **extra).finalize()


OOM_ERROR = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"


def scaling_docs(ns=(1, 2, 4, 8), keepalive_oom_at: Optional[int] = 4) -> list[ResultDocument]:
    """Three baselines; keep-alive OOMs at ``keepalive_oom_at`` and runs no larger N."""
    docs = []
    for n in ns:
        docs.append(agent_doc("djinn_agents", n, reason_base=100, reflect_base=10))
        docs.append(agent_doc("ray_serverless", n, reason_base=6000, reflect_base=5500, step=100))
        if keepalive_oom_at is None or n < keepalive_oom_at:
            docs.append(agent_doc("ray_keepalive", n, reason_base=80, reflect_base=70))
        elif n == keepalive_oom_at:
            docs.append(agent_doc("ray_keepalive", n, 0, 0, oom=True, error=OOM_ERROR))
    return docs


DECODE = {  # mode: (per-token ms of the runs, host->device MB per run, device->host MB per run)
    "native_pytorch": ([16.0, 17.0, 18.0], 0.0006, 0.0002),
    "semantic_blind": ([900.0, 950.0, 1000.0], 700.0, 650.0),
    "partially_aware": ([120.0, 125.0, 130.0], 3.0, 2.0),
    "full_djinn": ([20.0, 21.0, 22.0], 0.001, 0.0005),
}


def decode_docs() -> list[ResultDocument]:
    docs = []
    for mode, (per_tok, h2d, d2h) in DECODE.items():
        runs = [RunRecord(run_id=i + 1, total_ms=p * 50, per_token_ms=p, tokens_generated=50,
                          host_to_device_mb=h2d, device_to_host_mb=d2h) for i, p in enumerate(per_tok)]
        docs.append(ResultDocument(baseline=mode, experiment="decode", model_id="sshleifer/tiny-gpt2",
                                   prompt_tokens=72, new_tokens=50, runs=runs).finalize())
    return docs


def write_docs(root, docs) -> list[str]:
    """Store documents the way the runners do (``results/<baseline>/<stamp>[_n<N>].json``)."""
    store = LocalStore(root)
    return [put_json(store, result_key(d.baseline, d.n_agents), d) for d in docs]
