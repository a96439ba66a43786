"""A slotted KV pool on the device, with parking of idle sessions' caches in host memory."""
from __future__ import annotations

from typing import Optional

import torch

from djinn.engine.transformer import Shape


def slot_bytes(shape: Shape, max_seq: int, dtype: torch.dtype) -> int:
    """Bytes one session slot takes: K and V for every layer up to ``max_seq`` tokens."""
    return 2 * shape.n_layers * shape.n_kv_heads * max_seq * shape.head_dim * torch.empty((), dtype=dtype).element_size()


class KVPool:
    """``n_slots`` fixed slots of ``max_seq`` tokens, plus one scratch slot that padding rows of a
    batch may write to; copies to/from host run on a side stream."""

    def __init__(self, shape: Shape, n_slots: int, max_seq: int, dtype: torch.dtype, device: torch.device):
        if n_slots < 1:
            raise ValueError("the KV pool needs at least one slot; raise --max-vram-gb or lower --max-seq-len")
        dims = (shape.n_layers, n_slots + 1, shape.n_kv_heads, max_seq, shape.head_dim)
        self.scratch = n_slots
        self.k = torch.zeros(dims, dtype=dtype, device=device)
        self.v = torch.zeros(dims, dtype=dtype, device=device)
        self.n_slots, self.max_seq, self.device = n_slots, max_seq, device
        self.free = list(range(n_slots - 1, -1, -1))
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.ready: dict[int, Optional[torch.cuda.Event]] = {}

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def acquire(self) -> Optional[int]:
        return self.free.pop() if self.free else None

    def release(self, slot: int) -> None:
        self.free.append(slot)

    def wait_ready(self, slot: int) -> None:
        """Make the compute stream wait for copies into/out of ``slot``."""
        ev = self.ready.pop(slot, None)
        if ev is not None:
            torch.cuda.current_stream(self.device).wait_event(ev)

    def _mark(self, slot: int) -> None:
        if self.cuda:
            ev = torch.cuda.Event()
            ev.record(self.copy_stream)
            self.ready[slot] = ev

    def save(self, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy ``slot``'s first ``length`` positions to (pinned) host memory."""
        shape = (self.k.shape[0], self.k.shape[2], length, self.k.shape[4])
        hk = torch.empty(shape, dtype=self.k.dtype, pin_memory=self.cuda)
        hv = torch.empty(shape, dtype=self.k.dtype, pin_memory=self.cuda)
        if self.cuda:
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.copy_stream):
                hk.copy_(self.k[:, slot, :, :length], non_blocking=True)
                hv.copy_(self.v[:, slot, :, :length], non_blocking=True)
        else:
            hk.copy_(self.k[:, slot, :, :length])
            hv.copy_(self.v[:, slot, :, :length])
        self._mark(slot)
        return hk, hv

    def load(self, slot: int, kv: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Copy host ``(k, v)`` of shape [layers, kv_heads, length, head_dim] into ``slot``."""
        hk, hv = kv
        length = hk.shape[2]
        if length > self.max_seq:
            raise ValueError(f"cache of {length} tokens exceeds --max-seq-len {self.max_seq}")
        if self.cuda:
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.copy_stream):
                self.k[:, slot, :, :length].copy_(hk, non_blocking=True)
                self.v[:, slot, :, :length].copy_(hv, non_blocking=True)
        else:
            self.k[:, slot, :, :length].copy_(hk)
            self.v[:, slot, :, :length].copy_(hv)
        self._mark(slot)

    def synchronize(self) -> None:
        if self.cuda:
            self.copy_stream.synchronize()
