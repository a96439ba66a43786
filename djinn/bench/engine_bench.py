"""``djinn-bench bench-engine``: the engine against the hardware floor and HF generate.

Prints, in one run: the measured copy bandwidth and the weight-read floor of one
decode step; HF ``generate`` at batch 1; the engine's N=1 per-token latency and
its ratio to the floor; p50/p99 Reason and Reflect latency for each N with an
Act sleep between them; tokens/s; GPU memory held; and whether the engine's
greedy tokens equal HF ``generate``'s. The engine is driven in-process (no
network), so the numbers are the engine's own.
"""
from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import torch

from djinn.bench.roofline import phase_roofline_ms
from djinn.server.server_main import add_engine_arguments, engine_config_errors
from djinn.results import percentile


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 2 << 30) -> float:
    """Device-to-device copy, bytes read + written per second (median of 10)."""
    if device.type != "cuda":
        return float("nan")
    a = torch.empty(nbytes // 2, dtype=torch.float16, device=device).normal_()
    b = torch.empty_like(a)
    times = []
    for _ in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(times[3:]) / 1e9


def gemm_tflops(device: torch.device, dtype: torch.dtype, size: int = 8192) -> float:
    """Dense matmul rate at ``dtype`` (median of 10, after warm-up): the prefill side of the roofline."""
    if device.type != "cuda":
        return float("nan")
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    times = []
    for _ in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * size ** 3 / statistics.median(times[3:]) / 1e12


def timed(fn, repeat: int = 3) -> float:
    """Median wall ms of ``fn`` after one warm-up."""
    fn()
    _sync()
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync()
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


def logit_gap(model, prompt: list[int], generated: list[int]) -> float:
    """Teacher-forced check of a greedy continuation: the largest gap between the best logit and the
    chosen token's logit under HF's own forward. 0 means every token was HF's argmax; a tiny gap
    means a near-tie that half-precision rounding may break either way."""
    ids = torch.tensor([prompt + generated], device=next(model.parameters()).device)
    with torch.inference_mode():
        logits = model(ids).logits[0, len(prompt) - 1:-1].float()
    chosen = logits.gather(1, torch.tensor(generated, device=ids.device)[:, None])[:, 0]
    return float((logits.max(-1).values - chosen).max())


def agents_round(engine, n: int, prompt: list[int], observation: list[int], new_tokens: int, act_s: float) -> dict:
    """N agents: Reason (prompt + new_tokens) -> Act (sleep) -> Reflect (observation + new_tokens)."""
    lat: dict[str, list[float]] = {"REASON": [], "REFLECT": []}
    lock = threading.Lock()
    barrier = threading.Barrier(n)
    sessions = [engine.open_session().result() for _ in range(n)]
    reason_window = [float("inf"), 0.0]

    def agent(i: int) -> None:
        barrier.wait()
        for phase, toks in (("REASON", [t + i % 7 for t in prompt]), ("REFLECT", observation)):
            t0 = time.perf_counter()
            engine.generate(sessions[i].id, toks, new_tokens).result()
            t1 = time.perf_counter()
            with lock:
                lat[phase].append((t1 - t0) * 1e3)
                if phase == "REASON":
                    reason_window[0], reason_window[1] = min(reason_window[0], t0), max(reason_window[1], t1)
            if phase == "REASON":
                time.sleep(act_s)

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(n)]
    stats0 = dict(engine.stats)
    [t.start() for t in threads]
    [t.join() for t in threads]
    for s in sessions:
        engine.close_session(s.id).result()
    row = {"n": n}
    for phase, xs in lat.items():
        row[f"{phase.lower()}_p50_ms"] = percentile(xs, 50)
        row[f"{phase.lower()}_p99_ms"] = percentile(xs, 99)
    row["reason_tokens_per_s"] = n * new_tokens / (reason_window[1] - reason_window[0])
    for key in ("admit_ms", "decode_ms", "prefill_ms", "decode_steps", "decode_calls", "prefill_calls",
                "tokens_prefilled"):
        row[key] = engine.stats[key] - stats0[key]
    row["parks"] = engine.stats["parks"] - stats0["parks"]
    row["restores"] = engine.stats["restores"] - stats0["restores"]
    return row


