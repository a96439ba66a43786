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

    # -- per-family pieces ---------------------------------------------------
    def _embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.family == "gpt2":
            return self.body.wte(tokens) + self.body.wpe(positions)
        return self.body.embed_tokens(tokens)

    def _rope(self, x: torch.Tensor, positions: torch.Tensor):
        if self.family == "gpt2":
            return None
        cos, sin = self.body.rotary_emb(x, positions.reshape(1, -1))
        return cos[0], sin[0]  # [T, head_dim]

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
    def prefill(self, k_pool, v_pool, slot: int, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """Process ``tokens`` [T] of one session at positions ``start..start+T-1``; returns last logits [V]."""
        T = tokens.shape[0]
        end = start + T
        positions = torch.arange(start, end, device=tokens.device)
        x = self._embed(tokens, positions)
        rope = self._rope(x, positions)
        mask = None
        if start:
            mask = torch.arange(end, device=tokens.device)[None, :] <= positions[:, None]  # [T, S]

        for li, layer in enumerate(self._layers()):
            def attend(q, k, v, li=li):
                k_pool[li, slot, :, start:end] = k.transpose(0, 1)
                v_pool[li, slot, :, start:end] = v.transpose(0, 1)
                kk, vv = k_pool[li, slot, :, :end], v_pool[li, slot, :, :end]
                o = F.scaled_dot_product_attention(q.transpose(0, 1), kk, vv, attn_mask=mask,
                                                   is_causal=mask is None, scale=self.scale,
                                                   enable_gqa=kk.shape[0] != q.shape[1])
                return o.transpose(0, 1).reshape(T, -1)

            x = self._layer(layer, x, rope, attend)
        return self._logits(x[-1:])[0]

    @torch.inference_mode()
    def decode(self, k_pool, v_pool, slots: torch.Tensor, tokens: torch.Tensor,
               positions: torch.Tensor, span: int) -> torch.Tensor:
        """One token for each of B sessions: ``slots``/``tokens``/``positions`` are [B];
        ``span`` >= max(positions)+1 bounds the attended cache. Returns logits [B, V]."""
        B = tokens.shape[0]
        x = self._embed(tokens, positions)
        rope = self._rope(x, positions)
        mask = (torch.arange(span, device=tokens.device)[None, :] <= positions[:, None]).view(B, 1, 1, span)

        for li, layer in enumerate(self._layers()):
            def attend(q, k, v, li=li):
                k_pool[li, slots, :, positions] = k
                v_pool[li, slots, :, positions] = v
                kk = k_pool[li, :, :, :span][slots]  # [B, KVH, span, D]
                vv = v_pool[li, :, :, :span][slots]
                o = F.scaled_dot_product_attention(q.unsqueeze(2), kk, vv, attn_mask=mask, scale=self.scale,
                                                   enable_gqa=kk.shape[1] != q.shape[1])
                return o.reshape(B, -1)

            x = self._layer(layer, x, rope, attend)
        return self._logits(x)
