"""A fused decode step for Llama-style models on the GPU (Triton).

The HF modules spend ~45 small kernels per layer on a one-token step (fp32 RMSNorm, rotary as
multiply/cat, KV scatters, SiLU, residual adds); at batch 1 their launches cost about as much as
reading the weights. Here each layer is: residual-add + RMSNorm (1 kernel), one q|k|v GEMV,
rotary + KV-cache write (1), paged attention (1), o GEMV, add + RMSNorm (1), one gate|up GEMV,
SiLU-multiply (1), down GEMV: 9 kernels. Every rounding step matches HF's half-precision order, so the
logits equal the HF modules' up to the order of one reduction.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from djinn.engine.attention import triton, triton_paged_decode_attention

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
    def _rope_store_kernel(Q, K, V, QOUT, KC, VC, COS, SIN, POS, TABLES, ROWS,
                           sq, sk, sv, sc_b, sc_h, sc_t, st_r, H: tl.constexpr, D: tl.constexpr, BS: tl.constexpr):
        b = tl.program_id(0)
        j = tl.program_id(1)
        half = tl.arange(0, D // 2)
        pos = tl.load(POS + b).to(tl.int64)
        c1 = tl.load(COS + pos * D + half).to(tl.float32)
        c2 = tl.load(COS + pos * D + D // 2 + half).to(tl.float32)
        s1 = tl.load(SIN + pos * D + half).to(tl.float32)
        s2 = tl.load(SIN + pos * D + D // 2 + half).to(tl.float32)
        if j < H:
            src = Q + b * sq + j * D
        else:
            src = K + b * sk + (j - H) * D
        x1 = tl.load(src + half)
        x2 = tl.load(src + D // 2 + half)
        dt = x1.dtype
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        # HF: q * cos + rotate_half(q) * sin, each product and the sum rounded to the model dtype
        o1 = ((f1 * c1).to(dt).to(tl.float32) + (-f2 * s1).to(dt).to(tl.float32)).to(dt)
        o2 = ((f2 * c2).to(dt).to(tl.float32) + (f1 * s2).to(dt).to(tl.float32)).to(dt)
        if j < H:
            dst = QOUT + b * H * D + j * D
            tl.store(dst + half, o1)
            tl.store(dst + D // 2 + half, o2)
        else:
            row = tl.load(ROWS + b).to(tl.int64)
            blk = tl.load(TABLES + row * st_r + pos // BS).to(tl.int64)
            off = blk * sc_b + (j - H) * sc_h + (pos % BS) * sc_t
            tl.store(KC + off + half, o1)
            tl.store(KC + off + D // 2 + half, o2)
            vsrc = V + b * sv + (j - H) * D
            tl.store(VC + off + half, tl.load(vsrc + half))
            tl.store(VC + off + D // 2 + half, tl.load(vsrc + D // 2 + half))

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


class FusedLlamaDecode:
    """``decode(kv, tables, rows, tokens, positions) -> logits`` with the fused kernels."""

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
        self.w_qkv = [_concat_weights(l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj)
                      for l in self.layers]
        self.w_gate_up = [_concat_weights(l.mlp.gate_proj, l.mlp.up_proj) for l in self.layers]

    @staticmethod
    def supported(net) -> bool:
        """Llama-style layers without biases, SiLU MLP, power-of-two head dim."""
        if net.family == "gpt2" or net.rope_table is None or triton is None:
            return False
        layer = net.body.layers[0]
        attn, mlp = layer.self_attn, getattr(layer, "mlp", None)
        linears = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        linears += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        return (all(m is not None and m.bias is None for m in linears)
                and getattr(net.model.config, "hidden_act", None) == "silu"
                and hasattr(layer.input_layernorm, "variance_epsilon"))

    def decode(self, kv, tables, rows, tokens, positions):
        B = tokens.shape[0]
        H, KVH, D = self.H, self.KVH, self.D
        residual = self.embed(tokens)
        h = _add_rmsnorm(residual, None, self.layers[0].input_layernorm.weight, self.eps[0][0])
        lengths = positions + 1
        splits = self.net.splits(B, tables, kv.shape[4])
        for li, layer in enumerate(self.layers):
            attn = layer.self_attn
            qkv = F.linear(h, self.w_qkv[li])
            q, k, v = qkv.split([H * D, KVH * D, KVH * D], dim=1)
            q_rot = torch.empty(B, H, D, dtype=q.dtype, device=q.device)
            kc, vc = kv[:, li, 0], kv[:, li, 1]
            _rope_store_kernel[(B, H + KVH)](q, k, v, q_rot, kc, vc, self.cos, self.sin, positions, tables, rows,
                                             q.stride(0), k.stride(0), v.stride(0),
                                             kc.stride(0), kc.stride(1), kc.stride(2), tables.stride(0),
                                             H=H, D=D, BS=kc.shape[2])
            o = triton_paged_decode_attention(q_rot, kc, vc, tables, rows, lengths, self.net.scale, splits=splits)
            h = _add_rmsnorm(residual, F.linear(o, attn.o_proj.weight), layer.post_attention_layernorm.weight,
                             self.eps[li][1])
            mlp = layer.mlp
            m = _silu_mul(F.linear(h, self.w_gate_up[li]))
            nxt = self.layers[li + 1].input_layernorm if li + 1 < len(self.layers) else self.norm
            h = _add_rmsnorm(residual, F.linear(m, mlp.down_proj.weight), nxt.weight, nxt.variance_epsilon)
        return self.lm_head(h)
