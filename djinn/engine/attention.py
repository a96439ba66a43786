"""Decode attention straight from the slotted KV pool.

``pool_decode_attention(q, k_pool, v_pool, slots, lengths)``: for every batch row b,
query ``q[b]`` ([heads, head_dim]) attends to positions ``0..lengths[b]-1`` of slot
``slots[b]`` in ``k_pool``/``v_pool`` ([slots, kv_heads, max_seq, head_dim]), with
grouped-query heads. The Triton kernel reads each session's cache in place (no
gather copy) and has static shapes, so the decode step can be a CUDA graph. The
torch version is the reference and the CPU path.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path serves
    triton = None


# PyTorch's cuDNN attention builds a plan for every new shape (~1 s each on an H100, measured); the
# engine's prefill and the baselines' HF generate meet a new shape at nearly every call, so it is left out.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@sdpa_kernel(SDPA_BACKENDS)
def torch_pool_decode_attention(q, k_pool, v_pool, slots, lengths, scale: float, span: int):
    """Reference: gather the first ``span`` positions of each row's slot, mask past its length."""
    B = q.shape[0]
    kk = k_pool[:, :, :span][slots]  # [B, KVH, span, D]
    vv = v_pool[:, :, :span][slots]
    mask = (torch.arange(span, device=q.device)[None, :] < lengths[:, None]).view(B, 1, 1, span)
    o = F.scaled_dot_product_attention(q.unsqueeze(2), kk, vv, attn_mask=mask, scale=scale,
                                       enable_gqa=kk.shape[1] != q.shape[1])
    return o.view(B, -1)


if triton is not None:

    @triton.jit
    def _decode_kernel(Q, K, V, O, SLOTS, LENS, scale,
                       sq_b, sq_h, sk_s, sk_h, sk_t, so_b, so_h,
                       GROUP: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        slot = tl.load(SLOTS + b).to(tl.int64)
        length = tl.load(LENS + b)
        kvh = h // GROUP
        d = tl.arange(0, D)
        q = tl.load(Q + b * sq_b + h * sq_h + d).to(tl.float32) * scale
        base = slot * sk_s + kvh * sk_h
        m = tl.full([1], float("-inf"), tl.float32)
        denom = tl.zeros([1], tl.float32)
        acc = tl.zeros([D], tl.float32)
        for start in range(0, length, BLOCK):
            t = start + tl.arange(0, BLOCK)
            valid = t < length
            offs = base + t[:, None] * sk_t + d[None, :]
            k = tl.load(K + offs, mask=valid[:, None], other=0.0).to(tl.float32)
            s = tl.sum(k * q[None, :], axis=1)
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=0))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new)
            v = tl.load(V + offs, mask=valid[:, None], other=0.0).to(tl.float32)
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
            denom = denom * alpha + tl.sum(p, axis=0)
            m = m_new
        tl.store(O + b * so_b + h * so_h + d, (acc / denom).to(O.dtype.element_ty))


def triton_pool_decode_attention(q, k_pool, v_pool, slots, lengths, scale: float, block: int = 64):
    """q [B, H, D], pools [S, KVH, T, D] (contiguous), slots/lengths [B] -> [B, H*D]."""
    B, H, D = q.shape
    group = H // k_pool.shape[1]
    out = torch.empty_like(q)
    _decode_kernel[(B, H)](q, k_pool, v_pool, out, slots, lengths, scale,
                           q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
                           out.stride(0), out.stride(1), GROUP=group, D=D, BLOCK=block)
    return out.view(B, H * D)


def triton_supported(q: torch.Tensor, head_dim: int) -> bool:
    """The kernel needs Triton, a CUDA tensor (or the interpreter) and a power-of-two head dim >= 16."""
    on_device = q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return triton is not None and on_device and head_dim >= 16 and head_dim & (head_dim - 1) == 0
