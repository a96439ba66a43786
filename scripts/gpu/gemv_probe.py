"""Probe: a Triton GEMV (one token times a [N, K] weight) against F.linear (cuBLAS) on the Llama-2-7B
decode shapes, in GB/s of weight read, over a sweep of launch settings.

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


def event_us(fn, repeat: int = 50) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def main() -> None:
    dev = "cuda"
    shapes = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008),
              "lm_head": (32000, 4096)}
    total = {"cublas": 0.0, "best": 0.0}
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, dtype=torch.float16, device=dev) * 0.02
        x = torch.randn(1, k, dtype=torch.float16, device=dev)
        ref = F.linear(x, w)
        gb = n * k * 2 / 1e9
        base = event_us(lambda: F.linear(x, w))
        results = []
        for bn, bk, warps in itertools.product((4, 8, 16, 32), (128, 256, 512), (2, 4, 8)):
            if k % bk:
                continue
            out = gemv(x[0], w, bn, bk, warps)
            err = (out.float() - ref[0].float()).abs().max().item()
            us = event_us(lambda: gemv(x[0], w, bn, bk, warps))
            results.append((us, bn, bk, warps, err))
        results.sort()
        us, bn, bk, warps, err = results[0]
        total["cublas"] += base * (1 if name == "lm_head" else 32)
        total["best"] += us * (1 if name == "lm_head" else 32)
        print(f"{name} [{n}x{k}]: cuBLAS {base:.1f} us ({gb / base * 1e6:.0f} GB/s); Triton best {us:.1f} us "
              f"({gb / us * 1e6:.0f} GB/s) at BLOCK_N={bn} BLOCK_K={bk} warps={warps}, max err {err:.2e}; "
              f"next: " + ", ".join(f"{r[0]:.1f}@{r[1]}/{r[2]}/{r[3]}" for r in results[1:4]), flush=True)
    print(f"a 7B step's GEMVs: cuBLAS {total['cublas'] / 1e3:.2f} ms, Triton best {total['best'] / 1e3:.2f} ms")


if __name__ == "__main__":
    main()
