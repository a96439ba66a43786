"""The paged Triton kernels (run by Triton's CPU interpreter here) against the torch reference and the HF modules."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = r'''
import torch
from djinn.engine.attention import (torch_paged_decode_attention, torch_paged_prefill_attention,
                                    triton_paged_decode_attention, triton_paged_prefill_attention)
torch.manual_seed(0)
for (NB, KVH, BS, D, H, B, T) in [(12, 2, 16, 16, 4, 3, 40), (40, 4, 8, 32, 4, 2, 130)]:
    kc, vc = torch.randn(NB, KVH, BS, D), torch.randn(NB, KVH, BS, D)
    q = torch.randn(B, H, D)
    per_row = -(-T // BS)
    tables = torch.stack([torch.randperm(NB)[:per_row] for _ in range(B + 1)]).int()  # scattered blocks
    rows = torch.randperm(B + 1)[:B]
    lens = torch.randint(1, T + 1, (B,))
    ref = torch_paged_decode_attention(q, kc, vc, tables, rows, lens, D ** -0.5, T)
    for splits in (1, 4):  # one program per (row, head), or flash-decoding's split positions + reduce
        out = triton_paged_decode_attention(q, kc, vc, tables, rows, lens, D ** -0.5, tile=32, splits=splits)
        err = ((out - ref).norm() / ref.norm()).item()
        assert err < 1e-5, (splits, err)

# prefill over a cached prefix: rows at different starts, padded to the longest, GQA, scattered blocks
for (NB, KVH, BS, D, H, B, T) in [(30, 2, 8, 16, 4, 3, 11), (40, 4, 4, 32, 4, 2, 20)]:
    kc, vc = torch.randn(NB, KVH, BS, D), torch.randn(NB, KVH, BS, D)
    per_row = NB // (B + 1)
    tables = torch.randperm(NB)[:(B + 1) * per_row].view(B + 1, per_row).int()
    rows, lens = torch.randperm(B + 1)[:B], torch.randint(1, T + 1, (B,))
    starts = torch.cat([torch.zeros(1, dtype=torch.long), torch.randint(1, per_row * BS - T, (B - 1,))])
    q = torch.randn(B, T, H, D)
    ref = torch_paged_prefill_attention(q, kc, vc, tables, rows, starts, lens, D ** -0.5)
    out = triton_paged_prefill_attention(q, kc, vc, tables, rows, starts, lens, D ** -0.5, block_n=16)
    err = ((out - ref).norm() / ref.norm()).item()
    assert err < 1e-5, err

from djinn.models import load_model
from djinn.engine.engine import Engine
from djinn.runners.hf_agent import greedy
lm = load_model("djinn/tiny-llama", weights="synthetic", device="cpu", quiet=True)
eng = Engine(lm.model, max_seq=128, max_slots=4)
assert eng.net.use_triton and eng.net.fused is not None
prompts = [list(range(10, 40)), list(range(50, 60))]
sessions = [eng.open_session().result() for _ in prompts]
futs = [eng.generate(s.id, p, 5) for s, p in zip(sessions, prompts)]
outs = [f.result().tokens for f in futs]
assert outs == [greedy(lm.model, p, 5) for p in prompts]
# a second request per session prefills over its cached prefix (the paged prefill kernel)
futs = [eng.generate(s.id, [7, 8, 9], 3) for s in sessions]
assert [f.result().tokens for f in futs] == [greedy(lm.model, p + o + [7, 8, 9], 3) for p, o in zip(prompts, outs)]
# a decode step rides in the prefill call of a prompt cut into 16-token chunks (both queued before one iteration)
import time
eng.prefill_chunk, riding = 16, []
real = eng.runner.prefill
eng.runner.prefill = lambda rows, chunks, starts, riders=None: riding.append(riders) or real(rows, chunks, starts, riders)
a, b = eng.open_session().result(), eng.open_session().result()
futs = [eng.call(time.sleep, 0.3), eng.generate(a.id, list(range(20, 30)), 12), eng.generate(b.id, list(range(60, 100)), 6)]
assert futs[1].result().tokens == greedy(lm.model, list(range(20, 30)), 12)
assert futs[2].result().tokens == greedy(lm.model, list(range(60, 100)), 6)
assert [r is not None and len(r[0]) for r in riding] == [False, 1, 1, 1]  # a alone, then b's chunks with a's steps
eng.shutdown()

# fp16, scattered blocks: paged prefill equals the HF forward bit for bit; the fused paged decode step
# equals the HF-module step bit for bit, KV writes included
from djinn.engine.kv_cache import PagedKVCache
from djinn.engine.transformer import PagedTransformer
lm16 = load_model("djinn/tiny-llama", weights="synthetic", dtype="float16", device="cpu", quiet=True)
ref = greedy(lm16.model, list(range(10, 30)), 5)
net = PagedTransformer(lm16.model)
cache = PagedKVCache(net.shape, 16, 4, 64, 4, torch.float16, torch.device("cpu"))
net.enable_triton(cache.kv)
assert net.fused is not None
assert greedy(lm16.model, list(range(10, 30)), 5) == ref  # HF's forward still works on the fused weight views
cache.set_rows([0, 2], [[9, 3, 12, 5], [1, 14, 7, 0]])
rows = torch.tensor([0, 2])
prompt = torch.tensor([[5, 9, 2, 8, 1, 3, 3, 7, 4, 6], [7, 1, 1, 4, 2, 9, 8, 5, 3, 2]])
logits = net.prefill(cache.kv, cache.tables, rows, prompt, torch.tensor([0, 0]), torch.tensor([10, 10]), 10, False)
with torch.inference_mode():
    hf = lm16.model(prompt).logits[:, -1]
assert torch.equal(logits, hf), (logits - hf).abs().max()
more = net.prefill(cache.kv, cache.tables, rows, torch.tensor([[11, 12, 13], [14, 15, 16]]), torch.tensor([10, 10]),
                   torch.tensor([3, 3]), 13, True)
with torch.inference_mode():
    hf = lm16.model(torch.cat([prompt, torch.tensor([[11, 12, 13], [14, 15, 16]])], 1)).logits[:, -1]
assert (more - hf).abs().max() < 2e-2  # a cached prefix: same math, another reduction order
kv0 = cache.kv.clone()
pos, tok = torch.tensor([13, 13]), torch.tensor([11, 12])
# the same decode step riding in a prefill of row 1: the same logits and KV as the two calls apart
cache.set_rows([1], [[2, 4, 6, 8]])
fresh = torch.tensor([[3, 1, 4, 1, 5, 9]])
apart = torch.cat([net.prefill(cache.kv, cache.tables, torch.tensor([1]), fresh, torch.tensor([0]), torch.tensor([6]), 6,
                               False), net.decode(cache.kv, cache.tables, rows, tok, pos, span=14)])
kv_apart = cache.kv.clone()
cache.kv.copy_(kv0)
mixed = net.prefill(cache.kv, cache.tables, torch.tensor([1]), fresh, torch.tensor([0]), torch.tensor([6]), 6, False,
                    (rows, tok, pos))
assert mixed.shape == apart.shape and (mixed - apart).abs().max() < 2e-2 and torch.equal(mixed.argmax(-1), apart.argmax(-1))
assert (cache.kv - kv_apart).abs().max() < 2e-2
cache.kv.copy_(kv0)
fused = net.decode(cache.kv, cache.tables, rows, tok, pos, span=14)
kv_fused = cache.kv.clone()
cache.kv.copy_(kv0)
net.fused = None
plain = net.decode(cache.kv, cache.tables, rows, tok, pos, span=14)
assert torch.equal(fused, plain) and torch.equal(kv_fused, cache.kv)
print("OK")
'''


def test_triton_kernel_and_engine_match_the_reference():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr[-2000:]


GEMV_SCRIPT = r'''
import torch
import torch.nn.functional as F
from djinn.engine.gemv import OneRowLinear, gemv, runs
torch.manual_seed(0)
for dtype in (torch.float32, torch.float16):
    w, x = torch.randn(37, 256, dtype=dtype), torch.randn(1, 256, dtype=dtype)  # rows not a multiple of BLOCK_N
    for config in ((4, 128, 8), (16, 256, 4), (8, 64, 2)):
        assert runs(w, config)
        err = (gemv(x, w, config).float() - F.linear(x, w).float()).abs().max().item()
        assert err < (1e-4 if dtype == torch.float32 else 5e-2), (dtype, config, err)
assert not runs(torch.randn(8, 96), (4, 64, 4))  # K must be a multiple of BLOCK_K
import djinn.engine.gemv as gemv_module
assert gemv_module.agrees(x, w, (4, 128, 8))
real = gemv_module.gemv
gemv_module.gemv = lambda x, w, c: real(x, w, c) * 1.05  # a kernel 5% off is not picked
assert not gemv_module.agrees(x, w, (4, 128, 8))
gemv_module.gemv = real
linear = OneRowLinear()
linear.picked[(37, 256)] = (4, 128, 8)
w, two = torch.randn(37, 256), torch.randn(2, 256)
assert torch.equal(linear(two, w), F.linear(two, w))  # more than one row: cuBLAS
assert torch.equal(linear(two[:1], w), gemv(two[:1], w, (4, 128, 8)))

# the fused one-token decode step with every projection on the GEMV matches the cuBLAS step, KV writes included
from djinn.engine.kv_cache import PagedKVCache
from djinn.engine.transformer import PagedTransformer
from djinn.models import load_model
lm = load_model("djinn/tiny-llama", weights="synthetic", device="cpu", quiet=True)
net = PagedTransformer(lm.model)
cache = PagedKVCache(net.shape, 16, 4, 64, 4, torch.float32, torch.device("cpu"))
net.enable_triton(cache.kv)
cache.set_rows([1], [[9, 3, 12, 5]])
net.prefill(cache.kv, cache.tables, torch.tensor([1]), torch.tensor([[5, 9, 2, 8, 1, 3, 3]]), torch.tensor([0]),
            torch.tensor([7]), 7, False)
kv0 = cache.kv.clone()
step = lambda: net.decode(cache.kv, cache.tables, torch.tensor([1]), torch.tensor([4]), torch.tensor([7]), span=8)
plain = step()
kv_plain = cache.kv.clone()
cache.kv.copy_(kv0)
fused = net.fused
for w in fused.w_qkv + fused.w_gate_up + [fused.lm_head.weight] + [l.self_attn.o_proj.weight for l in fused.layers]:
    fused.linear.picked[tuple(w.shape)] = (16, 32, 4)
for l in fused.layers:
    fused.linear.picked[tuple(l.mlp.down_proj.weight.shape)] = (4, 4, 1)  # K = 172
assert len(fused.linear.picked) == 5
calls = []
gemv_module.gemv = lambda x, w, config: calls.append(config) or gemv(x, w, config)
gemv_logits = step()
assert len(calls) == 2 * 4 + 1  # every projection of both layers, and the LM head
assert (gemv_logits - plain).abs().max() < 1e-4 and gemv_logits.argmax() == plain.argmax()
assert (cache.kv - kv_plain).abs().max() < 1e-5
print("OK")
'''


def test_one_row_gemv_matches_cublas():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", GEMV_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr[-2000:]
