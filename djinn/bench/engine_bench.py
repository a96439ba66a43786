"""``djinn-bench bench-engine``: the engine against the hardware floor and HF generate.

Prints, in one run: the measured copy bandwidth and the weight-read floor of one
decode step; HF ``generate`` at batch 1; the engine's N=1 per-token latency and
its ratio to the floor; p50/p99 Reason and Reflect latency for each N with an
Act sleep between them; tokens/s; GPU memory held; and whether the engine's
greedy tokens equal HF ``generate``'s. The engine is driven in-process (no
network), so the numbers are the engine's own; with ``--through-the-wire`` a Djinn
server with the same flags serves the agents over loopback TCP, one connection each
(the experiment's path; no HF comparison, the model is loaded only by the server).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

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


class EngineAgent:
    """One agent's session on an engine in this process."""

    def __init__(self, engine):
        self.engine = engine
        self.id = engine.open_session().result().id

    def generate(self, tokens: list[int], n: int) -> list[int]:
        return self.engine.generate(self.id, tokens, n).result().tokens

    def close(self) -> None:
        self.engine.close_session(self.id).result()


class WireAgent:
    """One agent's session on a Djinn server, over a connection of its own (as the experiment's agents)."""

    def __init__(self, address: str):
        from djinn.client import DjinnClient

        self.client = DjinnClient(address).connect()
        self.session = self.client.open_session()

    def generate(self, tokens: list[int], n: int) -> list[int]:
        return self.session.generate(tokens, n)

    def close(self) -> None:
        self.session.close()
        self.client.close()


COUNTERS = ("admit_ms", "launch_ms", "wait_ms", "decode_steps", "decode_calls", "prefill_calls",
            "tokens_prefilled", "parks", "restores")


def agents_round(connect: Callable[[], Any], counters: Callable[[], dict], n: int, prompt: list[int],
                 observation: list[int], new_tokens: int, act_s: float) -> dict:
    """N agents (``connect()`` gives each its session): Reason (prompt + new_tokens) -> Act (sleep) ->
    Reflect (observation + new_tokens), all starting together. ``counters()``: the engine's stats."""
    lat: dict[str, list[float]] = {"REASON": [], "REFLECT": []}
    lock = threading.Lock()
    barrier = threading.Barrier(n)
    with ThreadPoolExecutor(min(n, 64)) as pool:
        agents = list(pool.map(lambda _: connect(), range(n)))
    reason_window = [float("inf"), 0.0]

    def agent(i: int) -> None:
        barrier.wait()
        for phase, toks in (("REASON", [t + i % 7 for t in prompt]), ("REFLECT", observation)):
            t0 = time.perf_counter()
            agents[i].generate(toks, new_tokens)
            t1 = time.perf_counter()
            with lock:
                lat[phase].append((t1 - t0) * 1e3)
                if phase == "REASON":
                    reason_window[0], reason_window[1] = min(reason_window[0], t0), max(reason_window[1], t1)
            if phase == "REASON":
                time.sleep(act_s)

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(n)]
    stats0 = counters()
    [t.start() for t in threads]
    [t.join() for t in threads]
    stats1 = counters()
    for a in agents:
        a.close()
    if len(lat["REFLECT"]) < n:
        raise RuntimeError(f"N={n}: {n - len(lat['REFLECT'])} agents failed (see the errors above)")
    row = {"n": n}
    for phase, xs in lat.items():
        row[f"{phase.lower()}_p50_ms"] = percentile(xs, 50)
        row[f"{phase.lower()}_p99_ms"] = percentile(xs, 99)
    row["reason_tokens_per_s"] = n * new_tokens / (reason_window[1] - reason_window[0])
    row.update({key: stats1[key] - stats0[key] for key in COUNTERS})
    return row


