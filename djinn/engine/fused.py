"""Fused decode steps and prefill calls for Llama-style models on the GPU (Triton).

The HF modules spend ~45 small kernels per layer on a one-token step (fp32 RMSNorm, rotary as
multiply/cat, KV scatters, SiLU, residual adds); at batch 1 their launches cost about as much as
reading the weights, and in a 2,000-token prefill their passes over fp32 copies cost a third of the
call (measured on an H200: 60.5 ms for 28 rows of 72 tokens, 37.5 ms of it GEMMs). Here each layer is:
residual-add + RMSNorm (1 kernel), one q|k|v GEMM, rotary + KV-cache write (1), attention, o GEMM,
add + RMSNorm (1), one gate|up GEMM, SiLU-multiply (1), down GEMM. Every rounding step matches HF's
half-precision order, so the logits equal the HF modules' up to the order of one reduction. A step of
one token may read its weights with a Triton GEMV instead of cuBLAS, per shape, where measured faster
(:mod:`djinn.engine.gemv`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from torch.nn.attention import sdpa_kernel

from djinn.engine.attention import (SDPA_BACKENDS, triton, triton_paged_decode_attention,
                                    triton_paged_prefill_attention)
from djinn.engine.gemv import OneRowLinear

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _add_rmsnorm_kernel(X, DELTA, W, OUT, eps, N: tl.constexpr, BLOCK: tl.constexpr, HAS_DELTA: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        m = cols < N
        x = tl.load(X + row * N + cols, mask=m, other=0.0)
        if HAS_DELTA:  # residual += delta, rounded like a half-precision add
            x = (x.to(tl.float32) + tl.load(DELTA + row * N + cols, mask=m, other=0.0).to(tl.float32)).to(x.dtype)
            tl.store(X + row * N + cols, x, mask=m)
        xf = x.to(tl.float32)
        var = tl.sum(xf * xf, axis=0) / N
        normed = (xf * (1.0 / tl.sqrt(var + eps))).to(x.dtype)
        w = tl.load(W + cols, mask=m, other=0.0)
        tl.store(OUT + row * N + cols, (w.to(tl.float32) * normed.to(tl.float32)).to(x.dtype), mask=m)

    @triton.jit
    def _rope_store_kernel(Q, K, V, QOUT, KOUT, KC, VC, COS, SIN, POS, TABLES, ROWS,
                           sq, sk, sv, sc_b, sc_h, sc_t, st_r, H: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr,
                           BS: tl.constexpr, HB: tl.constexpr, WRITE_K: tl.constexpr):
        """Program (token b, group g of HB heads): rotary on those q heads (g < H / HB) or k heads, whose k
        and v go into token b's cache slot (its row's block for its position); ``WRITE_K``: the rotated k
        also to KOUT [tokens, KVH, D] (prefill's attention)."""
        b = tl.program_id(0)
        g = tl.program_id(1)
        half = tl.arange(0, D // 2)[None, :]
        pos = tl.load(POS + b).to(tl.int64)
        c1 = tl.load(COS + pos * D + half).to(tl.float32)
        c2 = tl.load(COS + pos * D + D // 2 + half).to(tl.float32)
        s1 = tl.load(SIN + pos * D + half).to(tl.float32)
        s2 = tl.load(SIN + pos * D + D // 2 + half).to(tl.float32)
        is_q = g < H // HB
        heads = (tl.where(is_q, g, g - H // HB) * HB + tl.arange(0, HB))[:, None]
        if is_q:
            src = Q + b * sq + heads * D
        else:
            src = K + b * sk + heads * D
        x1 = tl.load(src + half)
        x2 = tl.load(src + D // 2 + half)
        dt = x1.dtype
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        # HF: q * cos + rotate_half(q) * sin, each product and the sum rounded to the model dtype
        o1 = ((f1 * c1).to(dt).to(tl.float32) + (-f2 * s1).to(dt).to(tl.float32)).to(dt)
        o2 = ((f2 * c2).to(dt).to(tl.float32) + (f1 * s2).to(dt).to(tl.float32)).to(dt)
        if is_q:
            dst = QOUT + b * H * D + heads * D
            tl.store(dst + half, o1)
            tl.store(dst + D // 2 + half, o2)
        else:
            row = tl.load(ROWS + b).to(tl.int64)
            blk = tl.load(TABLES + row * st_r + pos // BS).to(tl.int64)
            off = blk * sc_b + heads * sc_h + (pos % BS) * sc_t
            tl.store(KC + off + half, o1)
            tl.store(KC + off + D // 2 + half, o2)
            vsrc = V + b * sv + heads * D
            tl.store(VC + off + half, tl.load(vsrc + half))
            tl.store(VC + off + D // 2 + half, tl.load(vsrc + D // 2 + half))
            if WRITE_K:
                kdst = KOUT + b * KVH * D + heads * D
                tl.store(kdst + half, o1)
                tl.store(kdst + D // 2 + half, o2)

    @triton.jit
    def _silu_mul_kernel(GU, OUT, N: tl.constexpr, BLOCK: tl.constexpr):
        """GU rows are [gate | up] (one GEMV over the concatenated weights)."""
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < N
        g = tl.load(GU + row * 2 * N + cols, mask=m, other=0.0)
        u = tl.load(GU + row * 2 * N + N + cols, mask=m, other=0.0)
        gf = g.to(tl.float32)
        s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
        tl.store(OUT + row * N + cols, (s.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=m)


def _add_rmsnorm(x, delta, weight, eps):
    """``x += delta`` (in place, when given) and return RMSNorm(x) * weight."""
    B, N = x.shape
    out = torch.empty_like(x)
    _add_rmsnorm_kernel[(B,)](x, delta if delta is not None else x, weight, out, eps, N=N,
                              BLOCK=triton.next_power_of_2(N), HAS_DELTA=delta is not None)
    return out


def _silu_mul(gu):
    B, N = gu.shape[0], gu.shape[1] // 2
    out = torch.empty(B, N, dtype=gu.dtype, device=gu.device)
    block = 1024
    _silu_mul_kernel[(B, triton.cdiv(N, block))](gu, out, N=N, BLOCK=block)
    return out


def _concat_weights(*linears) -> torch.Tensor:
    """One weight tensor for several projections of the same input; the modules' own weights
    become views of it, so the model still holds one copy and HF's forward still works."""
    fused = torch.cat([m.weight.data for m in linears])
    start = 0
    for m in linears:
        rows = m.weight.shape[0]
        m.weight.data = fused[start:start + rows]
        start += rows
    return fused


class FusedLlama:
    """``decode(kv, tables, rows, tokens, positions) -> logits`` and ``prefill(...)`` with the fused kernels:
    both run every token through the same per-token kernels; only attention differs (decode: the paged
    split kernel; prefill: SDPA over the chunk when every row starts at 0, else the paged prefill kernel)."""

    def __init__(self, net):
        self.net = net
        body = net.body
        self.layers = list(body.layers)
        self.embed, self.norm, self.lm_head = body.embed_tokens, body.norm, net.model.lm_head
        self.eps = [(l.input_layernorm.variance_epsilon, l.post_attention_layernorm.variance_epsilon)
                    for l in self.layers]
        self.cos, self.sin = net.rope_table
        s = net.shape
        self.H, self.KVH, self.D = s.n_heads, s.n_kv_heads, s.head_dim
        # rotary programs take heads in groups (one program per head and token cost 3.5 ms of a 2,000-token
        # prefill on an H200): the largest power of two up to 8 that divides both head counts
        self.heads_per_program = next(g for g in (8, 4, 2, 1) if self.H % g == 0 and self.KVH % g == 0)
        self.w_qkv = [_concat_weights(l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj)
                      for l in self.layers]
        self.w_gate_up = [_concat_weights(l.mlp.gate_proj, l.mlp.up_proj) for l in self.layers]
        self.linear = OneRowLinear()

    def tune_one_row(self) -> dict[str, dict]:
        """Pick cuBLAS or the GEMV for each weight shape of a one-token step, by timing both (CUDA)."""
        weights = self.w_qkv + self.w_gate_up + [self.lm_head.weight]
        weights += [l.self_attn.o_proj.weight for l in self.layers] + [l.mlp.down_proj.weight for l in self.layers]
        return self.linear.tune(weights)

    @staticmethod
    def supported(net) -> bool:
        """Llama-style layers without biases, SiLU MLP, power-of-two head dim."""
        if net.family == "gpt2" or net.rope_table is None or triton is None:
            return False
        layer = net.body.layers[0]
        attn, mlp = layer.self_attn, getattr(layer, "mlp", None)
        linears = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        linears += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")] + [net.model.lm_head]
        return (all(m is not None and m.bias is None for m in linears)
                and getattr(net.model.config, "hidden_act", None) == "silu"
                and hasattr(layer.input_layernorm, "variance_epsilon"))

    def _forward(self, kv, tables, rows, tokens, positions, attend, keep_k: bool = False):
        """Tokens [N] at ``positions`` [N], token i's K/V into row ``rows[i]``'s blocks; ``attend(li, q, k, v)``
        -> [N, H*D] with q rotated [N, H, D], k rotated (``keep_k``, else None) and v [N, KVH*D]. Returns the
        final-normed hidden states [N, hidden]."""
        N = tokens.shape[0]
        H, KVH, D, hb = self.H, self.KVH, self.D, self.heads_per_program
        residual = self.embed(tokens)
        h = _add_rmsnorm(residual, None, self.layers[0].input_layernorm.weight, self.eps[0][0])
        for li, layer in enumerate(self.layers):
            qkv = self.linear(h, self.w_qkv[li])
            q, k, v = qkv.split([H * D, KVH * D, KVH * D], dim=1)
            q_rot = torch.empty(N, H, D, dtype=q.dtype, device=q.device)
            k_rot = torch.empty(N, KVH, D, dtype=q.dtype, device=q.device) if keep_k else q_rot
            kc, vc = kv[:, li, 0], kv[:, li, 1]
            _rope_store_kernel[(N, (H + KVH) // hb)](q, k, v, q_rot, k_rot, kc, vc, self.cos, self.sin, positions,
                                                     tables, rows, q.stride(0), k.stride(0), v.stride(0),
                                                     kc.stride(0), kc.stride(1), kc.stride(2), tables.stride(0),
                                                     H=H, KVH=KVH, D=D, BS=kc.shape[2], HB=hb, WRITE_K=keep_k)
            o = attend(li, q_rot, k_rot if keep_k else None, v)
            h = _add_rmsnorm(residual, self.linear(o, layer.self_attn.o_proj.weight),
                             layer.post_attention_layernorm.weight, self.eps[li][1])
            m = _silu_mul(self.linear(h, self.w_gate_up[li]))
            nxt = self.layers[li + 1].input_layernorm if li + 1 < len(self.layers) else self.norm
            h = _add_rmsnorm(residual, self.linear(m, layer.mlp.down_proj.weight), nxt.weight, nxt.variance_epsilon)
        return h

    def decode(self, kv, tables, rows, tokens, positions):
        lengths = positions + 1
        splits = self.net.splits(tokens.shape[0], tables, kv.shape[4])

        def attend(li, q, _k, _v):
            return triton_paged_decode_attention(q, kv[:, li, 0], kv[:, li, 1], tables, rows, lengths, self.net.scale,
                                                 splits=splits)
        return self.linear(self._forward(kv, tables, rows, tokens, positions, attend), self.lm_head.weight)

    def prefill(self, kv, tables, rows, tokens, starts, lens, prefix: bool, riders=None):
        """Row b's ``lens[b]`` tokens of ``tokens`` [B, T] at positions ``starts[b]..``: last-position logits.
        Padding tokens write to the scratch row's block (the table's last row points every entry at it).
        ``riders`` (rows, tokens, positions) [n]: a decode step that rides along, its tokens in the same
        GEMMs (one read of the weights for both), its logits after the prefill's: [B + n, V]."""
        B, T = tokens.shape
        H, KVH, D = self.H, self.KVH, self.D
        P = B * T
        steps = torch.arange(T, device=tokens.device)
        valid = steps[None, :] < lens[:, None]
        positions = torch.where(valid, starts[:, None] + steps, starts[:, None]).reshape(-1)
        token_rows = torch.where(valid, rows[:, None], tables.shape[0] - 1).reshape(-1)
        flat = tokens.reshape(-1)
        if riders is not None:
            d_rows, d_tokens, d_positions = riders
            flat, positions, token_rows = (torch.cat(x) for x in ((flat, d_tokens), (positions, d_positions),
                                                                   (token_rows, d_rows)))
            lengths, splits = d_positions + 1, self.net.splits(d_tokens.shape[0], tables, kv.shape[4])

        def attend(li, q, k, v):
            if prefix:
                o = triton_paged_prefill_attention(q[:P].view(B, T, H, D), kv[:, li, 0], kv[:, li, 1], tables, rows,
                                                   starts, lens, self.net.scale)
            else:
                with sdpa_kernel(SDPA_BACKENDS):  # every row starts at 0: causal within the chunk, padding last
                    o = F.scaled_dot_product_attention(
                        q[:P].view(B, T, H, D).transpose(1, 2), k[:P].view(B, T, KVH, D).transpose(1, 2),
                        v[:P].view(B, T, KVH, D).transpose(1, 2), is_causal=True, scale=self.net.scale,
                        enable_gqa=KVH != H)
                o = o.transpose(1, 2).reshape(P, H * D)
            if riders is None:
                return o
            return torch.cat([o, triton_paged_decode_attention(q[P:], kv[:, li, 0], kv[:, li, 1], tables, d_rows,
                                                               lengths, self.net.scale, splits=splits)])

        h = self._forward(kv, tables, token_rows, flat, positions, attend, keep_k=not prefix)
        last = h[:P].view(B, T, -1)[torch.arange(B, device=h.device), lens - 1]
        return self.lm_head(last if riders is None else torch.cat([last, h[P:]]))
