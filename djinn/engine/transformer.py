"""The forward pass of a HF causal LM over the paged KV cache.

Weights stay in the HF modules (one copy, the Text Segment); this module only
replaces attention so that many sessions' caches (Data Segments) live in one
block cache and decode steps of all sessions run as one batch. Norms, projections and
MLPs are the HF modules themselves, so the math matches ``model.generate``.
Supported families: GPT-2 and Llama-style (Llama, Mistral, Qwen2).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

from djinn.engine.attention import (SDPA_BACKENDS, decode_splits, gather_positions, torch_paged_decode_attention,
                                    triton_paged_decode_attention, triton_supported)


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


def model_shape(model) -> Shape:
    """The attention and vocabulary shape of a HF causal LM (GPT-2 or Llama-style)."""
    cfg = model.config
    if cfg.model_type == "gpt2":
        return Shape(cfg.n_layer, cfg.n_head, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.vocab_size, cfg.n_positions)
    if hasattr(model, "model") and hasattr(model.model, "rotary_emb"):
        n_heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
        return Shape(cfg.num_hidden_layers, n_heads, getattr(cfg, "num_key_value_heads", n_heads),
                     head_dim, cfg.vocab_size, cfg.max_position_embeddings)
    raise NotImplementedError(f"model_type {cfg.model_type!r}: only gpt2 and llama-style models are supported")


class PagedTransformer:
    """Runs a HF model's layers with attention against the paged KV cache."""

    def __init__(self, model):
        self.model = model
        self.family = model.config.model_type
        self.shape = model_shape(model)
        self.body = model.transformer if self.family == "gpt2" else model.model
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
        self.sms = 132

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
    # ``kv`` is the paged cache [blocks, layers, 2, kv_heads, block_size, head_dim]; request b's positions
    # live in the blocks listed by ``tables[rows[b]]`` (see djinn.engine.kv_cache).
    @torch.inference_mode()
    def prefill(self, kv, tables, rows: torch.Tensor, tokens: torch.Tensor, starts: torch.Tensor,
                lens: torch.Tensor, end: int, prefix: bool, riders=None) -> torch.Tensor:
        """Process row b's ``lens[b]`` tokens (``tokens`` [B, T], padded at the end) at positions
        ``starts[b]..``; ``end`` = max(starts + lens); ``prefix``: some row starts past 0 and attends to its
        cache through the tables. Padding writes only to the scratch block (the last one). Returns each
        row's last real position's logits [B, V]. ``riders``: a decode step in the same call (fused path
        only, see ``FusedLlama.prefill``), whose logits follow: [B + n, V]."""
        if self.fused is not None:
            return self.fused.prefill(kv, tables, rows, tokens, starts, lens, prefix, riders)
        assert riders is None, "only the fused path takes a decode step along"
        B, T = tokens.shape
        bs = kv.shape[4]
        steps = torch.arange(T, device=tokens.device)
        valid = steps[None, :] < lens[:, None]
        positions = torch.where(valid, starts[:, None] + steps, starts[:, None])  # [B, T]
        flat = positions.reshape(-1)
        x = self._embed(tokens.reshape(-1), flat)
        rope = self._rope(flat)
        blocks = torch.gather(tables[rows].long(), 1, positions // bs).masked_fill(~valid, kv.shape[0] - 1)
        offsets = positions % bs
        mask = (torch.arange(end, device=tokens.device)[None, None, :] <= positions[:, :, None]).unsqueeze(1) \
            if prefix else None

        for li, layer in enumerate(self._layers()):
            @sdpa_kernel(SDPA_BACKENDS)
            def attend(q, k, v, li=li):
                kc, vc = kv[:, li, 0], kv[:, li, 1]
                k, v = k.view(B, T, *k.shape[1:]), v.view(B, T, *v.shape[1:])
                kc[blocks, :, offsets] = k
                vc[blocks, :, offsets] = v
                qq = q.view(B, T, *q.shape[1:]).transpose(1, 2)  # [B, H, T, D]
                if prefix:
                    kk, vv = gather_positions(kc, tables, rows, end), gather_positions(vc, tables, rows, end)
                    o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=self.scale,
                                                       enable_gqa=kk.shape[1] != qq.shape[1])
                else:  # every row starts at 0: causal within the chunk (padding sits after the real tokens)
                    o = F.scaled_dot_product_attention(qq, k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                                       scale=self.scale, enable_gqa=k.shape[2] != qq.shape[1])
                return o.transpose(1, 2).reshape(B * T, -1)

            x = self._layer(layer, x, rope, attend)
        return self._logits(x.view(B, T, -1)[torch.arange(B, device=x.device), lens - 1])

    @torch.inference_mode()
    def decode(self, kv, tables, rows: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
               span: int) -> torch.Tensor:
        """One token for each of B requests: ``rows``/``tokens``/``positions`` are [B]; ``span`` >=
        max(positions)+1 bounds the attended cache (torch path). Returns logits [B, V]. With ``use_triton``
        the attention reads the blocks in place (Llama-style models run the fused kernels of
        :mod:`djinn.engine.fused`) and nothing here syncs with the host, so the whole step can be
        captured in a CUDA graph."""
        if self.fused is not None:
            return self.fused.decode(kv, tables, rows, tokens, positions)
        x = self._embed(tokens, positions)
        rope = self._rope(positions)
        lengths = positions + 1
        bs = kv.shape[4]
        blocks = tables[rows, positions // bs].long()
        offsets = positions % bs

        for li, layer in enumerate(self._layers()):
            def attend(q, k, v, li=li):
                kc, vc = kv[:, li, 0], kv[:, li, 1]
                kc[blocks, :, offsets] = k
                vc[blocks, :, offsets] = v
                if self.use_triton:
                    return triton_paged_decode_attention(q, kc, vc, tables, rows, lengths, self.scale,
                                                         splits=self.splits(len(rows), tables, bs))
                return torch_paged_decode_attention(q, kc, vc, tables, rows, lengths, self.scale, span)

            x = self._layer(layer, x, rope, attend)
        return self._logits(x)

    def splits(self, batch: int, tables: torch.Tensor, block_size: int) -> int:
        """How many programs share one row's positions in decode attention (static per batch size)."""
        return decode_splits(batch, self.shape.n_heads, tables.shape[1] * block_size, self.sms, block_size)

    def enable_triton(self, probe: torch.Tensor) -> bool:
        """Use the in-place Triton attention when it runs on ``probe``'s device."""
        from djinn.engine.fused import FusedLlama

        self.use_triton = triton_supported(probe, self.shape.head_dim)
        self.sms = torch.cuda.get_device_properties(probe.device).multi_processor_count if probe.is_cuda else 132
        self.fused = FusedLlama(self) if self.use_triton and FusedLlama.supported(self) else None
        return self.use_triton
