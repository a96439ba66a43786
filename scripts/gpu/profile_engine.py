"""Where a decode step and a prefill call spend their time, kernel by kernel (run on the GPU).

For each decode batch size: the CUDA-graph replay time per step (events, median of 20) against the
step's bytes (weights + every row's KV) at the measured copy bandwidth and its FLOPs at the measured
GEMM rate, and the eager step's kernels grouped by name (torch.profiler). For a Reason prefill chunk
(rows of 72 fresh tokens) and a Reflect chunk (rows of 18 tokens after a 122-token prefix): wall time
per call and per token against the GEMM rate, and the same kernel table.

A Reason wave of each ``--waves`` N (all prompts at once) is timed, then profiled: how long the GPU
sat idle between kernels while the engine's host work ran.

    python3 scripts/gpu/profile_engine.py --out $OUT/profile.json [--batches 1 64 512] [--waves 512]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from djinn.bench.engine_bench import copy_bandwidth_gbps, gemm_tflops
from djinn.engine.kv_cache import block_bytes
from djinn.models.loader import load_model
from djinn.server.config import ServerConfig
from djinn.server.service import build_engine


def event_ms(fn, repeat: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def device_events(prof) -> list[dict]:
    """The kernels, copies and memsets a profiler saw on the GPU (chrome-trace events: name, ts, dur in us)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        trace = json.load(open(f.name))
    return [e for e in trace.get("traceEvents", []) if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]


def grouped(events: list[dict]) -> dict[str, list]:
    """Device events by name: [total us, count]."""
    by = defaultdict(lambda: [0.0, 0])
    for e in events:
        by[e["name"]][0] += e.get("dur", 0.0)
        by[e["name"]][1] += 1
    return by


def kernels(fn, calls: int = 3) -> list[dict]:
    """Device time per call of ``fn`` by kernel name, largest first."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    by = grouped(device_events(prof))
    total = sum(v[0] for v in by.values())
    rows = [{"kernel": k[:90], "us_per_call": v[0] / calls, "launches_per_call": v[1] / calls,
             "share": v[0] / total} for k, v in by.items()]
    return sorted(rows, key=lambda r: -r["us_per_call"])


def wave(engine, n: int, new_tokens: int = 50) -> dict:
    """A Reason wave: ``n`` fresh sessions' 72-token prompts submitted at once, ``new_tokens`` each. Run
    once plain (wall time), then under the profiler: the time the GPU ran anything (the union of its kernel
    and copy intervals) against the span from the first to the last, and the idle gaps between them, which
    is where the engine's host work (scheduling, launches, readbacks) left the GPU waiting."""
    def run() -> float:
        ids = [engine.open_session().result().id for _ in range(n)]
        t0 = time.perf_counter()
        futs = [engine.generate(sid, [1000 + 7 * i + t for t in range(72)], new_tokens) for i, sid in enumerate(ids)]
        for f in futs:
            f.result()
        wall = (time.perf_counter() - t0) * 1e3
        for sid in ids:
            engine.close_session(sid).result()
        return wall

    plain = run()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        profiled = run()
    events = device_events(prof)
    spans = sorted((e["ts"], e["ts"] + e.get("dur", 0.0)) for e in events)
    if not spans:
        raise SystemExit("the profiler saw no GPU work during the wave (CUPTI not available?)")
    busy, gaps, end = 0.0, [], spans[0][0]
    for a, b in spans:
        if a > end:
            gaps.append(a - end)
        busy += max(0.0, b - max(a, end))
        end = max(end, b)
    span = end - spans[0][0]
    return {"agents": n, "wall_ms": plain, "profiled_wall_ms": profiled, "gpu_span_ms": span / 1e3,
            "gpu_busy_ms": busy / 1e3, "gpu_idle_ms": (span - busy) / 1e3, "kernels": len(spans),
            "gaps_over_50us": sum(1 for g in gaps if g > 50), "idle_in_gaps_over_50us_ms": sum(g for g in gaps if g > 50) / 1e3,
            "largest_gaps_us": sorted(gaps)[-8:][::-1], "by_kernel": by_kernel(events)}


def by_kernel(events: list[dict], top: int = 14) -> list[dict]:
    """A wave's device time by kernel name (ms, launches), largest first: where its busy time went."""
    return [{"kernel": k[:90], "ms": round(v[0] / 1e3, 2), "launches": v[1]}
            for k, v in sorted(grouped(events).items(), key=lambda kv: -kv[1][0])[:top]]


