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
from typing import Optional

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


    # T varies call to call: specializing on it (T % 16 == 0, T == 1) would compile mid-run (~0.6 s each)
    @triton.jit(do_not_specialize=["T"])
    def _paged_prefill_kernel(Q, K, V, O, TABLES, ROWS, STARTS, LENS, scale, T,
                              sq_t, sq_h, sk_b, sk_h, sk_t, st_r, so_t, so_h,
                              GROUP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
        """Program (b, h, query tile): flash attention of row b's queries at positions ``start + m`` over
        positions ``0..start + m`` of its cache, read through its block table (no gather copy)."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
        row = tl.load(ROWS + b).to(tl.int64)
        start = tl.load(STARTS + b)
        length = tl.load(LENS + b)
        mvalid = m < length
        qpos = start + m
        kvh = h // GROUP
        d = tl.arange(0, D)
        q = tl.load(Q + (b * T + m)[:, None] * sq_t + h * sq_h + d[None, :], mask=mvalid[:, None], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        hi = start + tl.minimum(length, (tl.program_id(2) + 1) * BLOCK_M)  # past this tile's last query
        for n0 in range(0, hi, BLOCK_N):
            t = n0 + tl.arange(0, BLOCK_N)
            tvalid = t < hi
            blk = tl.load(TABLES + row * st_r + t // BS, mask=tvalid, other=0).to(tl.int64)
            offs = blk[:, None] * sk_b + kvh * sk_h + (t % BS)[:, None] * sk_t + d[None, :]
            k = tl.load(K + offs, mask=tvalid[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            s = tl.where((t[None, :] <= qpos[:, None]) & tvalid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing to attend to yet
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(V + offs, mask=tvalid[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        out = tl.where(mvalid[:, None], acc / l_i[:, None], 0.0)  # padding queries get zeros, never NaN
        tl.store(O + (b * T + m)[:, None] * so_t + h * so_h + d[None, :], out.to(O.dtype.element_ty),
                 mask=(m < T)[:, None])


def torch_paged_prefill_attention(q, k_cache, v_cache, tables, rows, starts, lens, scale: float):
    """Reference: q [B, T, H, D] at positions ``starts[b] + t`` attends causally to its row's cache
    (already holding these positions), gathered; -> [B*T, H*D] (padding queries: zeros)."""
    B, T, H, D = q.shape
    end = int((starts + lens).max())
    kk, vv = gather_positions(k_cache, tables, rows, end), gather_positions(v_cache, tables, rows, end)
    qpos = starts[:, None] + torch.arange(T, device=q.device)[None, :]  # [B, T]
    mask = (torch.arange(end, device=q.device)[None, None, :] <= qpos[:, :, None]).unsqueeze(1)
    with sdpa_kernel(SDPA_BACKENDS):
        o = F.scaled_dot_product_attention(q.transpose(1, 2), kk, vv, attn_mask=mask, scale=scale,
                                           enable_gqa=kk.shape[1] != H)
    valid = (torch.arange(T, device=q.device)[None, :] < lens[:, None]).view(B, T, 1, 1)
    return o.transpose(1, 2).masked_fill(~valid, 0).reshape(B * T, H * D)


def triton_paged_prefill_attention(q, k_cache, v_cache, tables, rows, starts, lens, scale: float,
                                   block_m: Optional[int] = None, block_n: int = 32, warps: int = 4, stages: int = 3):
    """q [B, T, H, D] (any strides with a unit last one) -> [B*T, H*D]; see :func:`torch_paged_prefill_attention`.
    Query tiles of 32 (64 for chunks of 256+ tokens) and key tiles of 32 were the fastest on an H200 for
    113 rows of 18, 28 of 72 and 4 of 512 (scripts/gpu/tune_attention.py)."""
    B, T, H, D = q.shape
    block_m = block_m or (64 if T >= 256 else 32)
    q = q.reshape(B * T, H, D)
    out = torch.empty(B * T, H, D, dtype=q.dtype, device=q.device)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _paged_prefill_kernel[(B, H, triton.cdiv(T, block_m))](
        q, k_cache, v_cache, out, tables, rows, starts, lens, scale, T,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), tables.stride(0),
        out.stride(0), out.stride(1), GROUP=H // k_cache.shape[1], D=D, BS=k_cache.shape[2], BLOCK_M=block_m,
        BLOCK_N=block_n, PRECISION=precision, num_warps=warps, num_stages=stages)
    return out.view(B * T, H * D)


def decode_splits(batch: int, heads: int, max_seq: int, sms: int, block_size: int = 16) -> int:
    """Splits of each row's positions so that batch x heads x splits programs fill the GPU about twice
    (a power of two, at least a block of positions per split)."""
    splits = 1
    while batch * heads * splits < 2 * sms and splits * 2 * block_size <= max_seq:
        splits *= 2
    return splits


def triton_paged_decode_attention(q, k_cache, v_cache, tables, rows, lengths, scale: float, tile: int = 64,
                                  splits: int = 1, warps: int = 2, stages: int = 2):
    """q [B, H, D], caches [blocks, KVH, BS, D] (same strides), tables [R, max_blocks], rows/lengths [B] -> [B, H*D].
    Two warps a program read the KV at 3.8-4.1 TB/s on an H200 for 512-1,024 rows of 123-190 positions
    (four warps: 3.0-3.2; scripts/gpu/tune_attention.py)."""
    B, H, D = q.shape
    group = H // k_cache.shape[1]
    out = torch.empty_like(q)
    # partials of a split run: max per (b, h, split), then the numerators ([.., D]); denominators apart
    part = torch.empty(B * H * splits * (D + 1), dtype=torch.float32, device=q.device) if splits > 1 else out
    part_l = torch.empty(B * H * splits, dtype=torch.float32, device=q.device) if splits > 1 else out
    _paged_decode_kernel[(B, H, splits)](q, k_cache, v_cache, out, part, part_l, tables, rows, lengths, scale,
                                         q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
                                         k_cache.stride(2), tables.stride(0), out.stride(0), out.stride(1),
                                         GROUP=group, D=D, BS=k_cache.shape[2], TILE=tile, SPLITS=splits,
                                         num_warps=warps, num_stages=stages)
    if splits > 1:
        _split_reduce_kernel[(B, H)](out, part, part_l, out.stride(0), out.stride(1), D=D, SPLITS=splits)
    return out.view(B, H * D)


def triton_supported(q: torch.Tensor, head_dim: int) -> bool:
    """The kernel needs Triton, a CUDA tensor (or the interpreter) and a power-of-two head dim >= 16."""
    on_device = q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return triton is not None and on_device and head_dim >= 16 and head_dim & (head_dim - 1) == 0
