"""Probe: the engine's one-row GEMV kernel (djinn.engine.fused) against F.linear (cuBLAS) on the Llama-2-7B
decode shapes, in GB/s of weight read. Each shape's GEMVs run as the decode step runs them: one per layer,
distinct weights, captured in a CUDA graph.

    python3 scripts/gpu/gemv_probe.py           # the engine's settings: each shape, a step, the gated GEMV
    python3 scripts/gpu/gemv_probe.py --sweep   # every launch setting (sets GEMV_BLOCK_*)
"""
from __future__ import annotations

import argparse
import itertools
import statistics

import torch
import torch.nn.functional as F
import triton

from djinn.engine import fused

# (out, in) of the 7B decode step's weights, and how many of each one step reads
SHAPES = {"qkv": (12288, 4096, 32), "o": (4096, 4096, 32), "gate_up": (22016, 4096, 32),
          "down": (4096, 11008, 32), "lm_head": (32000, 4096, 1)}


def kernel(x, w, block_n, block_k, warps):
    out = torch.empty(1, w.shape[0], dtype=x.dtype, device=x.device)
    fused._gemv_kernel[(triton.cdiv(w.shape[0], block_n),)](x, w, out, w.shape[0], K=w.shape[1], BLOCK_N=block_n,
                                                             BLOCK_K=block_k, GATED=False, num_warps=warps)
    return out


def graph_us(calls, repeat: int = 20) -> float:
    """Device time of ``calls`` captured in one CUDA graph (median of ``repeat`` replays)."""
    for fn in calls:
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    times = []
    for _ in range(repeat + 3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times[3:])


def shape_weights(n, k, count):
    copies = max(count, 4)  # at least 4 distinct weights, so the timed reads come from HBM, not L2
    return [torch.randn(n, k, dtype=torch.float16, device="cuda") * 0.02 for _ in range(copies)]


def sweep() -> None:
    total = {"cublas": 0.0, "best": 0.0}
    for name, (n, k, count) in SHAPES.items():
        ws = shape_weights(n, k, count)
        x = torch.randn(1, k, dtype=torch.float16, device="cuda")
        ref = F.linear(x, ws[0])
        gb = n * k * 2 / 1e9
        base = graph_us([lambda w=w: F.linear(x, w) for w in ws]) / len(ws)
        results = []
        for bn, bk, warps in itertools.product((4, 8, 16, 32), (128, 256, 512), (2, 4, 8)):
            err = (kernel(x, ws[0], bn, bk, warps).float() - ref.float()).abs().max().item()
            us = graph_us([lambda w=w: kernel(x, w, bn, bk, warps) for w in ws]) / len(ws)
            results.append((us, bn, bk, warps, err))
        results.sort()
        us, bn, bk, warps, err = results[0]
        total["cublas"] += base * count
        total["best"] += us * count
        print(f"{name} [{n}x{k}] x{count}: cuBLAS {base:.1f} us ({gb / base * 1e6:.0f} GB/s); Triton best {us:.1f} us "
              f"({gb / us * 1e6:.0f} GB/s) at BLOCK_N={bn} BLOCK_K={bk} warps={warps}, max err {err:.2e}; "
              f"next: " + ", ".join(f"{r[0]:.1f}@{r[1]}/{r[2]}/{r[3]}" for r in results[1:4]), flush=True)
        del ws
        torch.cuda.empty_cache()
    print(f"a 7B decode step's GEMVs, in graphs: cuBLAS {total['cublas'] / 1e3:.2f} ms, "
          f"Triton best per shape {total['best'] / 1e3:.2f} ms")


def engine_settings() -> None:
    total = {"cublas": 0.0, "gemv": 0.0}
    for name, (n, k, count) in SHAPES.items():
        ws = shape_weights(n, k, count)
        x = torch.randn(1, k, dtype=torch.float16, device="cuda")
        base = graph_us([lambda w=w: F.linear(x, w) for w in ws]) / len(ws)
        us = graph_us([lambda w=w: fused.gemv(x, w) for w in ws]) / len(ws)
        err = (fused.gemv(x, ws[0]).float() - F.linear(x, ws[0]).float()).abs().max().item()
        total["cublas"] += base * count
        total["gemv"] += us * count
        gb = n * k * 2 / 1e9
        print(f"{name} [{n}x{k}] x{count}: cuBLAS {base:.1f} us ({gb / base * 1e6:.0f} GB/s); the engine's GEMV "
              f"{us:.1f} us ({gb / us * 1e6:.0f} GB/s), max err {err:.2e}", flush=True)
        del ws
        torch.cuda.empty_cache()
    print(f"a 7B decode step's GEMVs, in graphs: cuBLAS {total['cublas'] / 1e3:.2f} ms, "
          f"the engine's GEMV {total['gemv'] / 1e3:.2f} ms", flush=True)
    n, k, count = SHAPES["gate_up"]
    ws = shape_weights(n, k, count)
    x = torch.randn(1, k, dtype=torch.float16, device="cuda")
    apart = graph_us([lambda w=w: fused._silu_mul(F.linear(x, w)) for w in ws]) / len(ws) * count
    one = graph_us([lambda w=w: fused.gemv(x, w, gated=True) for w in ws]) / len(ws) * count
    same = torch.equal(fused.gemv(x, ws[0], gated=True), fused._silu_mul(fused.gemv(x, ws[0])))
    print(f"gate|up + SiLU-multiply, 32 layers: cuBLAS + kernel {apart / 1e3:.3f} ms, gated GEMV {one / 1e3:.3f} ms "
          f"(bit-identical to GEMV + kernel: {same})", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", action="store_true")
    args = p.parse_args()
    if args.sweep:
        sweep()
    else:
        engine_settings()


if __name__ == "__main__":
    main()
