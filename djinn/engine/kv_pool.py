"""A slotted KV pool on the device, with parking of idle sessions' caches in host memory."""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from djinn.engine.transformer import Shape


HOST_ARENA_FRACTION = 0.25  # of the host's available memory, pinned at start for parked caches by default


def available_host_bytes(cgroup: str = "/sys/fs/cgroup") -> int:
    """Free host memory, capped by this container's cgroup (v2) memory limit when it has one."""
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0
    try:
        limit = open(f"{cgroup}/memory.max").read().strip()
        used = int(open(f"{cgroup}/memory.current").read())
        if limit != "max":
            free = min(free, int(limit) - used)
    except (OSError, ValueError):
        pass
    return max(0, free)


def auto_host_slots(n_slots: int, session_host_bytes: int, arena_bytes: int) -> int:
    """Parked caches to preallocate: what ``arena_bytes`` holds, at most one per device slot (pinning on
    demand stalls the engine ~15 ms a park, and a first wave of parks by seconds)."""
    return max(0, min(n_slots, int(arena_bytes) // max(1, session_host_bytes)))


def slot_bytes(shape: Shape, max_seq: int, dtype: torch.dtype) -> int:
    """Bytes one session slot takes: K and V for every layer up to ``max_seq`` tokens."""
    return 2 * shape.n_layers * shape.n_kv_heads * max_seq * shape.head_dim * torch.empty((), dtype=dtype).element_size()


class KVPool:
    """``n_slots`` fixed slots of ``max_seq`` tokens, plus one scratch slot that padding rows of a
    batch may write to; copies to/from host run on a side stream."""

    def __init__(self, shape: Shape, n_slots: int, max_seq: int, dtype: torch.dtype, device: torch.device,
                 host_slots: Optional[int] = 0, host_bytes: Optional[int] = None):
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
        # Parked caches live in pinned host blocks of one slot's size, recycled and never freed:
        # allocating pinned memory per park cost ~15 ms of host time each on an H100 host (measured).
        self._slot_numel = shape.n_layers * shape.n_kv_heads * max_seq * shape.head_dim
        self._host_blocks: list[torch.Tensor] = []
        self._lent: dict[int, torch.Tensor] = {}  # data_ptr of a saved cache -> its block
        if host_slots is None:  # auto: pinned memory only pays on a GPU
            session = 2 * self._slot_numel * torch.empty((), dtype=dtype).element_size()
            arena = host_bytes if host_bytes is not None else available_host_bytes() * HOST_ARENA_FRACTION
            host_slots = auto_host_slots(n_slots, session, int(arena)) if self.cuda else 0
            logging.getLogger("djinn.engine").info("pinned host arena for %d parked sessions (%.1f GiB)",
                                                   host_slots, host_slots * session / 2**30)
        self.host_slots = host_slots
        if host_slots:  # one pinned allocation up front, carved into blocks (K and V per session)
            slab = torch.empty(2 * host_slots * self._slot_numel, dtype=dtype, pin_memory=self.cuda)
            self._host_blocks = list(slab.view(2 * host_slots, self._slot_numel).unbind(0))

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

    def _host_block(self) -> torch.Tensor:
        if self._host_blocks:
            return self._host_blocks.pop()
        return torch.empty(self._slot_numel, dtype=self.k.dtype, pin_memory=self.cuda)

    def recycle(self, kv: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Return the host blocks of a cache saved with ``pooled=True`` (after its ``load``).
        Copies run in order on the copy stream, so a block's next save waits for this load."""
        for t in kv:
            self._host_blocks.append(self._lent.pop(t.data_ptr()))

    def save(self, slot: int, length: int, pooled: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy ``slot``'s first ``length`` positions to (pinned) host memory: recycled blocks
        when ``pooled``, else fresh tensors the caller keeps."""
        shape = (self.k.shape[0], self.k.shape[2], length, self.k.shape[4])
        n = shape[0] * shape[1] * shape[2] * shape[3]
        if pooled:
            bk, bv = self._host_block(), self._host_block()
            hk, hv = bk[:n].view(shape), bv[:n].view(shape)
            self._lent[hk.data_ptr()], self._lent[hv.data_ptr()] = bk, bv
        else:
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
