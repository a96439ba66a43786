"""The model runner: the batched steps on the device. Decode is eager or replayed from CUDA graphs
captured per batch-size bucket; prefill runs eagerly (its shapes vary)."""
from __future__ import annotations

import logging
import time
from typing import Optional

import torch

from djinn.engine.kv_cache import PagedKVCache, device_tensor
from djinn.engine.transformer import PagedTransformer

log = logging.getLogger("djinn.engine")


BUCKET_STEP = 128  # past this many rows, buckets grow by it instead of doubling


def bucket_sizes(limit: int) -> list[int]:
    """Batch sizes to capture, up to the first >= ``limit``: powers of two to 2 x BUCKET_STEP, then every
    BUCKET_STEP. Decode GEMMs past ~128 rows cost by their rows (FLOPs, not the weight read), so a batch
    of 600 padded to 1,024 would pay ~1.7x; padded to 640 it pays 1.07x."""
    sizes = [1]
    while sizes[-1] < limit:
        sizes.append(sizes[-1] * 2 if sizes[-1] < 2 * BUCKET_STEP else sizes[-1] + BUCKET_STEP)
    return sizes


class Pending:
    """A step's results on their way to pinned host memory: made before the step is launched, ``of(values)``
    after. ``get()`` waits for that copy alone, so work launched later (a prefill behind a decode) keeps the
    GPU busy while the host reads it; ``ms`` is then the step's own time (on the device between two events;
    on the CPU, which computes while launching, the wall time of the launch)."""

    def __init__(self, device: torch.device):
        self.begun = time.perf_counter()
        self.started = self.ended = None
        if device.type == "cuda":
            self.started, self.ended = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.started.record()
        self.host: Optional[torch.Tensor] = None
        self.ms = 0.0

    def of(self, values: torch.Tensor) -> "Pending":
        if self.ended is None:
            self.host, self.ms = values, (time.perf_counter() - self.begun) * 1e3
            return self
        self.host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)  # torch caches pinned blocks
        self.host.copy_(values, non_blocking=True)
        self.ended.record()
        return self

    def get(self) -> list:
        if self.ended is not None:
            self.ended.synchronize()
            self.ms = self.started.elapsed_time(self.ended)
        return self.host.tolist()


