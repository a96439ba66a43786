"""Decode attention straight from the paged KV cache.

``paged_decode_attention(q, k_cache, v_cache, tables, rows, lengths)``: for every batch row b, query
``q[b]`` ([heads, head_dim]) attends to positions ``0..lengths[b]-1`` of the request whose block table
is ``tables[rows[b]]``; position t lives in block ``tables[rows[b], t // block_size]`` at offset
``t % block_size`` of ``k_cache``/``v_cache`` ([blocks, kv_heads, block_size, head_dim], any strides),
with grouped-query heads. The Triton kernel reads the blocks in place (no gather copy) with static
shapes, so the decode step can be a CUDA graph. The torch version is the reference and the CPU path.
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


def gather_positions(cache: torch.Tensor, tables: torch.Tensor, rows: torch.Tensor, span: int) -> torch.Tensor:
    """Positions ``0..span-1`` of each row's request, [B, kv_heads, span, head_dim] (a copy)."""
    bs = cache.shape[2]
    t = torch.arange(span, device=cache.device)
    blocks = tables[rows][:, t // bs].long()  # [B, span]
    return cache[blocks, :, t % bs].transpose(1, 2)


@sdpa_kernel(SDPA_BACKENDS)
def torch_paged_decode_attention(q, k_cache, v_cache, tables, rows, lengths, scale: float, span: int):
    """Reference: gather the first ``span`` positions of each row, mask past its length."""
    B = q.shape[0]
    kk, vv = gather_positions(k_cache, tables, rows, span), gather_positions(v_cache, tables, rows, span)
    mask = (torch.arange(span, device=q.device)[None, :] < lengths[:, None]).view(B, 1, 1, span)
    o = F.scaled_dot_product_attention(q.unsqueeze(2), kk, vv, attn_mask=mask, scale=scale,
                                       enable_gqa=kk.shape[1] != q.shape[1])
    return o.view(B, -1)


if triton is not None:

    @triton.jit
    def _paged_decode_kernel(Q, K, V, O, PM, PL, TABLES, ROWS, LENS, scale,
                             sq_b, sq_h, sk_b, sk_h, sk_t, st_r, so_b, so_h,
                             GROUP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, TILE: tl.constexpr,
                             SPLITS: tl.constexpr):
        """Program (b, h, split): online softmax over this split's share of row b's positions. With one
        split it writes the output; with several, partial (max, denominator, numerator) that the reduce
        kernel combines (flash-decoding: a small batch still fills the GPU)."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        sp = tl.program_id(2)
        row = tl.load(ROWS + b).to(tl.int64)
        length = tl.load(LENS + b)
        per = tl.cdiv(tl.cdiv(length, SPLITS), BS) * BS
        lo = sp * per
        hi = tl.minimum(length, lo + per)
        kvh = h // GROUP
        d = tl.arange(0, D)
        q = tl.load(Q + b * sq_b + h * sq_h + d).to(tl.float32) * scale
        m = tl.full([1], float("-inf"), tl.float32)
        denom = tl.zeros([1], tl.float32)
        acc = tl.zeros([D], tl.float32)
        for start in range(lo, hi, TILE):
            t = start + tl.arange(0, TILE)
            valid = t < hi
            blk = tl.load(TABLES + row * st_r + t // BS, mask=valid, other=0).to(tl.int64)
            offs = blk[:, None] * sk_b + kvh * sk_h + (t % BS)[:, None] * sk_t + d[None, :]
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
        if SPLITS == 1:
            tl.store(O + b * so_b + h * so_h + d, (acc / denom).to(O.dtype.element_ty))
        else:
            part = (b * tl.num_programs(1) + h) * SPLITS + sp
            tl.store(PM + part + tl.arange(0, 1), m)
            tl.store(PL + part + tl.arange(0, 1), denom)
            tl.store(PM + tl.num_programs(0) * tl.num_programs(1) * SPLITS + part * D + d, acc)

    @triton.jit
    def _split_reduce_kernel(O, PM, PL, so_b, so_h, D: tl.constexpr, SPLITS: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        base = (b * tl.num_programs(1) + h) * SPLITS
        sp = tl.arange(0, SPLITS)
        m = tl.load(PM + base + sp)
        l = tl.load(PL + base + sp)
        top = tl.max(m, axis=0)
        w = tl.where(m > float("-inf"), tl.exp(m - top), 0.0)
        d = tl.arange(0, D)
        acc = tl.load(PM + tl.num_programs(0) * tl.num_programs(1) * SPLITS + (base + sp)[:, None] * D + d[None, :])
        out = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * l, axis=0)
        tl.store(O + b * so_b + h * so_h + d, out.to(O.dtype.element_ty))


def decode_splits(batch: int, heads: int, max_seq: int, sms: int, block_size: int = 16) -> int:
    """Splits of each row's positions so that batch x heads x splits programs fill the GPU about twice
    (a power of two, at least a block of positions per split)."""
    splits = 1
    while batch * heads * splits < 2 * sms and splits * 2 * block_size <= max_seq:
        splits *= 2
    return splits


def triton_paged_decode_attention(q, k_cache, v_cache, tables, rows, lengths, scale: float, tile: int = 64,
                                  splits: int = 1):
    """q [B, H, D], caches [blocks, KVH, BS, D] (same strides), tables [R, max_blocks], rows/lengths [B] -> [B, H*D]."""
    B, H, D = q.shape
    group = H // k_cache.shape[1]
    out = torch.empty_like(q)
    # partials of a split run: max per (b, h, split), then the numerators ([.., D]); denominators apart
    part = torch.empty(B * H * splits * (D + 1), dtype=torch.float32, device=q.device) if splits > 1 else out
    part_l = torch.empty(B * H * splits, dtype=torch.float32, device=q.device) if splits > 1 else out
    _paged_decode_kernel[(B, H, splits)](q, k_cache, v_cache, out, part, part_l, tables, rows, lengths, scale,
                                         q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
                                         k_cache.stride(2), tables.stride(0), out.stride(0), out.stride(1),
                                         GROUP=group, D=D, BS=k_cache.shape[2], TILE=tile, SPLITS=splits)
    if splits > 1:
        _split_reduce_kernel[(B, H)](out, part, part_l, out.stride(0), out.stride(1), D=D, SPLITS=splits)
    return out.view(B, H * D)


def triton_supported(q: torch.Tensor, head_dim: int) -> bool:
    """The kernel needs Triton, a CUDA tensor (or the interpreter) and a power-of-two head dim >= 16."""
    on_device = q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return triton is not None and on_device and head_dim >= 16 and head_dim & (head_dim - 1) == 0
