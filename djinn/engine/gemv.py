"""Projections of a one-token step: a Triton GEMV where it is measured faster than cuBLAS.

A decode step of one token is matrix-vector products that read every weight once, so its time is the
weight read. cuBLAS splits K and reduces in a second kernel; ``_gemv_kernel`` streams BLOCK_N full rows of
the weight per program and reduces in registers. Which is faster, and with which launch setting, depends
on the GPU and the shape: on an H200 the kernel read the 7B step's weights in 3.33 ms against cuBLAS's
3.60 (docs/results/2026-12-05-h200), while a variant of it on an H100 took 7.70 ms
(docs/results/2026-12-05-h100). So nothing is assumed: ``OneRowLinear.tune`` times each weight shape's
GEMVs as the decode step runs them (one per layer, distinct weights, replayed from a CUDA graph) with
cuBLAS and with every setting of ``CONFIGS`` whose product agrees with cuBLAS's there, and one-row
projections of that shape take the fastest.
"""
from __future__ import annotations

import statistics
from typing import Optional

import torch
import torch.nn.functional as F

from djinn.engine.attention import triton

# (BLOCK_N rows of the weight a program, BLOCK_K columns a tile, warps): scripts/gpu/gemv_probe.py's best
# settings on the 7B shapes (H200: 4/128/8 on all; H100: 2/1024/8 on three, 4/128/8 within 1% on all)
CONFIGS = ((4, 128, 8), (2, 1024, 8), (8, 128, 4), (8, 256, 8), (16, 256, 8), (4, 256, 4))
TIMED_REPLAYS = 10

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _gemv_kernel(X, W, OUT, N, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """OUT[n] = X . W[n, :] for one row X; K a multiple of BLOCK_K (no column masks), fp32 sums."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = rows < N
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(X + cols).to(tl.float32)
            w = tl.load(W + rows[:, None] * K + cols[None, :], mask=mask[:, None], other=0.0)
            acc += w.to(tl.float32) * x[None, :]
        tl.store(OUT + rows, tl.sum(acc, axis=1).to(OUT.dtype.element_ty), mask=mask)


def gemv(x: torch.Tensor, w: torch.Tensor, config: tuple[int, int, int]) -> torch.Tensor:
    """``F.linear(x, w)`` for x [1, K] and w [N, K], both contiguous, with K a multiple of BLOCK_K."""
    block_n, block_k, warps = config
    n, k = w.shape
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, block_n),)](x, w, out, n, K=k, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    return out


def runs(w: torch.Tensor, config: tuple[int, int, int]) -> bool:
    """The kernel tiles ``w`` exactly with ``config`` and its offsets fit 32 bits."""
    return triton is not None and w.is_contiguous() and w.shape[1] % config[1] == 0 and w.numel() < 2 ** 31


def agrees(x: torch.Tensor, w: torch.Tensor, config: tuple[int, int, int]) -> bool:
    """The GEMV's product equals cuBLAS's up to the rounding of a different summation order."""
    ref = F.linear(x, w).float()
    return bool(((gemv(x, w, config).float() - ref).abs() <= 1e-2 * ref.abs().max() + 1e-6).all())


def graph_us(calls, device) -> float:
    """Device time of ``calls`` replayed from one CUDA graph, per call (median of TIMED_REPLAYS)."""
    for fn in calls:  # compiles, and a first run outside the capture
        fn()
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    times = []
    for _ in range(TIMED_REPLAYS + 2):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times[2:]) / len(calls)


class OneRowLinear:
    """``linear(x, w)``: ``F.linear`` unless x is one row and ``tune`` found the GEMV faster for w's shape."""

    def __init__(self):
        self.picked: dict[tuple[int, int], tuple[int, int, int]] = {}

    def __call__(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        config: Optional[tuple[int, int, int]] = self.picked.get(tuple(w.shape)) if x.shape[0] == 1 else None
        return gemv(x, w, config) if config is not None else F.linear(x, w)

    def tune(self, weights: list[torch.Tensor]) -> dict[str, dict]:
        """Time each shape's one-row products over all of ``weights`` of that shape (CUDA), keep the fastest
        way per shape; returns, per shape "NxK", the microseconds of cuBLAS and of the pick."""
        by_shape: dict[tuple[int, int], list[torch.Tensor]] = {}
        for w in weights:
            by_shape.setdefault(tuple(w.shape), []).append(w)
        report = {}
        for shape, ws in by_shape.items():
            x = torch.randn(1, shape[1], dtype=ws[0].dtype, device=ws[0].device)
            cublas = graph_us([lambda w=w: F.linear(x, w) for w in ws], x.device)
            best, best_us = None, cublas
            for config in CONFIGS:  # on this device, only a setting that computes what cuBLAS does
                if all(runs(w, config) for w in ws) and agrees(x, ws[0], config):
                    us = graph_us([lambda w=w: gemv(x, w, config) for w in ws], x.device)
                    if us < best_us:
                        best, best_us = config, us
            if best is not None:
                self.picked[shape] = best
            report[f"{shape[0]}x{shape[1]}"] = {"layers": len(ws), "cublas_us": round(cublas, 2),
                                                "picked": "cublas" if best is None else "triton %d/%d/%d" % best,
                                                "picked_us": round(best_us, 2)}
        return report
