"""Experiment 2.1: one prompt, ``new_tokens`` greedy tokens, repeated ``runs`` times per mode.

native_pytorch runs HF ``generate`` locally. The Djinn modes differ in what
crosses the wire, and bytes are counted from the frames actually sent:
- full_djinn: the server keeps weights and KV; one call sends the prompt ids and
  returns the generated ids.
- partially_aware: the server caches the weights but has no KV semantics; the
  client drives the loop and sends the whole history each token, gets logits back.
- semantic_blind: nothing is known; each token ships the whole KV cache up and
  the updated cache plus logits back, as plain tensors.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from djinn.results import ResultDocument, RunRecord
from djinn.runners.common import GpuSampler, say
from djinn.runners.hf_agent import greedy

MB = 1e6


def _full_djinn(client, model_id, prompt, n):
    s = client.open_session(model_id=model_id)
    try:
        return s.generate(prompt, n)
    finally:
        s.close()


def _partially_aware(client, model_id, prompt, n):
    history = list(prompt)
    for _ in range(n):
        history.append(int(client.forward(history, model_id=model_id).tensors["logits"].argmax()))
    return history[len(prompt):]


def _semantic_blind(client, model_id, prompt, n):
    out, kv, new = [], None, list(prompt)
    for _ in range(n):
        reply = client.forward(new, model_id=model_id, past_kv=kv, return_kv=True)
        kv = (reply.tensors["k"], reply.tensors["v"])
        new = [int(reply.tensors["logits"].argmax())]
        out += new
    return out


REMOTE_MODES: dict[str, Callable] = {"full_djinn": _full_djinn, "partially_aware": _partially_aware,
                                     "semantic_blind": _semantic_blind}


def measure(doc: ResultDocument, once: Callable[[], tuple[list[int], float, float]], runs: int, warmup: int) -> ResultDocument:
    """Run ``once`` (-> tokens, MB up, MB down) ``warmup`` + ``runs`` times; keep the measured runs."""
    sampler = GpuSampler()
    for i in range(warmup + runs):
        with sampler:
            t0 = time.perf_counter()
            tokens, up, down = once()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            total = (time.perf_counter() - t0) * 1e3
        if i < warmup:
            continue
        util, bw = sampler.readings()
        doc.runs.append(RunRecord(run_id=i - warmup + 1, total_ms=total, per_token_ms=total / max(1, len(tokens)),
                                  tokens_generated=len(tokens), gpu_util_pct=util, memory_bw_gbps=bw,
                                  host_to_device_mb=up, device_to_host_mb=down, tokens=tokens))
    say(f"{doc.baseline}: {runs} runs, mean {sum(r.total_ms for r in doc.runs) / runs:.1f} ms "
        f"({sum(r.per_token_ms for r in doc.runs) / runs:.2f} ms/token)")
    return doc


def native_once(model, prompt: list[int], n: int):
    """Local HF generate; bytes are the ids copied to and from the device (None on CPU)."""
    def once():
        tokens = greedy(model, prompt, n)
        on_gpu = next(model.parameters()).is_cuda
        return tokens, (len(prompt) * 8 / MB if on_gpu else None), (len(tokens) * 8 / MB if on_gpu else None)
    return once


def remote_once(client, mode: str, model_id: str, prompt: list[int], n: int):
    """One decode through the Djinn server in ``mode``; bytes from the client's frame counters."""
    fn = REMOTE_MODES[mode]

    def once():
        sent, received = client.bytes_sent, client.bytes_received
        tokens = fn(client, model_id, prompt, n)
        return tokens, (client.bytes_sent - sent) / MB, (client.bytes_received - received) / MB
    return once
