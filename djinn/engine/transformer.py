"""The forward pass of a HF causal LM over a slotted KV pool.

Weights stay in the HF modules (one copy, the Text Segment); this module only
replaces attention so that many sessions' caches (Data Segments) live in one
pool and decode steps of all sessions run as one batch. Norms, projections and
MLPs are the HF modules themselves, so the math matches ``model.generate``.
Supported families: GPT-2 and Llama-style (Llama, Mistral, Qwen2).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

from djinn.engine.attention import (SDPA_BACKENDS, torch_pool_decode_attention, triton_pool_decode_attention,
                                    triton_supported)


@dataclass(frozen=True)
class Shape:
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class PoolTransformer:
    """Runs a HF model's layers with attention against ``k_pool``/``v_pool``.

    Pools are ``[layers, slots, kv_heads, max_seq, head_dim]``; a session owns one slot.
    """

    def __init__(self, model):
        self.model = model
        cfg = model.config
        self.family = cfg.model_type
        if self.family == "gpt2":
            self.body = model.transformer
            n_heads = cfg.n_head
            self.shape = Shape(cfg.n_layer, n_heads, n_heads, cfg.n_embd // n_heads, cfg.vocab_size, cfg.n_positions)
        elif hasattr(model, "model") and hasattr(model.model, "rotary_emb"):
            self.body = model.model
            n_heads = cfg.num_attention_heads
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
            self.shape = Shape(cfg.num_hidden_layers, n_heads, getattr(cfg, "num_key_value_heads", n_heads),
                               head_dim, cfg.vocab_size, cfg.max_position_embeddings)
        else:
            raise NotImplementedError(f"model_type {self.family!r}: only gpt2 and llama-style models are supported")
        self.scale = self.shape.head_dim ** -0.5
        self.rope_table = None
        if self.family != "gpt2":  # cos/sin of every position once: a lookup inside CUDA graphs
            p = next(model.parameters())
            positions = torch.arange(self.shape.max_positions, device=p.device)
            with torch.inference_mode():
                cos, sin = self.body.rotary_emb(torch.empty(1, dtype=p.dtype, device=p.device), positions[None])
            self.rope_table = (cos[0], sin[0])
        self.use_triton = False
        self.fused = None

    # -- per-family pieces ---------------------------------------------------
    def _embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.family == "gpt2":
            return self.body.wte(tokens) + self.body.wpe(positions)
        return self.body.embed_tokens(tokens)

    def _rope(self, positions: torch.Tensor):
        if self.rope_table is None:
            return None
        return self.rope_table[0][positions], self.rope_table[1][positions]  # [T, head_dim]

    def _qkv(self, layer, h: torch.Tensor, rope):
        """h [T, hidden] -> q [T, H, D], k/v [T, KVH, D] (rotary applied)."""
        s = self.shape
        if self.family == "gpt2":
            q, k, v = layer.attn.c_attn(h).split(s.n_heads * s.head_dim, dim=-1)
        else:
            attn = layer.self_attn
            q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        q = q.view(-1, s.n_heads, s.head_dim)
        k = k.view(-1, s.n_kv_heads, s.head_dim)
        v = v.view(-1, s.n_kv_heads, s.head_dim)
        if rope is not None:
            cos, sin = rope[0].unsqueeze(1), rope[1].unsqueeze(1)
            q = (q * cos + _rotate_half(q) * sin).to(v.dtype)
            k = (k * cos + _rotate_half(k) * sin).to(v.dtype)
        return q, k, v

    def _layer(self, layer, x, rope, attend):
        if self.family == "gpt2":
            q, k, v = self._qkv(layer, layer.ln_1(x), rope)
            x = x + layer.attn.c_proj(attend(q, k, v))
            return x + layer.mlp(layer.ln_2(x))
        q, k, v = self._qkv(layer, layer.input_layernorm(x), rope)
        x = x + layer.self_attn.o_proj(attend(q, k, v))
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def _layers(self):
        return self.body.h if self.family == "gpt2" else self.body.layers

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body.ln_f(x) if self.family == "gpt2" else self.body.norm(x)
        return self.model.lm_head(x)

    # -- entry points ----------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, k_pool, v_pool, slots: torch.Tensor, tokens: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        """Process ``tokens`` [B, T] of B sessions at positions ``starts[b]..starts[b]+T-1``
        (one chunk length T for the group); returns the last position's logits [B, V]."""
        B, T = tokens.shape
        positions = starts[:, None] + torch.arange(T, device=tokens.device)  # [B, T]
        end = int(starts.max()) + T
        flat = positions.reshape(-1)
        x = self._embed(tokens.reshape(-1), flat)
        rope = self._rope(flat)
        mask = (torch.arange(end, device=tokens.device)[None, None, :] <= positions[:, :, None]).unsqueeze(1)
        rows = slots[:, None].expand(B, T)

        for li, layer in enumerate(self._layers()):
            @sdpa_kernel(SDPA_BACKENDS)
            def attend(q, k, v, li=li):
                k_pool[li, rows, :, positions] = k.view(B, T, *k.shape[1:])
                v_pool[li, rows, :, positions] = v.view(B, T, *v.shape[1:])
                kk = k_pool[li, :, :, :end][slots]  # [B, KVH, end, D]
                vv = v_pool[li, :, :, :end][slots]
                qq = q.view(B, T, *q.shape[1:]).transpose(1, 2)  # [B, H, T, D]
                o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=self.scale,
                                                   enable_gqa=kk.shape[1] != qq.shape[1])
                return o.transpose(1, 2).reshape(B * T, -1)

            x = self._layer(layer, x, rope, attend)
        return self._logits(x.view(B, T, -1)[:, -1])

    @torch.inference_mode()
    def decode(self, k_pool, v_pool, slots: torch.Tensor, tokens: torch.Tensor,
               positions: torch.Tensor, span: int) -> torch.Tensor:
        """One token for each of B sessions: ``slots``/``tokens``/``positions`` are [B];
        ``span`` >= max(positions)+1 bounds the attended cache (torch path). Returns logits [B, V].
        With ``use_triton`` the attention reads the pool in place (Llama-style models run the
        fused kernels of :mod:`djinn.engine.fused`) and nothing here syncs with the host, so
        the whole step can be captured in a CUDA graph."""
        if self.fused is not None:
            return self.fused.decode(k_pool, v_pool, slots, tokens, positions)
        x = self._embed(tokens, positions)
        rope = self._rope(positions)
        lengths = positions + 1

        for li, layer in enumerate(self._layers()):
            def attend(q, k, v, li=li):
                k_pool[li, slots, :, positions] = k
                v_pool[li, slots, :, positions] = v
                if self.use_triton:
                    return triton_pool_decode_attention(q, k_pool[li], v_pool[li], slots, lengths, self.scale)
                return torch_pool_decode_attention(q, k_pool[li], v_pool[li], slots, lengths, self.scale, span)

            x = self._layer(layer, x, rope, attend)
        return self._logits(x)

    def enable_triton(self, probe: torch.Tensor) -> bool:
        """Use the in-place Triton attention when it runs on ``probe``'s device."""
        from djinn.engine.fused import FusedLlamaDecode

        self.use_triton = triton_supported(probe, self.shape.head_dim)
        self.fused = FusedLlamaDecode(self) if self.use_triton and FusedLlamaDecode.supported(self) else None
        return self.use_triton
