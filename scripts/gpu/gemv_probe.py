"""Probe: the engine's few-row GEMV kernel (djinn.engine.fused) against F.linear (cuBLAS) on the Llama-2-7B
decode shapes, in GB/s of weight read. Each shape's GEMVs run as the decode step runs them: one per layer,
distinct weights, captured in a CUDA graph.

    python3 scripts/gpu/gemv_probe.py --sweep        # launch settings at one row (sets GEMV_BLOCK_*)
    python3 scripts/gpu/gemv_probe.py --rows 1 2 4 8  # the engine's settings by rows (sets GEMV_MAX_ROWS)
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
    out = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
    fused._gemv_kernel[(triton.cdiv(w.shape[0], block_n),)](
        x, w, out, x.shape[0], w.shape[0], w.shape[1], x.stride(0), BLOCK_M=triton.next_power_of_2(x.shape[0]),
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
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


def by_rows(rows: list[int]) -> None:
    settings = (fused.GEMV_BLOCK_N, fused.GEMV_BLOCK_K, fused.GEMV_WARPS)
    for m in rows:
        total = {"cublas": 0.0, "gemv": 0.0}
        for name, (n, k, count) in SHAPES.items():
            ws = shape_weights(n, k, count)
            x = torch.randn(m, k, dtype=torch.float16, device="cuda")
            total["cublas"] += graph_us([lambda w=w: F.linear(x, w) for w in ws]) / len(ws) * count
            total["gemv"] += graph_us([lambda w=w: kernel(x, w, *settings) for w in ws]) / len(ws) * count
            del ws
            torch.cuda.empty_cache()
        print(f"{m} row(s): a 7B decode step's GEMVs, in graphs: cuBLAS {total['cublas'] / 1e3:.2f} ms, "
              f"the engine's GEMV {total['gemv'] / 1e3:.2f} ms", flush=True)
        n, k, count = SHAPES["gate_up"]
        ws = shape_weights(n, k, count)
        x = torch.randn(m, k, dtype=torch.float16, device="cuda")
        apart = graph_us([lambda w=w: fused._silu_mul(F.linear(x, w)) for w in ws]) / len(ws) * count
        one = graph_us([lambda w=w: fused.gemv(x, w, gated=True) for w in ws]) / len(ws) * count
        same = torch.equal(fused.gemv(x, ws[0], gated=True), fused._silu_mul(fused.gemv(x, ws[0])))
        print(f"{m} row(s): gate|up + SiLU-multiply, 32 layers: cuBLAS + kernel {apart / 1e3:.3f} ms, "
              f"gated GEMV {one / 1e3:.3f} ms (bit-identical to GEMV + kernel: {same})", flush=True)
        del ws
        torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    args = p.parse_args()
    if args.sweep:
        sweep()
    else:
        by_rows(args.rows)


if __name__ == "__main__":
    main()
