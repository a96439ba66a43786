"""The paged KV cache on the device, and the pinned host arena that parked sessions' blocks go to.

Layout ``[blocks, layers, 2 (K, V), kv_heads, block_size, head_dim]``: one block holds a run of
``block_size`` tokens of every layer, so parking or restoring a block is one contiguous copy (MiBs for
a 7B model), and consecutive blocks coalesce into one. Attention reads a layer's view through each
running request's row of ``tables`` (block ids), so sessions hold memory by the tokens they have.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from djinn.engine.transformer import Shape

log = logging.getLogger("djinn.engine")
HOST_ARENA_FRACTION = 0.5  # of the host's available memory: parked KV's default bound (pinned at start on a GPU)


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


def device_tensor(values: list, device: torch.device) -> torch.Tensor:
    """A host list as a tensor on ``device`` without waiting for the device's queue: torch follows a
    blocking host-to-device copy with a stream synchronize, which would stall a launch behind the step
    before it. A copy from pageable memory is staged before cudaMemcpyAsync returns, so the list's
    temporary tensor may go at once."""
    return torch.tensor(values).to(device, non_blocking=True)


def block_bytes(shape: Shape, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block: K and V of every layer for ``block_size`` tokens."""
    return 2 * shape.n_layers * shape.n_kv_heads * block_size * shape.head_dim * torch.empty((), dtype=dtype).element_size()


