"""An agent that owns its KV cache next to a local HF model (native and Ray baselines)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.nn.attention import sdpa_kernel

from djinn.engine.attention import SDPA_BACKENDS


@dataclass
class ModelRef:
    """Everything a worker process needs to load the same model the server serves."""

    model_id: str
    weights: str = "auto"
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0

    def load(self):
        from djinn.models.loader import load_model

        return load_model(self.model_id, self.weights, self.dtype, self.device, self.seed, quiet=True)


def greedy(model, input_ids: list[int], max_new_tokens: int, cache=None) -> list[int]:
    """HF ``generate`` (greedy, exactly ``max_new_tokens``); ``cache`` continues a previous call."""
    device = next(model.parameters()).device
    ids = torch.tensor([input_ids], device=device)
    # with a cache every decode step is a new attention shape: cuDNN's per-shape plans made this
    # 4.4 s instead of 1.2 s for 50 tokens on an H100 (measured), so SDPA_BACKENDS leaves it out
    with torch.inference_mode(), sdpa_kernel(SDPA_BACKENDS):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                             max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=model.config.eos_token_id or 0)
    return out[0, len(input_ids):].tolist()


def cache_bytes(cache) -> int:
    """Device bytes held by a HF cache (DynamicCache of any transformers version)."""
    total = 0
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total
    for t in list(getattr(cache, "key_cache", [])) + list(getattr(cache, "value_cache", [])):
        total += t.numel() * t.element_size()
    return total


def warm_up(model) -> None:
    """One short generate, so that one-time CUDA/cuBLAS set-up is not billed to the first step."""
    greedy(model, [1, 2, 3], 2)


@dataclass
class CachedAgent:
    """History plus the KV cache of everything but the last generated token."""

    model: object
    history: list[int] = field(default_factory=list)
    cache: Optional[object] = None

    def step(self, new_tokens: list[int], max_new_tokens: int) -> tuple[list[int], int]:
        """Generate after ``new_tokens``; returns (tokens, cached length before the step)."""
        from transformers import DynamicCache

        if self.cache is None:
            self.cache = DynamicCache()
        before = self.cache.get_seq_length()
        self.history += list(new_tokens)
        out = greedy(self.model, self.history, max_new_tokens, self.cache)
        self.history += out
        return out, before
