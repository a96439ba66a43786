"""The hardware's lower bound of one synchronized agent phase, from two measured rates.

A phase of N agents is one prefill of every agent's new tokens (FLOPs at the measured GEMM rate)
followed by ``new_tokens - 1`` decode steps (the first token comes out of the prefill), each of
which reads the weights once and every session's KV so far (bytes at the measured copy bandwidth).
Nothing can be faster; a measured p99 over this ratio says how far the engine is from the hardware.
"""
from __future__ import annotations


def phase_roofline_ms(n: int, new_input_tokens: int, new_tokens: int, context_before: int, *, params: int,
                      weight_bytes: int, kv_bytes_per_token: int, gemm_tflops: float, bandwidth_gbps: float) -> float:
    prefill_s = 2 * params * n * new_input_tokens / (gemm_tflops * 1e12)
    start = context_before + new_input_tokens
    kv_tokens = sum(n * (start + j) for j in range(max(0, new_tokens - 1)))
    decode_s = (max(0, new_tokens - 1) * weight_bytes + kv_tokens * kv_bytes_per_token) / (bandwidth_gbps * 1e9)
    return (prefill_s + decode_s) * 1e3
