"""Can a decode step's attention (bound by KV bytes) run under its GEMMs (bound by FLOPs at hundreds of rows)?

At 512 rows a Llama-2-7B decode step runs its GEMMs (FLOP-bound) and then its paged attention (KV-bound),
one after the other. This times, over 32 layers of random fp16 weights and a paged KV cache of ``--length``
positions per row: the whole batch's GEMMs then attention per layer (as the engine runs), the two halves
of the batch one after the other, and the two halves on two streams (one starts with its attention, the
other with its GEMMs), which is the most any two-stream split of the step could gain. Prints ms per step.

    python3 scripts/gpu/overlap_probe.py --rows 512 --out $OUT/overlap.json
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from djinn.engine.attention import decode_splits, triton_paged_decode_attention

HIDDEN, INTER, H, D, BS, LAYERS = 4096, 11008, 32, 128, 16, 32


def build(rows: int, length: int):
    dev, dt = "cuda", torch.float16
    weights = [(torch.randn(3 * HIDDEN, HIDDEN, dtype=dt, device=dev) * 0.02,
                torch.randn(HIDDEN, HIDDEN, dtype=dt, device=dev) * 0.02,
                torch.randn(2 * INTER, HIDDEN, dtype=dt, device=dev) * 0.02,
                torch.randn(HIDDEN, INTER, dtype=dt, device=dev) * 0.02) for _ in range(LAYERS)]
    per_row = -(-length // BS)
    kv = torch.randn(rows * per_row + 1, LAYERS, 2, H, BS, D, dtype=dt, device=dev)
    tables = torch.randperm(rows * per_row, device=dev)[:rows * per_row].view(rows, per_row).int()
    lengths = torch.full((rows,), length, device=dev)
    return weights, kv, tables, lengths


def gemms(x, w):
    """The layer's four projections on ``x`` [M, hidden] (SiLU-multiply left out: a copy-bound pass)."""
    qkv = F.linear(x, w[0])
    o = F.linear(qkv[:, :HIDDEN], w[1])
    gu = F.linear(o, w[2])
    return F.linear(gu[:, :INTER], w[3])


def attention(q, kv, li, tables, rows, lengths, splits):
    return triton_paged_decode_attention(q, kv[:, li, 0], kv[:, li, 1], tables, rows, lengths, D ** -0.5,
                                         splits=splits)


def timed(fn, reps: int = 5) -> float:
    """Median ms of ``fn`` over ``reps`` runs after two warm-ups, the device idle before each."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--length", type=int, default=122, help="cached positions per row (a Reason wave's mean)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    weights, kv, tables, lengths = build(args.rows, args.length)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    half = args.rows // 2
    x = torch.randn(args.rows, HIDDEN, dtype=torch.float16, device="cuda")
    q = torch.randn(args.rows, H, D, dtype=torch.float16, device="cuda")
    rows_all = torch.arange(args.rows, device="cuda")
    parts = [(x[:half], q[:half], rows_all[:half], lengths[:half]), (x[half:], q[half:], rows_all[half:], lengths[half:])]
    s_all, s_half = (decode_splits(n, H, tables.shape[1] * BS, sms, BS) for n in (args.rows, half))
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]

    def whole():
        for li in range(LAYERS):
            gemms(x, weights[li])
            attention(q, kv, li, tables, rows_all, lengths, s_all)

    def halves_in_turn():
        for li in range(LAYERS):
            for xx, qq, rr, ll in parts:
                gemms(xx, weights[li])
                attention(qq, kv, li, tables, rr, ll, s_half)

    def halves_on_two_streams():
        main_stream = torch.cuda.current_stream()
        for s in streams:
            s.wait_stream(main_stream)
        for k, (s, (xx, qq, rr, ll)) in enumerate(zip(streams, parts)):
            with torch.cuda.stream(s):
                for li in range(LAYERS):
                    if k == 0:
                        attention(qq, kv, li, tables, rr, ll, s_half)
                        gemms(xx, weights[li])
                    else:
                        gemms(xx, weights[li])
                        attention(qq, kv, li, tables, rr, ll, s_half)
        for s in streams:
            main_stream.wait_stream(s)

    report = {"device": torch.cuda.get_device_name(), "rows": args.rows, "length": args.length,
              "gemms_only_ms": timed(lambda: [gemms(x, weights[li]) for li in range(LAYERS)]),
              "attention_only_ms": timed(lambda: [attention(q, kv, li, tables, rows_all, lengths, s_all)
                                                   for li in range(LAYERS)]),
              "whole_ms": timed(whole), "halves_in_turn_ms": timed(halves_in_turn),
              "halves_on_two_streams_ms": timed(halves_on_two_streams)}
    print(json.dumps(report, indent=1))
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
