"""The Triton pool attention (run by Triton's CPU interpreter here) against the torch reference."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = r'''
import torch
from djinn.engine.attention import torch_pool_decode_attention, triton_pool_decode_attention
torch.manual_seed(0)
for (S, KVH, T, D, H, B) in [(5, 2, 40, 16, 4, 3), (4, 4, 130, 32, 4, 2)]:
    kp, vp = torch.randn(S, KVH, T, D), torch.randn(S, KVH, T, D)
    q = torch.randn(B, H, D)
    slots = torch.randint(0, S, (B,))
    lens = torch.randint(1, T + 1, (B,))
    ref = torch_pool_decode_attention(q, kp, vp, slots, lens, D ** -0.5, T)
    out = triton_pool_decode_attention(q, kp, vp, slots, lens, D ** -0.5, block=32)
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
futs = [eng.generate(s.id, p, 8) for s, p in zip(sessions, prompts)]
assert [f.result().tokens for f in futs] == [greedy(lm.model, p, 8) for p in prompts]
eng.shutdown()

# the fused fp16 step equals the HF-module step bit for bit, KV writes included
from djinn.engine.kv_pool import KVPool
from djinn.engine.transformer import PoolTransformer
lm16 = load_model("djinn/tiny-llama", weights="synthetic", dtype="float16", device="cpu", quiet=True)
ref = greedy(lm16.model, list(range(10, 30)), 5)
net = PoolTransformer(lm16.model)
pool = KVPool(net.shape, 4, 64, torch.float16, torch.device("cpu"))
net.enable_triton(pool.k)
assert net.fused is not None
assert greedy(lm16.model, list(range(10, 30)), 5) == ref  # HF's forward still works on the fused weight views
slots = torch.tensor([0, 2])
net.prefill(pool.k, pool.v, slots, torch.tensor([[5] * 10, [7] * 10]), torch.tensor([0, 3]))
k0, v0 = pool.k.clone(), pool.v.clone()
pos, tok = torch.tensor([10, 13]), torch.tensor([11, 12])
fused = net.decode(pool.k, pool.v, slots, tok, pos, span=14)
k_fused = pool.k.clone()
pool.k.copy_(k0)
pool.v.copy_(v0)
net.fused = None
plain = net.decode(pool.k, pool.v, slots, tok, pos, span=14)
assert torch.equal(fused, plain) and torch.equal(k_fused, pool.k)
print("OK")
'''


def test_triton_kernel_and_engine_match_the_reference():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr[-2000:]
