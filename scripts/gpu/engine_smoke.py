"""GPU smoke of the paged engine (run with the device tool): CUDA-graph replay, parking and restoring by
blocks, greedy equality with HF, a launch path that never waits for the device, and the decode step
against its weight + KV read floor. One JSON report.

    python3 scripts/gpu/engine_smoke.py --out $OUT/engine-smoke.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from djinn.bench.engine_bench import copy_bandwidth_gbps, logit_gap
from djinn.engine.engine import Engine
from djinn.engine.kv_cache import block_bytes
from djinn.engine.transformer import PagedTransformer
from djinn.models.loader import load_model
from djinn.runners.hf_agent import greedy
from djinn.server.config import ServerConfig
from djinn.server.service import build_engine

PROMPTS = [list(range(1000 + 7 * k, 1072 + 7 * k)) for k in range(4)]


def exactness(lm, engine: Engine, new: int = 30) -> dict:
    """One session alone (batch-1 steps), then four at once and each continued: greedy tokens and the
    teacher-forced logit gap."""
    alone = engine.open_session().result()
    solo = engine.generate(alone.id, PROMPTS[0], new).result().tokens
    engine.close_session(alone.id).result()
    sessions = [engine.open_session().result() for _ in PROMPTS]
    outs = [f.result().tokens for f in [engine.generate(s.id, p, new) for s, p in zip(sessions, PROMPTS)]]
    more = [f.result().tokens for f in [engine.generate(s.id, [5, 6, 7], new) for s in sessions]]
    for s in sessions:
        engine.close_session(s.id).result()
    full = [p + o + [5, 6, 7] for p, o in zip(PROMPTS, outs)]
    return {"alone_equal_hf": solo == greedy(lm.model, PROMPTS[0], new),
            "alone_teacher_forced_gap": logit_gap(lm.model, PROMPTS[0], solo),
            "greedy_equal_hf": [o == greedy(lm.model, p, new) for o, p in zip(outs, PROMPTS)],
            "continued_equal_hf": [m == greedy(lm.model, f, new) for m, f in zip(more, full)],
            "teacher_forced_gap": max(max(logit_gap(lm.model, p, o) for p, o in zip(PROMPTS, outs)),
                                      max(logit_gap(lm.model, f, m) for f, m in zip(full, more)))}


def parking(lm) -> dict:
    """A cache of 24 blocks for 6 sessions of ~5 blocks: every round parks and restores; continuations
    stay exact, and a park + restore into other blocks gives the same bytes."""
    bb = block_bytes(PagedTransformer(lm.model).shape, 16, lm.dtype)
    eng = Engine(lm.model, max_seq=256, kv_budget_bytes=25 * bb, host_blocks=8)
    sessions = [eng.open_session().result() for _ in range(6)]
    history = {s.id: [t + 3 * i for t in PROMPTS[0]] for i, s in enumerate(sessions)}
    new, exact = dict(history), []
    for _ in range(3):
        for s in sessions:
            out = eng.generate(s.id, new[s.id], 8).result().tokens
            exact.append(out == greedy(lm.model, history[s.id], 8))
            history[s.id] += out + [11]
            new[s.id] = [11]
    report = {"rounds_exact": all(exact), "parks": eng.stats["parks"], "restores": eng.stats["restores"],
              "overflow_blocks": len(eng.cache.overflow), "graphed": eng.runner.graphed}
    cache = eng.cache  # bytes through the arena: device blocks 0..3 -> host -> device blocks 10..13
    before = cache.kv[0:4].clone()
    free = eng.sched.take_host(4)
    cache.copy_out([0, 1, 2, 3], free).wait()
    cache.copy_in(free, [10, 11, 12, 13]).wait()
    report["park_restore_bit_identical"] = bool(torch.equal(cache.kv[10:14], before))
    eng.shutdown()
    return report


def decode_steps(lm, engine: Engine, tokens_per_session: int, batches: list[int], bw: float) -> list[dict]:
    """Graph-replayed decode step time at each batch size, sessions of ``tokens_per_session`` tokens,
    against its floor: the weights plus every row's KV read once at the measured copy bandwidth."""
    shape, bs = engine.net.shape, engine.cache.block_size
    kv_token = block_bytes(shape, 1, lm.dtype)
    per = -(-tokens_per_session // bs)
    rows = []
    for b in batches:
        if b * per > engine.cache.n_blocks or b > engine.cache.scratch_row:
            break
        engine.cache.set_rows(list(range(b)), [list(range(i * per, (i + 1) * per)) for i in range(b)])
        args = (list(range(b)), [tokens_per_session - 1] * b)
        for _ in range(3):
            engine.runner.decode(*args)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            engine.runner.decode(*args)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) / 20 * 1e3
        floor = (lm.weight_bytes + b * tokens_per_session * kv_token) / (bw * 1e9) * 1e3
        rows.append({"batch": b, "step_ms": round(ms, 3), "floor_ms": round(floor, 3), "ratio": round(ms / floor, 3)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def profile_step(engine: Engine, b: int) -> list[dict]:
    """Kernel time of one eager decode step at batch ``b`` (the graph replays the same kernels)."""
    dev = engine.device
    args = (engine.cache.kv, engine.cache.tables, torch.arange(b, device=dev), torch.full((b,), 7, device=dev),
            torch.full((b,), 190, device=dev))
    for _ in range(3):
        engine.net.decode(*args, span=0)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            engine.net.decode(*args, span=0)
        torch.cuda.synchronize()
    out = []
    for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:12]:
        out.append({"kernel": e.key[:90], "ms_per_step": round(e.device_time_total / 5 / 1e3, 4), "calls": e.count // 5})
    return out


def launches_never_wait(engine: Engine) -> dict:
    """The engine launches a step before it reads back the last, so its launch path must not synchronize
    with the device (torch follows a blocking host-to-device copy with a stream synchronize). Under torch's
    sync debug mode "error" any synchronizing call raises: a prefill with a decode step riding, a block-table
    update and two graph-replayed decode steps, each through a Pending, on the scratch row."""
    from djinn.engine.model_runner import Pending

    row, cache, runner = engine.cache.scratch_row, engine.cache, engine.runner
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cache.set_rows([row], [[cache.scratch]])
        riders = ([row], [3]) if runner.mixes else None
        pending = [Pending(engine.device).of(runner.prefill([row], [[1, 2, 3]], [0], riders)[1]),
                   Pending(engine.device).of(runner.decode([row], [4], 2))]
        result = {"launch_without_sync": True}
    except RuntimeError as exc:
        result = {"launch_without_sync": False, "error": str(exc).splitlines()[0][:300]}
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    if result["launch_without_sync"]:
        result["read_back"] = [p.get() for p in pending]
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--big", default="meta-llama/Llama-2-7b-hf")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256, 512, 1024])
    args = p.parse_args()
    report: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    tiny = load_model("djinn/tiny-llama", "synthetic", "float32", "cuda", quiet=True)
    eng = build_engine(ServerConfig(device="cuda", max_vram_gb=8), tiny)
    report["tiny_fp32"] = {"graphed": eng.runner.graphed, **exactness(tiny, eng)}
    eng.shutdown()
    report["tiny_fp32_parking"] = parking(tiny)
    print(json.dumps(report), flush=True)

    lm = load_model(args.big, "synthetic", "float16", "cuda", quiet=True)
    t0 = time.perf_counter()
    eng = build_engine(ServerConfig(device="cuda"), lm)
    report["big"] = {"model_id": args.big, "engine_start_s": round(time.perf_counter() - t0, 1),
                     "kv_blocks": eng.cache.n_blocks, "host_kv_blocks": eng.cache.host_blocks}
    report["big"].update(exactness(lm, eng))
    report["big"].update(launches_never_wait(eng))
    bw = copy_bandwidth_gbps(lm.device)
    report["big"]["copy_bandwidth_gbps"] = bw
    report["big"]["decode_steps_190_tokens"] = decode_steps(lm, eng, 190, args.batches, bw)
    report["big"]["profile_b1"] = profile_step(eng, 1)
    report["big"]["profile_b256"] = profile_step(eng, 256)
    eng.shutdown()
    text = json.dumps(report, indent=2)
    print(text)
    with open(args.out, "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