def run(args: argparse.Namespace) -> dict:
    from djinn.models.loader import load_model
    from djinn.runners.common import OBSERVATION, prompt_text
    from djinn.runners.hf_agent import greedy
    from djinn.server.config import ServerConfig
    from djinn.server.service import build_engine
    from djinn.spec import ExperimentSpec

    lm = load_model(args.model_id, args.weights, args.dtype, args.device, quiet=True)
    dev = lm.device
    report: dict = {"model_id": args.model_id, "weights": lm.weights, "dtype": str(lm.dtype), "device": str(dev),
                    "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
                    "torch": torch.__version__, "weight_bytes": lm.weight_bytes}
    bw = copy_bandwidth_gbps(dev)
    report["copy_bandwidth_gbps"] = bw
    report["gemm_tflops"] = gemm_tflops(dev, lm.dtype)
    report["decode_floor_ms"] = lm.weight_bytes / (bw * 1e9) * 1e3 if bw == bw else None
    prompt = lm.tokenizer.encode(prompt_text(ExperimentSpec()))
    obs = lm.tokenizer.encode(OBSERVATION)
    report["prompt_tokens"], report["observation_tokens"] = len(prompt), len(obs)
    n_new = args.new_tokens

    hf_reason = timed(lambda: greedy(lm.model, prompt, n_new))
    hf_one = timed(lambda: greedy(lm.model, prompt, 1))
    report["hf_generate_reason_ms"] = hf_reason
    report["hf_generate_per_token_ms"] = (hf_reason - hf_one) / (n_new - 1)

    config = ServerConfig(max_vram_gb=args.max_vram_gb, max_seq_len=args.max_seq_len, max_slots=args.max_slots,
                          prefill_chunk=args.prefill_chunk, max_step_ms=args.max_step_ms,
                          kv_block_size=args.kv_block_size, host_kv_gb=args.host_kv_gb)
    engine = build_engine(config, lm)
    cache = engine.cache
    report["engine"] = {"cuda_graphs": engine.runner.graphed, "triton_attention": engine.net.use_triton,
                        "kv_blocks": cache.n_blocks, "kv_block_tokens": cache.block_size, "max_seq_len": engine.max_seq,
                        "host_kv_blocks": cache.host_capacity, "host_kv_pinned_blocks": cache.host_blocks, "kv_cache_gb": cache.nbytes / 1e9,
                        "one_row_projections": engine.runner.one_row}

    s = engine.open_session().result()

    def one(n):
        sid = engine.open_session().result().id
        engine.generate(sid, prompt, n).result()
        engine.close_session(sid).result()

    e_reason = timed(lambda: one(n_new))
    e_one = timed(lambda: one(1))
    per_token = (e_reason - e_one) / (n_new - 1)
    report["engine_reason_ms"] = e_reason
    report["engine_per_token_ms"] = per_token
    report["engine_vs_floor"] = per_token / report["decode_floor_ms"] if report["decode_floor_ms"] else None
    engine.close_session(s.id).result()

    # correctness: batched engine vs sequential HF generate on the same prompts
    prompts = [[t + k for t in prompt] for k in range(4)]
    sessions = [engine.open_session().result() for _ in prompts]
    futs = [engine.generate(x.id, p, 20) for x, p in zip(sessions, prompts)]
    got = [f.result().tokens for f in futs]
    ref = [greedy(lm.model, p, 20) for p in prompts]
    report["greedy_match"] = [a == b for a, b in zip(got, ref)]
    report["greedy_token_agreement"] = sum(x == y for a, b in zip(got, ref) for x, y in zip(a, b)) / (20 * len(prompts))
    report["max_logit_gap"] = max(logit_gap(lm.model, p, g) for p, g in zip(prompts, got))
    for x in sessions:
        engine.close_session(x.id).result()

    shape = engine.net.shape
    bound = dict(params=sum(p.numel() for p in lm.model.parameters()), weight_bytes=lm.weight_bytes,
                 kv_bytes_per_token=2 * shape.n_layers * shape.n_kv_heads * shape.head_dim * lm.dtype.itemsize,
                 gemm_tflops=report["gemm_tflops"], bandwidth_gbps=bw)
    rows = []
    for n in args.agent_counts:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        row = agents_round(engine, n, prompt, obs, n_new, args.act_seconds)
        row["reason_roofline_ms"] = phase_roofline_ms(n, len(prompt), n_new, 0, **bound)
        row["reflect_roofline_ms"] = phase_roofline_ms(n, len(obs), n_new, len(prompt) + n_new, **bound)
        for phase in ("reason", "reflect"):
            row[f"{phase}_p99_vs_roofline"] = row[f"{phase}_p99_ms"] / row[f"{phase}_roofline_ms"]
        if torch.cuda.is_available():
            row["gpu_peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
            row["gpu_reserved_gb"] = torch.cuda.memory_reserved() / 1e9
        rows.append(row)
        print(json.dumps(row), flush=True)
    report["agents"] = rows
    engine.shutdown()
    return report


def format_report(r: dict) -> str:
    lines = [f"model {r['model_id']} ({r['weights']} weights, {r['dtype']}) on {r['gpu'] or r['device']}, torch {r['torch']}",
             f"weights {r['weight_bytes'] / 1e9:.2f} GB; copy bandwidth {r['copy_bandwidth_gbps']:.0f} GB/s; "
             f"GEMM {r['gemm_tflops']:.0f} TFLOP/s; decode floor {r['decode_floor_ms'] or float('nan'):.2f} ms/token",
             f"prompt {r['prompt_tokens']} tokens, observation {r['observation_tokens']} tokens",
             f"HF generate batch 1: Reason {r['hf_generate_reason_ms']:.1f} ms, {r['hf_generate_per_token_ms']:.2f} ms/token",
             f"engine {r['engine']}",
             f"engine N=1: Reason {r['engine_reason_ms']:.1f} ms, {r['engine_per_token_ms']:.2f} ms/token"
             + (f" = {r['engine_vs_floor']:.2f}x the floor" if r['engine_vs_floor'] else ""),
             f"greedy tokens equal to HF generate: {r['greedy_match']} (token agreement {r['greedy_token_agreement']:.2%}); "
             f"largest teacher-forced logit gap {r['max_logit_gap']:.4f}",
             "", "| N | Reason p50 | Reason p99 | roofline | p99/roofline | Reflect p50 | Reflect p99 | roofline | "
             "p99/roofline | Reason tok/s | parks | GPU peak GB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for a in r["agents"]:
        lines.append(f"| {a['n']} | {a['reason_p50_ms']:.1f} | {a['reason_p99_ms']:.1f} | {a['reason_roofline_ms']:.1f} | "
                     f"{a['reason_p99_vs_roofline']:.2f}x | {a['reflect_p50_ms']:.1f} | {a['reflect_p99_ms']:.1f} | "
                     f"{a['reflect_roofline_ms']:.1f} | {a['reflect_p99_vs_roofline']:.2f}x | "
                     f"{a['reason_tokens_per_s']:.0f} | {a['parks']} | {a.get('gpu_peak_allocated_gb', float('nan')):.1f} |")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-id", default="meta-llama/Llama-2-7b-hf")
    p.add_argument("--weights", default="auto", choices=["auto", "pretrained", "synthetic"])
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--new-tokens", type=int, default=50)
    p.add_argument("--agent-counts", type=int, nargs="+", default=[1, 8, 32, 128, 256])
    p.add_argument("--act-seconds", type=float, default=10.0)
    add_engine_arguments(p)  # the server's engine flags and defaults
    p.add_argument("--json", default=None, help="also write the full report here")


def main(args: argparse.Namespace) -> int:
    for error in engine_config_errors(args):
        raise SystemExit(error)
    report = run(args)
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0
