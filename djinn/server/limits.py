"""The server's bounds and their defaults, importable without torch (the operator sizes pods from them)."""
from __future__ import annotations

DEFAULT_SHUTDOWN_GRACE_S = 30.0  # SIGTERM/SIGINT: in-flight requests get this long to finish
DEFAULT_READ_TIMEOUT_S = 60.0    # a frame (or HTTP body) that started must arrive in full within this
DEFAULT_IDLE_TIMEOUT_S = 900.0   # a data connection with no request in flight for this long is closed
CONTROL_MAX_BODY = 1 << 20       # control-plane request bodies (larger: 413)
MIN_FRAME = 1 << 20              # the derived frame limit never goes below this
FRAME_OVERHEAD = 1 << 20         # header and token ids beside the largest tensors


def kv_frame_bytes(n_layers: int, n_kv_heads: int, head_dim: int, vocab: int, max_seq: int, dtype_bytes: int) -> int:
    """The largest legitimate frame for one model: a semantic_blind step carrying the whole KV cache
    (K and V, every layer, ``max_seq`` tokens) plus its token ids and last-position logits."""
    kv = 2 * n_layers * n_kv_heads * max_seq * head_dim * dtype_bytes
    return kv + 8 * max_seq + 4 * vocab + FRAME_OVERHEAD