class ModelRunner:
    """``decode(rows, positions) -> next tokens`` (greedy) and ``prefill(...) -> (logits, first tokens)``
    over ``cache``, launched without waiting for them.

    The tokens a step feeds on stay on the device: ``next_tokens[row]`` holds each table row's latest
    greedy token, written by every step and read by the row's next decode, so the host can launch a step
    before it has read the previous one's tokens. On CUDA with the Triton attention, every decode bucket
    (1, 2, 4, ... >= the running requests) is captured once as a CUDA graph; a batch is padded to its
    bucket with the scratch row (whose table points at the scratch block) and replayed after one
    host-to-device copy of its rows and positions. Elsewhere the step runs eagerly.
    """

    def __init__(self, net: PagedTransformer, cache: PagedKVCache, max_batch: int, cuda_graphs: bool = True):
        self.net, self.cache = net, cache
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.one_row: dict[str, dict] = {}  # per weight shape: cuBLAS or the GEMV for one-token steps, as timed
        self.next_tokens = torch.zeros(cache.tables.shape[0], dtype=torch.int64, device=cache.device)
        triton = net.enable_triton(cache.kv)  # also on the CPU under TRITON_INTERPRET=1 (tests)
        self.graphed = bool(cuda_graphs and cache.cuda and triton)
        if self.graphed:
            self.sizes = bucket_sizes(max_batch)
            n = self.sizes[-1]
            self.inputs = torch.zeros(2, n, dtype=torch.int64, device=cache.device)  # rows, positions
            # two pinned buffers, taken in turn: a launch's copy from one may still be queued when the next
            # launch fills the other (the host reads a launch's results only after launching the next)
            self.staging = [torch.zeros(2, n, dtype=torch.int64, pin_memory=True) for _ in range(2)]
            if net.fused is not None:
                self.one_row = net.fused.tune_one_row()
                log.info("one-token projections: %s", self.one_row)
            self._capture()
            self._warm_prefill()

    @property
    def mixes(self) -> bool:
        """Whether a decode step can ride in a prefill call (the fused kernels)."""
        return self.net.fused is not None

    def _step(self, rows: torch.Tensor, positions: torch.Tensor, span: int = 0) -> torch.Tensor:
        """One greedy step of ``rows`` on their ``next_tokens``, which it then replaces."""
        out = self.net.decode(self.cache.kv, self.cache.tables, rows, self.next_tokens[rows], positions,
                              span=span).argmax(-1)
        self.next_tokens[rows] = out
        return out

    def _graph_step(self, b: int) -> torch.Tensor:
        """A captured step: positions advance in place, so consecutive replays need nothing from the host."""
        out = self._step(self.inputs[0, :b], self.inputs[1, :b])
        self.inputs[1, :b].add_(1)
        return out

    def _capture(self) -> None:
        self.inputs[0].fill_(self.cache.scratch_row)
        mempool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.cache.device)
        side.wait_stream(torch.cuda.current_stream(self.cache.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._graph_step(self.sizes[-1])
        torch.cuda.current_stream(self.cache.device).wait_stream(side)
        for b in reversed(self.sizes):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=mempool):
                out = self._graph_step(b)
            self.graphs[b] = (graph, out)
        torch.cuda.synchronize(self.cache.device)
        log.info("captured decode CUDA graphs for batch sizes %s", self.sizes)

    def _warm_prefill(self) -> None:
        """Compile every prefill kernel variant now, not at some agent's first request (a Reflect waited
        0.6 s for the prefix kernel on an H200): fresh and prefix, short and long chunks, on the scratch row."""
        row = self.cache.scratch_row
        for width, start in ((1, 0), (1, 1), (256, 0), (256, 1)):
            if start + width <= self.cache.max_seq:
                self.prefill([row], [[0] * width], [start])
        torch.cuda.synchronize(self.cache.device)

    def decode(self, rows: list[int], positions: list[int], steps: int = 1) -> torch.Tensor:
        """Launch ``steps`` greedy steps of the batch (each row's KV blocks reserved for them), each row
        starting from its ``next_tokens``: the tokens of each step [steps, rows], on the device."""
        if not self.graphed:
            dev = self.cache.device
            rows_t, pos, out = device_tensor(rows, dev), device_tensor(positions, dev), []
            for _ in range(steps):
                out.append(self._step(rows_t, pos, span=int(pos.max()) + 1))
                pos = pos + 1
            return torch.stack(out)
        n = len(rows)
        b = next(s for s in self.sizes if s >= n)  # the largest bucket holds every running request
        pad = b - n
        staging = self.staging[0]
        self.staging.reverse()
        staging[:, :b] = torch.tensor([rows + [self.cache.scratch_row] * pad, positions + [0] * pad])
        self.inputs[:, :b].copy_(staging[:, :b], non_blocking=True)
        graph, result = self.graphs[b]
        outs = []
        for _ in range(steps):  # one host round trip for all of them
            graph.replay()
            outs.append(result[:n].clone())
        return torch.stack(outs)

    def prefill(self, rows: list[int], chunks: list[list[int]], starts: list[int],
                riders: Optional[tuple[list[int], list[int]]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Launch the chunks (padded to the longest) for ``rows`` at positions from ``starts``: last-position
        logits [B, V] and their greedy tokens [B] (each row's ``next_tokens``), on the device. ``riders``
        (rows, positions), where ``mixes``: one decode step in the same call, whose logits and tokens follow
        the prefill's."""
        dev = self.cache.device
        lens = [len(c) for c in chunks]
        width = max(lens)
        padded = [c + [0] * (width - len(c)) for c in chunks]
        rows_t = written = device_tensor(rows, dev)
        ride = None
        if riders is not None:
            d_rows = device_tensor(riders[0], dev)
            ride = (d_rows, self.next_tokens[d_rows], device_tensor(riders[1], dev))
            written = torch.cat([rows_t, d_rows])
        logits = self.net.prefill(self.cache.kv, self.cache.tables, rows_t, device_tensor(padded, dev),
                                  device_tensor(starts, dev), device_tensor(lens, dev),
                                  max(s + n for s, n in zip(starts, lens)), max(starts) > 0, ride)
        firsts = logits.argmax(-1)
        self.next_tokens[written] = firsts  # a chunk short of its prompt's end writes one the next chunk replaces
        return logits, firsts
