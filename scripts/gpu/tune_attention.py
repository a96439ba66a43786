"""Launch settings of the paged attention kernels, swept on the GPU (Llama-2-7B's heads, fp16).

Decode: batch rows of ``length`` cached positions each, read through scattered block tables, for each
(tile, warps, stages, splits); prefill over a cached prefix: rows of new tokens after ``start`` positions,
for each (block_m, block_n, warps, stages). Prints microseconds (median of triton.testing.do_bench) and
the KV bytes read per second, best first, and writes every point to --out.

    python3 scripts/gpu/tune_attention.py --out $OUT/tune.json
"""
from __future__ import annotations

import argparse
import inspect
import itertools
import json

import torch
import triton

from djinn.engine.attention import (decode_splits, torch_paged_prefill_attention, triton_paged_decode_attention,
                                    triton_paged_prefill_attention)

H = KVH = 32
D, BS, LAYERS = 128, 16, 2


def cache(blocks: int):
    """A [blocks, layers, 2, KVH, BS, D] cache like the engine's, and layer 0's K and V views."""
    kv = torch.randn(blocks, LAYERS, 2, KVH, BS, D, dtype=torch.float16, device="cuda")
    return kv, kv[:, 0, 0], kv[:, 0, 1]


def tables_for(rows: int, per_row: int, blocks: int) -> torch.Tensor:
    return torch.randperm(blocks, device="cuda")[:rows * per_row].view(rows, per_row).int()


def defaults(fn) -> dict:
    """The launch settings ``fn`` uses when not given: what the engine runs."""
    return {k: v.default for k, v in inspect.signature(fn).parameters.items() if v.default is not inspect.Parameter.empty}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--decode-only", action="store_true", help="skip the prefill kernel's sweep")
    args = p.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    points = []
    for batch, length in ((1, 123), (64, 123), (512, 97), (512, 123), (512, 190), (1024, 190)):
        per_row = -(-length // BS) + 1
        kv, kc, vc = cache(batch * per_row + 8)
        tables = tables_for(batch, per_row, kv.shape[0])
        rows = torch.arange(batch, device="cuda")
        lens = torch.full((batch,), length, device="cuda")
        q = torch.randn(batch, H, D, dtype=torch.float16, device="cuda")
        nbytes = 2 * batch * length * KVH * D * 2
        default = decode_splits(batch, H, per_row * BS, sms, BS)
        ref = triton_paged_decode_attention(q, kc, vc, tables, rows, lens, D ** -0.5, splits=default)
        for tile, warps, stages, splits in itertools.product((32, 64, 128), (2, 4, 8), (1, 2, 3),
                                                              sorted({default, 2 * default})):
            fn = lambda: triton_paged_decode_attention(q, kc, vc, tables, rows, lens, D ** -0.5, tile=tile,  # noqa: E731
                                                       splits=splits, warps=warps, stages=stages)
            out = fn()
            assert (out - ref).abs().max() < 1e-2
            us = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
            points.append({"kernel": "decode", "batch": batch, "length": length, "tile": tile, "warps": warps,
                           "stages": stages, "splits": splits, "default_splits": default, "us": us,
                           "gbps": nbytes / us / 1e3})
    for rows_n, width, start in () if args.decode_only else ((113, 18, 122), (28, 72, 0), (4, 512, 0)):
        per_row = -(-(start + width) // BS) + 1
        kv, kc, vc = cache(rows_n * per_row + 8)
        tables = tables_for(rows_n, per_row, kv.shape[0])
        rows = torch.arange(rows_n, device="cuda")
        starts = torch.full((rows_n,), start, device="cuda")
        lens = torch.full((rows_n,), width, device="cuda")
        q = torch.randn(rows_n, width, H, D, dtype=torch.float16, device="cuda")
        ref = torch_paged_prefill_attention(q, kc, vc, tables, rows, starts, lens, D ** -0.5)
        sdpa = lambda: torch_paged_prefill_attention(q, kc, vc, tables, rows, starts, lens, D ** -0.5)  # noqa: E731
        points.append({"kernel": "prefill-gather-sdpa", "rows": rows_n, "width": width, "start": start,
                       "us": triton.testing.do_bench(sdpa, warmup=25, rep=100, return_mode="median") * 1e3})
        for bm, bn, warps, stages in itertools.product((16, 32, 64), (32, 64, 128), (4, 8), (2, 3)):
            fn = lambda: triton_paged_prefill_attention(q, kc, vc, tables, rows, starts, lens, D ** -0.5,  # noqa: E731
                                                        block_m=bm, block_n=bn, warps=warps, stages=stages)
            try:
                out = fn()
            except Exception as exc:  # a shape the compiler refuses (shared memory): skip it
                print(f"prefill {bm}x{bn} w{warps} s{stages}: {str(exc).splitlines()[0][:100]}")
                continue
            assert ((out.float() - ref.float()).norm() / ref.float().norm()) < 1e-2
            us = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
            points.append({"kernel": "prefill", "rows": rows_n, "width": width, "start": start, "block_m": bm,
                           "block_n": bn, "warps": warps, "stages": stages, "us": us})
    with open(args.out, "w") as f:
        json.dump(points, f, indent=1)
    for key in sorted({(x["kernel"], x.get("batch", x.get("rows")), x.get("length", x.get("width"))) for x in points}):
        group = sorted([x for x in points if (x["kernel"], x.get("batch", x.get("rows")),
                                              x.get("length", x.get("width"))) == key], key=lambda x: x["us"])
        print(key)
        for x in group[:4]:
            print("   ", {k: (round(v, 1) if isinstance(v, float) else v) for k, v in x.items()
                         if k not in ("kernel", "batch", "length", "rows", "width", "start")})
        dec = defaults(triton_paged_decode_attention)
        pre = defaults(triton_paged_prefill_attention)
        cur = [x for x in group if x.get("tile") == dec["tile"] and x.get("warps") == dec["warps"]
               and x.get("stages") == dec["stages"] and x.get("splits") == x.get("default_splits")] + \
              [x for x in group if x.get("block_m") == (pre["block_m"] or (64 if x["width"] >= 256 else 32))
               and x.get("block_n") == pre["block_n"] and x.get("warps") == pre["warps"] and x.get("stages") == pre["stages"]]
        if cur:
            print("    current:", round(cur[0]["us"], 1), "us")


if __name__ == "__main__":
    main()
