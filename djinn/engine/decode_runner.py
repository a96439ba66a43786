"""One batched decode step, eager or replayed from CUDA graphs captured per batch-size bucket."""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("djinn.engine")


def bucket_sizes(limit: int) -> list[int]:
    """Powers of two up to the first one >= ``limit``."""
    sizes = [1]
    while sizes[-1] < limit:
        sizes.append(sizes[-1] * 2)
    return sizes


class DecodeRunner:
    """``runner(slots, tokens, positions) -> next tokens`` (greedy) for a batch of sessions.

    On CUDA with the Triton attention, every bucket (1, 2, 4, ... >= slots) is captured
    once as a CUDA graph; a batch is padded to its bucket with rows that write only to
    the pool's scratch slot, and replayed with one host-to-device copy of its inputs.
    Elsewhere the step runs eagerly.
    """

    def __init__(self, net, pool, cuda_graphs: bool = True):
        self.net, self.pool = net, pool
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        triton = net.enable_triton(pool.k)  # also on the CPU under TRITON_INTERPRET=1 (tests)
        self.enabled = bool(cuda_graphs and pool.cuda and triton)
        if self.enabled:
            self.sizes = bucket_sizes(pool.n_slots)
            n = self.sizes[-1]
            self.inputs = torch.zeros(3, n, dtype=torch.int64, device=pool.device)  # slots, tokens, positions
            self.staging = torch.zeros(3, n, dtype=torch.int64, pin_memory=True)
            self._capture()

    def _step(self, b: int) -> torch.Tensor:
        slots, tokens, positions = self.inputs[0, :b], self.inputs[1, :b], self.inputs[2, :b]
        return self.net.decode(self.pool.k, self.pool.v, slots, tokens, positions, span=0).argmax(-1)

    def _capture(self) -> None:
        self.inputs[0].fill_(self.pool.scratch)
        mempool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.pool.device)
        side.wait_stream(torch.cuda.current_stream(self.pool.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step(self.sizes[-1])
        torch.cuda.current_stream(self.pool.device).wait_stream(side)
        for b in reversed(self.sizes):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=mempool):
                out = self._step(b)
            self.graphs[b] = (graph, out)
        torch.cuda.synchronize(self.pool.device)
        log.info("captured decode CUDA graphs for batch sizes %s", self.sizes)

    def __call__(self, slots: list[int], tokens: list[int], positions: list[int]) -> list[int]:
        if not self.enabled:
            dev = self.pool.device
            pos = torch.tensor(positions, device=dev)
            logits = self.net.decode(self.pool.k, self.pool.v, torch.tensor(slots, device=dev),
                                     torch.tensor(tokens, device=dev), pos, span=max(positions) + 1)
            return logits.argmax(-1).tolist()
        out: list[int] = []
        step = self.sizes[-1]
        for i in range(0, len(slots), step):
            out += self._replay(slots[i:i + step], tokens[i:i + step], positions[i:i + step])
        return out

    def _replay(self, slots: list[int], tokens: list[int], positions: list[int]) -> list[int]:
        n = len(slots)
        b = next(s for s in self.sizes if s >= n)
        pad = b - n
        self.staging[0, :b] = torch.tensor(slots + [self.pool.scratch] * pad)
        self.staging[1, :b] = torch.tensor(tokens + [0] * pad)
        self.staging[2, :b] = torch.tensor(positions + [0] * pad)
        self.inputs[:, :b].copy_(self.staging[:, :b], non_blocking=True)
        graph, result = self.graphs[b]
        graph.replay()
        return result[:n].tolist()