def run(args: argparse.Namespace) -> dict:
    from djinn.engine.kv_cache import block_bytes
    from djinn.engine.transformer import model_shape
    from djinn.models.loader import load_model, load_tokenizer_for, model_on_meta, resolve_device, resolve_dtype
    from djinn.runners.common import OBSERVATION, prompt_text
    from djinn.runners.hf_agent import greedy
    from djinn.server.config import ServerConfig
    from djinn.server.service import build_engine
    from djinn.spec import ExperimentSpec

    config = ServerConfig(model_id=args.model_id, weights=args.weights, dtype=args.dtype, device=args.device,
                          max_vram_gb=args.max_vram_gb, max_seq_len=args.max_seq_len, max_slots=args.max_slots,
                          prefill_chunk=args.prefill_chunk, max_step_ms=args.max_step_ms,
                          kv_block_size=args.kv_block_size, host_kv_gb=args.host_kv_gb,
                          max_concurrent=max(ServerConfig.max_concurrent, max(args.agent_counts)))
    dev = resolve_device(args.device)
    report: dict = {"model_id": args.model_id, "device": str(dev), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
                    "through_the_wire": args.through_the_wire}
    bw = copy_bandwidth_gbps(dev)  # measured before a model takes the memory
    report["copy_bandwidth_gbps"] = bw
    report["gemm_tflops"] = gemm_tflops(dev, resolve_dtype(args.dtype, dev))
    n_new = args.new_tokens
    server = probe = engine = lm = None
    if args.through_the_wire:
        from djinn.runners.local_server import LocalServer

        meta = model_on_meta(args.model_id, args.weights, args.dtype, args.device)
        model, dtype = meta, next(meta.parameters()).dtype
        tokenizer = load_tokenizer_for(args.model_id, args.weights)
        log_path = args.server_log or tempfile.mkstemp(prefix="djinn-bench-server-", suffix=".log")[1]
        server = LocalServer(config, log_path=log_path).start(timeout=900)
        report["server"] = {"argv": server.cmd[3:], "log": log_path}
        connect: Callable[[], Any] = lambda: WireAgent(server.address)  # noqa: E731
        probe = WireAgent(server.address)
        counters = lambda: probe.client.stats()[args.model_id]  # noqa: E731
        report["engine"] = {k: v for k, v in counters().items() if k.startswith(("kv_", "host_kv_", "max_seq"))}
    else:
        lm = load_model(args.model_id, args.weights, args.dtype, args.device, quiet=True)
        model, dtype, tokenizer = lm.model, lm.dtype, lm.tokenizer
        engine = build_engine(config, lm)
        cache = engine.cache
        report["engine"] = {"cuda_graphs": engine.runner.graphed, "triton_attention": engine.net.use_triton,
                            "kv_blocks": cache.n_blocks, "kv_block_tokens": cache.block_size,
                            "max_seq_len": engine.max_seq, "host_kv_blocks": cache.host_capacity,
                            "host_kv_pinned_blocks": cache.host_blocks, "kv_cache_gb": cache.nbytes / 1e9,
                            "one_row_projections": engine.runner.one_row}
        connect = lambda: EngineAgent(engine)  # noqa: E731
        counters = lambda: dict(engine.stats)  # noqa: E731
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    report.update(weights=args.weights if lm is None else lm.weights, dtype=str(dtype), weight_bytes=weight_bytes)
    report["decode_floor_ms"] = weight_bytes / (bw * 1e9) * 1e3 if bw == bw else None
    prompt = tokenizer.encode(prompt_text(ExperimentSpec()))
    obs = tokenizer.encode(OBSERVATION)
    report["prompt_tokens"], report["observation_tokens"] = len(prompt), len(obs)
    try:
        if lm is not None:
            hf_reason = timed(lambda: greedy(lm.model, prompt, n_new))
            hf_one = timed(lambda: greedy(lm.model, prompt, 1))
            report["hf_generate_reason_ms"] = hf_reason
            report["hf_generate_per_token_ms"] = (hf_reason - hf_one) / (n_new - 1)

        def one(n):
            agent = connect()
            agent.generate(prompt, n)
            agent.close()

        e_reason = timed(lambda: one(n_new))
        e_one = timed(lambda: one(1))
        per_token = (e_reason - e_one) / (n_new - 1)
        report["engine_reason_ms"] = e_reason
        report["engine_per_token_ms"] = per_token
        report["engine_vs_floor"] = per_token / report["decode_floor_ms"] if report["decode_floor_ms"] else None

        if lm is not None:  # correctness: batched engine vs sequential HF generate on the same prompts
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

        bound = dict(params=sum(p.numel() for p in model.parameters()), weight_bytes=weight_bytes,
                     kv_bytes_per_token=block_bytes(model_shape(model), 1, dtype),
                     gemm_tflops=report["gemm_tflops"], bandwidth_gbps=bw)
        rows = []
        for n in args.agent_counts:
            if engine is not None and torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            row = agents_round(connect, counters, n, prompt, obs, n_new, args.act_seconds)
            row["reason_roofline_ms"] = phase_roofline_ms(n, len(prompt), n_new, 0, **bound)
            row["reflect_roofline_ms"] = phase_roofline_ms(n, len(obs), n_new, len(prompt) + n_new, **bound)
            for phase in ("reason", "reflect"):
                row[f"{phase}_p99_vs_roofline"] = row[f"{phase}_p99_ms"] / row[f"{phase}_roofline_ms"]
            if engine is not None and torch.cuda.is_available():
                row["gpu_peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
                row["gpu_reserved_gb"] = torch.cuda.memory_reserved() / 1e9
            rows.append(row)
            print(json.dumps(row), flush=True)
        report["agents"] = rows
    finally:
        if engine is not None:
            engine.shutdown()
        if probe is not None:
            probe.close()
        if server is not None:
            server.stop()
    return report


def format_report(r: dict) -> str:
    lines = [f"model {r['model_id']} ({r['weights']} weights, {r['dtype']}) on {r['gpu'] or r['device']}, torch {r['torch']}",
             f"weights {r['weight_bytes'] / 1e9:.2f} GB; copy bandwidth {r['copy_bandwidth_gbps']:.0f} GB/s; "
             f"GEMM {r['gemm_tflops']:.0f} TFLOP/s; decode floor {r['decode_floor_ms'] or float('nan'):.2f} ms/token",
             f"prompt {r['prompt_tokens']} tokens, observation {r['observation_tokens']} tokens",
             *([f"HF generate batch 1: Reason {r['hf_generate_reason_ms']:.1f} ms, "
                f"{r['hf_generate_per_token_ms']:.2f} ms/token"] if "hf_generate_reason_ms" in r else []),
             f"engine {r['engine']}" + (f"; server {' '.join(r['server']['argv'])}" if "server" in r else ""),
             f"engine N=1{' through the wire' if r['through_the_wire'] else ''}: Reason {r['engine_reason_ms']:.1f} ms, "
             f"{r['engine_per_token_ms']:.2f} ms/token"
             + (f" = {r['engine_vs_floor']:.2f}x the floor" if r['engine_vs_floor'] else ""),
             *([f"greedy tokens equal to HF generate: {r['greedy_match']} (token agreement "
                f"{r['greedy_token_agreement']:.2%}); largest teacher-forced logit gap {r['max_logit_gap']:.4f}"]
               if "greedy_match" in r else []),
             "", "| N | Reason p50 | Reason p99 | roofline | p99/roofline | Reflect p50 | Reflect p99 | roofline | "
             "p99/roofline | Reason tok/s | parks | GPU peak GB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for a in r["agents"]:
        lines.append(f"| {a['n']} | {a['reason_p50_ms']:.1f} | {a['reason_p99_ms']:.1f} | {a['reason_roofline_ms']:.1f} | "
                     f"{a['reason_p99_vs_roofline']:.2f}x | {a['reflect_p50_ms']:.1f} | {a['reflect_p99_ms']:.1f} | "
                     f"{a['reflect_roofline_ms']:.1f} | {a['reflect_p99_vs_roofline']:.2f}x | "
                     f"{a['reason_tokens_per_s']:.0f} | {a['parks']} | "
                     + (f"{a['gpu_peak_allocated_gb']:.1f} |" if "gpu_peak_allocated_gb" in a else "- (the server's) |"))
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
    p.add_argument("--through-the-wire", action="store_true",
                   help="start a Djinn server with these flags (--max-concurrent: the largest N) and drive every "
                        "agent over a connection of its own, as the experiment does (no HF comparison)")
    p.add_argument("--server-log", default=None, help="the server's log with --through-the-wire (default: a temp file)")
    p.add_argument("--json", default=None, help="also write the full report here")


def bench_errors(args: argparse.Namespace) -> list[str]:
    """The bench's own flags, checked before a model loads (a report is never computed to be lost)."""
    errors = []
    if any(n < 1 for n in args.agent_counts):
        errors.append("--agent-counts: each N must be >= 1")
    if args.new_tokens < 2:
        errors.append("--new-tokens: must be >= 2 (the per-token figure compares 1 and N new tokens)")
    if not args.act_seconds >= 0:
        errors.append("--act-seconds: must be >= 0")
    for flag, path in (("--json", args.json), ("--server-log", args.server_log)):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            errors.append(f"{flag}: directory {os.path.dirname(os.path.abspath(path))} does not exist; create it first")
    return errors


def main(args: argparse.Namespace) -> int:
    for error in engine_config_errors(args) + bench_errors(args):
        raise SystemExit(error)
    report = run(args)
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0