def table(rows: list[dict], top: int = 12) -> str:
    lines = [f"    {r['us_per_call']:9.1f} us  {r['share']:5.1%}  x{r['launches_per_call']:<5.0f} {r['kernel']}"
             for r in rows[:top]]
    return "\n".join(lines + [f"    {sum(r['us_per_call'] for r in rows):9.1f} us  total device time, "
                              f"{sum(r['launches_per_call'] for r in rows):.0f} launches"])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64, 512])
    p.add_argument("--context", type=int, default=122, help="decode positions already cached per row")
    p.add_argument("--waves", type=int, nargs="*", default=[512], help="Reason waves to time against the GPU's busy time")
    args = p.parse_args()
    lm = load_model("meta-llama/Llama-2-7b-hf", "synthetic", "float16", "cuda", quiet=True)
    dev = lm.device
    report = {"gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__,
              "copy_bandwidth_gbps": copy_bandwidth_gbps(dev), "gemm_tflops": gemm_tflops(dev, lm.dtype)}
    engine = build_engine(ServerConfig(host_kv_gb=0), lm)  # defaults, no arena: nothing parks here
    net, cache, runner = engine.net, engine.cache, engine.runner
    s = net.shape
    params = sum(x.numel() for x in lm.model.parameters())
    kv_token = block_bytes(s, 1, lm.dtype)
    per_row = -(-(args.context + 64) // cache.block_size)
    bw, tf = report["copy_bandwidth_gbps"], report["gemm_tflops"]
    print(f"{report['gpu']}: copy {bw:.0f} GB/s, GEMM {tf:.0f} TFLOP/s, weights {lm.weight_bytes / 1e9:.2f} GB", flush=True)

    def point(rows: list[int]) -> None:
        cache.set_rows(rows, [list(range(i * per_row, (i + 1) * per_row)) for i in range(len(rows))])

    gen = torch.Generator(device=dev).manual_seed(0)
    cache.kv[:max(args.batches) * per_row].normal_(generator=gen)
    report["decode"] = []
    for b in args.batches:
        rows = list(range(b))
        point(rows)
        toks = torch.randint(0, s.vocab_size, (b,), device=dev, generator=gen)
        pos = torch.full((b,), args.context, device=dev)
        rows_t = torch.tensor(rows, device=dev)
        eager = lambda: net.decode(cache.kv, cache.tables, rows_t, toks, pos, span=args.context + 1)  # noqa: E731
        entry = {"batch": b, "eager_ms": event_ms(eager)}
        if runner.graphed:
            bucket = next(x for x in runner.sizes if x >= b)
            runner.inputs[0, :bucket] = torch.tensor(rows + [cache.scratch_row] * (bucket - b), device=dev)
            graph = runner.graphs[bucket][0]

            def replay():
                runner.inputs[1, :bucket] = args.context  # positions advance per replay: hold them
                graph.replay()
            entry["graph_ms"] = event_ms(replay)
        nbytes = lm.weight_bytes + b * (args.context + 1) * kv_token
        entry["bytes_floor_ms"] = nbytes / (bw * 1e9) * 1e3
        entry["flops_floor_ms"] = 2 * params * b / (tf * 1e12) * 1e3
        entry["kernels"] = kernels(eager)
        report["decode"].append(entry)
        print(f"decode batch {b}: graph {entry.get('graph_ms', float('nan')):.3f} ms, eager {entry['eager_ms']:.3f} ms; "
              f"bytes floor {entry['bytes_floor_ms']:.3f} ms, FLOP floor {entry['flops_floor_ms']:.3f} ms\n"
              + table(entry["kernels"]), flush=True)

    report["prefill"] = []
    for name, rows_n, width, start in (("reason", 28, 72, 0), ("reflect", 113, 18, args.context)):
        rows = list(range(rows_n))
        point(rows)
        chunks = [torch.randint(0, s.vocab_size, (width,), generator=torch.Generator().manual_seed(i)).tolist()
                  for i in rows]
        call = lambda: runner.prefill(rows, chunks, [start] * rows_n)  # noqa: E731
        ms = event_ms(call, repeat=10)
        tokens = rows_n * width
        entry = {"phase": name, "rows": rows_n, "tokens_per_row": width, "start": start, "ms": ms,
                 "us_per_token": ms * 1e3 / tokens, "gemm_floor_us_per_token": 2 * params / (tf * 1e12) * 1e6,
                 "kernels": kernels(call)}
        report["prefill"].append(entry)
        print(f"prefill {name}: {rows_n} rows x {width} tokens from {start}: {ms:.2f} ms, "
              f"{entry['us_per_token']:.1f} us/token (GEMM floor {entry['gemm_floor_us_per_token']:.1f})\n"
              + table(entry["kernels"]), flush=True)
    report["waves"] = []
    for n in args.waves:
        entry = wave(engine, n)
        report["waves"].append(entry)
        print(f"Reason wave of {n}: {entry['wall_ms']:.0f} ms ({entry['profiled_wall_ms']:.0f} ms profiled); GPU busy "
              f"{entry['gpu_busy_ms']:.0f} of {entry['gpu_span_ms']:.0f} ms, idle {entry['gpu_idle_ms']:.0f} ms "
              f"({entry['gaps_over_50us']} gaps over 50 us hold {entry['idle_in_gaps_over_50us_ms']:.0f} ms; "
              f"largest {', '.join(f'{g:.0f}' for g in entry['largest_gaps_us'])} us)\n"
              + "\n".join(f"    {k['ms']:9.1f} ms  x{k['launches']:<6} {k['kernel']}" for k in entry["by_kernel"]),
              flush=True)
    engine.shutdown()
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