def auto_host_blocks(n_blocks: int, block_nbytes: int, arena_bytes: int) -> int:
    """Host blocks to pin at start: what ``arena_bytes`` holds, at most as many as the device has (pinning on
    demand stalled the engine ~15 ms a park on an H100 host, a first wave of parks by seconds)."""
    return max(0, min(n_blocks, int(arena_bytes) // max(1, block_nbytes)))


def copy_runs(device: list[int], host: list[int], pinned: int) -> list[tuple[int, int, int]]:
    """(device start, host start, count) runs where both id lists go up by one; host ids >= ``pinned``
    (pageable overflow blocks, each its own tensor) stay single."""
    runs: list[tuple[int, int, int]] = []
    for d, h in zip(device, host):
        if runs:
            d0, h0, n = runs[-1]
            if d == d0 + n and h == h0 + n and h < pinned:
                runs[-1] = (d0, h0, n + 1)
                continue
        runs.append((d, h, 1))
    return runs


class Copy:
    """A copy on a side stream; ``done()`` polls without blocking, ``wait()`` blocks."""

    def __init__(self, event: Optional[torch.cuda.Event]):
        self.event = event

    def done(self) -> bool:
        return self.event is None or self.event.query()

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()


class PagedKVCache:
    """``n_blocks`` device blocks (+1 scratch block that padding rows of a batch write to), a block-table
    row per running request (+1 scratch row), and ``host_blocks`` pinned host blocks allocated once.
    Parked KV may take ``host_capacity`` host blocks in all: ``host_bytes`` (else half the free host
    memory), pinned blocks first, then pageable ones allocated as sessions park."""

    def __init__(self, shape: Shape, n_blocks: int, block_size: int, max_seq: int, max_rows: int,
                 dtype: torch.dtype, device: torch.device, host_blocks: Optional[int] = 0,
                 host_bytes: Optional[int] = None):
        if n_blocks < 1:
            raise ValueError("the KV cache needs at least one block; raise --max-vram-gb")
        self.shape, self.block_size, self.max_seq, self.device = shape, block_size, max_seq, device
        self.n_blocks, self.scratch = n_blocks, n_blocks
        self.block_shape = (shape.n_layers, 2, shape.n_kv_heads, block_size, shape.head_dim)
        self.max_blocks = -(-max_seq // block_size)
        self.scratch_row = max_rows
        try:
            self.kv = torch.zeros((n_blocks + 1, *self.block_shape), dtype=dtype, device=device)
            self.tables = torch.full((max_rows + 1, self.max_blocks), n_blocks, dtype=torch.int32, device=device)
        except RuntimeError as exc:  # torch.OutOfMemoryError included: a sizing the device cannot hold
            size = (n_blocks + 1) * block_bytes(shape, block_size, dtype) / 2**30
            raise ValueError(f"a KV cache of {n_blocks} blocks of {block_size} tokens ({size:.1f} GiB) and "
                             f"{max_rows} table rows does not fit on {device} ({str(exc).splitlines()[0][:120]}); "
                             "lower --max-vram-gb, --max-slots or --kv-block-size") from None
        self.cuda = device.type == "cuda"
        # Parks (device to host) and restores (host to device) on streams of their own: the link carries
        # both directions at once, and a returning session's restore never queues behind parks.
        self.park_stream = torch.cuda.Stream(device) if self.cuda else None
        self.restore_stream = torch.cuda.Stream(device) if self.cuda else None
        nbytes = block_bytes(shape, block_size, dtype)
        budget = host_bytes if host_bytes is not None else available_host_bytes() * HOST_ARENA_FRACTION
        if host_blocks is None:  # auto: pinned memory only pays on a GPU
            host_blocks = auto_host_blocks(n_blocks, nbytes, int(budget)) if self.cuda else 0
        self.host_capacity = max(host_blocks, int(budget) // nbytes)  # parked KV on the host: pinned, then pageable
        log.info("host memory for parked KV: %d blocks of %d tokens (%.1f GiB), %d of them pinned", self.host_capacity,
                 block_size, self.host_capacity * nbytes / 2**30, host_blocks)
        self.host_blocks = host_blocks
        self.host = torch.empty((host_blocks, *self.block_shape), dtype=dtype, pin_memory=self.cuda and host_blocks > 0)
        self.overflow: dict[int, torch.Tensor] = {}  # past the arena: pageable blocks, kept for reuse

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def layer(self, li: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``li``'s K and V views, each [blocks, kv_heads, block_size, head_dim]."""
        return self.kv[:, li, 0], self.kv[:, li, 1]

    def set_rows(self, rows: list[int], blocks: list[list[int]]) -> None:
        """Point table ``rows`` at their requests' blocks (unused entries at the scratch block)."""
        t = torch.tensor([b + [self.scratch] * (self.max_blocks - len(b)) for b in blocks], dtype=torch.int32)
        self.tables[device_tensor(rows, self.device)] = t.to(self.device, non_blocking=True)

    # -- parking -----------------------------------------------------------------------------
    def _host_run(self, h: int, n: int) -> torch.Tensor:
        """Host blocks ``h..h+n-1``: a slice of the pinned arena, or one pageable overflow block (n == 1)."""
        if h < self.host_blocks:
            return self.host[h:h + n]
        if h not in self.overflow:
            self.overflow[h] = torch.empty((1, *self.block_shape), dtype=self.kv.dtype)
        return self.overflow[h]

    def _copy(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], stream: Optional[torch.cuda.Stream]) -> Copy:
        if not self.cuda:
            for dst, src in pairs:
                dst.copy_(src)
            return Copy(None)
        stream.wait_stream(torch.cuda.current_stream(self.device))  # the blocks' last reads and writes first
        with torch.cuda.stream(stream):
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        return Copy(event)

    def copy_out(self, device_blocks: list[int], host_blocks: list[int]) -> Copy:
        return self._copy([(self._host_run(h, n), self.kv[d:d + n])
                           for d, h, n in copy_runs(device_blocks, host_blocks, self.host_blocks)], self.park_stream)

    def copy_in(self, host_blocks: list[int], device_blocks: list[int]) -> Copy:
        return self._copy([(self.kv[d:d + n], self._host_run(h, n))
                           for d, h, n in copy_runs(device_blocks, host_blocks, self.host_blocks)], self.restore_stream)

    # -- whole caches of stateless requests ([layers, kv_heads, length, head_dim] each) -------------
    def write(self, blocks: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        L, H, n, D = k.shape
        nb = -(-n // self.block_size)
        packed = torch.zeros((nb * self.block_size, L, 2, H, D), dtype=self.kv.dtype)
        packed[:n, :, 0] = k.permute(2, 0, 1, 3)
        packed[:n, :, 1] = v.permute(2, 0, 1, 3)
        packed = packed.view(nb, self.block_size, L, 2, H, D).permute(0, 2, 3, 4, 1, 5)
        self.kv[torch.tensor(blocks[:nb], dtype=torch.long, device=self.device)] = packed.to(self.device)

    def read(self, blocks: list[int], n: int) -> tuple[torch.Tensor, torch.Tensor]:
        nb = -(-n // self.block_size)
        packed = self.kv[torch.tensor(blocks[:nb], dtype=torch.long, device=self.device)].cpu()  # [nb, L, 2, H, BS, D]
        L, _, H, BS, D = self.block_shape
        flat = packed.permute(1, 2, 3, 0, 4, 5).reshape(L, 2, H, nb * BS, D)[:, :, :, :n]
        return flat[:, 0].contiguous(), flat[:, 1].contiguous()

    def synchronize(self) -> None:
        if self.cuda:
            self.park_stream.synchronize()
            self.restore_stream.synchronize()
