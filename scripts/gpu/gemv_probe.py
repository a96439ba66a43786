"""Probe: a Triton GEMV (one token times a [N, K] weight) against F.linear (cuBLAS) on the Llama-2-7B
decode shapes, in GB/s of weight read, over a sweep of launch settings. Each shape's GEMVs run as the
decode step runs them: one per layer, distinct weights, captured in a CUDA graph.

    python3 scripts/gpu/gemv_probe.py
"""
from __future__ import annotations

import itertools
import statistics

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def _gemv_kernel(X, W, OUT, N, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = rows < N
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + cols).to(tl.float32)
        w = tl.load(W + rows[:, None] * K + cols[None, :], mask=mask[:, None], other=0.0)
        acc += w.to(tl.float32) * x[None, :]
    tl.store(OUT + rows, tl.sum(acc, axis=1).to(OUT.dtype.element_ty), mask=mask)


def gemv(x, w, block_n, block_k, warps):
    n, k = w.shape
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, block_n),)](x, w, out, n, K=k, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    return out


def graph_us(calls, repeat: int = 20) -> float:
    """Device time of ``calls`` (one layer's GEMV each) captured in one CUDA graph, as the engine's decode
    step runs them: no launch gaps, and distinct weights so none is read from L2 (median of ``repeat``)."""
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


def main() -> None:
    dev = "cuda"
    # (out, in) of the 7B decode step's weights, and how many of each one step reads
    shapes = {"qkv": (12288, 4096, 32), "o": (4096, 4096, 32), "gate_up": (22016, 4096, 32),
              "down": (4096, 11008, 32), "lm_head": (32000, 4096, 1)}
    total = {"cublas": 0.0, "best": 0.0}
    for name, (n, k, count) in shapes.items():
        copies = max(count, 4)  # at least 4 distinct weights, so the timed reads come from HBM
        ws = [torch.randn(n, k, dtype=torch.float16, device=dev) * 0.02 for _ in range(copies)]
        x = torch.randn(1, k, dtype=torch.float16, device=dev)
        ref = F.linear(x, ws[0])
        gb = n * k * 2 / 1e9
        base = graph_us([lambda w=w: F.linear(x, w) for w in ws]) / copies
        results = []
        for bn, bk, warps in itertools.product((4, 8, 16, 32), (128, 256, 512), (2, 4, 8)):
            if k % bk:
                continue
            err = (gemv(x[0], ws[0], bn, bk, warps).float() - ref[0].float()).abs().max().item()
            us = graph_us([lambda w=w: gemv(x[0], w, bn, bk, warps) for w in ws]) / copies
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


if __name__ == "__main__":
    main()
