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
print("OK")
'''


def test_triton_kernel_and_engine_match_the_reference():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr[-2000:]
