"""Probe: djinn.engine.gemv's Triton GEMV against F.linear (cuBLAS) on the Llama-2-7B one-token shapes, in
GB/s of weight read, over a sweep of launch settings wider than the engine's CONFIGS. Each shape's GEMVs
run as the decode step runs them: one per layer, distinct weights, replayed from a CUDA graph.

    python3 scripts/gpu/gemv_probe.py
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from djinn.engine.gemv import CONFIGS, graph_us, gemv, runs


def main() -> None:
    dev = torch.device("cuda")
    # (out, in) of the 7B decode step's weights, and how many of each one step reads
    shapes = {"qkv": (12288, 4096, 32), "o": (4096, 4096, 32), "gate_up": (22016, 4096, 32),
              "down": (4096, 11008, 32), "lm_head": (32000, 4096, 1)}
    # settings whose fp32 accumulator holds at most 64 values a thread (more spills registers)
    sweep = sorted({c for c in itertools.product((2, 4, 8, 16, 32), (128, 256, 512, 1024), (2, 4, 8))
                    if c[0] * c[1] <= 64 * 32 * c[2]} | set(CONFIGS))
    total = {"cublas": 0.0, "best": 0.0, "engine": 0.0}
    for name, (n, k, count) in shapes.items():
        ws = [torch.randn(n, k, dtype=torch.float16, device=dev) * 0.02 for _ in range(max(count, 4))]
        x = torch.randn(1, k, dtype=torch.float16, device=dev)
        ref = F.linear(x, ws[0]).float()
        gb = n * k * 2 / 1e9
        base = graph_us([lambda w=w: F.linear(x, w) for w in ws], dev)
        results = []
        for config in sweep:
            if runs(ws[0], config):
                err = (gemv(x, ws[0], config).float() - ref).abs().max().item()
                results.append((graph_us([lambda w=w: gemv(x, w, config) for w in ws], dev), config, err))
        results.sort()
        us, config, err = results[0]
        engine = min([base] + [r[0] for r in results if r[1] in CONFIGS])
        total["cublas"] += base * count
        total["best"] += us * count
        total["engine"] += engine * count
        print(f"{name} [{n}x{k}] x{count}: cuBLAS {base:.1f} us ({gb / base * 1e6:.0f} GB/s); Triton best {us:.1f} us "
              f"({gb / us * 1e6:.0f} GB/s) at {config}, max err {err:.2e}; engine's pick {engine:.1f} us; next: "
              + ", ".join(f"{r[0]:.1f}@{r[1]}" for r in results[1:6]), flush=True)
        del ws
        torch.cuda.empty_cache()
    print(f"a 7B decode step's GEMVs, in graphs: cuBLAS {total['cublas'] / 1e3:.2f} ms, engine's pick "
          f"{total['engine'] / 1e3:.2f} ms, best of the sweep per shape {total['best'] / 1e3:.2f} ms")


if __name__ == "__main__":
    main()
