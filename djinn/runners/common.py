"""Pieces every runner shares: the prompt, result writing, OOM detection, GPU telemetry."""
from __future__ import annotations

import re
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Optional

import torch

from djinn.paths import DEFAULT_PROMPT_FILE
from djinn.results import ResultDocument, result_key
from djinn.spec import ExperimentSpec
from djinn.storage import open_store, put_json

# What the environment answers after an Act step; sent as the Reflect step's new tokens.
OBSERVATION = "Tool result: the cache moved back to the GPU in one millisecond. Reflect on it."


def prompt_text(spec: ExperimentSpec) -> str:
    if spec.prompt is not None:
        return spec.prompt
    path = Path(spec.prompt_file) if spec.prompt_file else DEFAULT_PROMPT_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        raise SystemExit(f"promptFile: {path} does not exist; give an existing file or a prompt") from None


def empty_cuda_cache() -> None:
    """Give cached device memory back, so the next baseline (or process) can have it."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class ReportedFailure(Exception):
    """A failure another process caught and sent back as data: whether it was an
    out-of-memory error was decided there, from the exception's type."""

    def __init__(self, oom: bool, line: str, traceback_text: str):
        super().__init__(line)
        self.oom, self.line, self.traceback_text = oom, line, traceback_text


def cause_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps: ``raise ... from`` causes and Ray's ``RayTaskError.cause``.
    Not ``__context__``: an error raised while handling an OOM is that error, not an OOM."""
    chain: list[BaseException] = []
    while isinstance(exc, BaseException) and all(exc is not c for c in chain):
        chain.append(exc)
        wrapped = getattr(exc, "cause", None)
        exc = wrapped if isinstance(wrapped, BaseException) else exc.__cause__
    return chain


# The status torch puts first in the RuntimeError it raises for a failed CUDA call, when that status
# is an allocation failure: cudaErrorMemoryAllocation, or a CUDA library that could not allocate its
# workspace (cuBLAS creating a handle on a full GPU, as keep-alive's 11th copy did on an H200).
CUDA_ALLOC_STATUS = re.compile(r"CUDA error: (out of memory|CU[A-Z]+_STATUS_ALLOC_FAILED|CUFFT_ALLOC_FAILED)\b")


def _oom_link(exc: BaseException) -> bool:
    from djinn.client import DjinnError

    if isinstance(exc, ReportedFailure):
        return exc.oom
    if isinstance(exc, DjinnError):
        return exc.code == "out_of_memory"  # the Djinn server's own out-of-memory refusal
    if type(exc) in (RuntimeError, torch.AcceleratorError):  # torch's CUDA errors, not a subclass's message
        return bool(CUDA_ALLOC_STATUS.match(str(exc)))
    # torch.OutOfMemoryError is CUDA's (torch.cuda.OutOfMemoryError) and the emulated ledger's
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError))


def is_oom(exc: BaseException) -> bool:
    """True when ``exc`` or what it wraps is an out-of-memory error, judged by its type (for torch's
    CUDA RuntimeError, by the status it starts with), never by text found anywhere in a traceback."""
    return any(_oom_link(e) for e in cause_chain(exc))


def error_line(exc: BaseException) -> str:
    """One line for a result's ``error``: the out-of-memory exception of the chain when there
    is one, else the innermost cause (Ray's wrapper's own first line names only the actor)."""
    chain = cause_chain(exc)
    link = next((e for e in reversed(chain) if _oom_link(e)), chain[-1])
    if isinstance(link, ReportedFailure):
        return link.line[:500]
    lines = [l.strip() for l in str(link).splitlines() if l.strip()]
    return f"{type(link).__name__}: {lines[0] if lines else ''}"[:500]


def traceback_text(exc: BaseException) -> str:
    """The whole traceback, remote parts included (a ReportedFailure carries the remote one)."""
    here = "".join(traceback.format_exception(exc))
    remote = next((e.traceback_text for e in cause_chain(exc) if isinstance(e, ReportedFailure)), "")
    return f"{remote}\nReported to the driver as:\n{here}" if remote else here


def write_result(spec: ExperimentSpec, doc: ResultDocument) -> str:
    """Store ``doc`` atomically under the spec's output; never overwrites another run's file."""
    store = open_store(spec.output.uri, spec.output.endpoint_url, spec.output.region)
    key = result_key(doc.baseline, doc.n_agents if doc.experiment == "agent_scaling" else None)
    return put_json(store, key, doc.finalize())


def say(msg: str) -> None:
    print(f"[djinn-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class GpuSampler:
    """Samples SM and memory-controller utilisation through NVML while a run is in progress.

    ``memory_bw_gbps`` is NVML's memory-busy fraction times the board's peak bandwidth
    (memory clock x bus width x 2); both numbers are None without an NVIDIA GPU.
    """

    def __init__(self, device_index: int = 0, period_s: float = 0.02):
        self.period_s = period_s
        self.handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
            clock = pynvml.nvmlDeviceGetMaxClockInfo(self.handle, pynvml.NVML_CLOCK_MEM)
            width = pynvml.nvmlDeviceGetMemoryBusWidth(self.handle)
            self.peak_gbps = clock * 1e6 * 2 * width / 8 / 1e9
        except Exception:
            self.handle = None
        self._samples: list[tuple[int, int]] = []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "GpuSampler":
        if self.handle is not None and torch.cuda.is_available():
            self._samples.clear()
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            u = self.nvml.nvmlDeviceGetUtilizationRates(self.handle)
            self._samples.append((u.gpu, u.memory))
            time.sleep(self.period_s)

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()

    def readings(self) -> tuple[Optional[float], Optional[float]]:
        """(mean SM utilisation %, mean memory bandwidth GB/s) of the last sampled run."""
        if not self._samples:
            return None, None
        sm = sum(s[0] for s in self._samples) / len(self._samples)
        mem = sum(s[1] for s in self._samples) / len(self._samples)
        return sm, mem / 100 * self.peak_gbps
