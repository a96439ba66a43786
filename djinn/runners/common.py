"""Pieces every runner shares: the prompt, result writing, OOM detection, GPU telemetry."""
from __future__ import annotations

import sys
import threading
import time
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


def is_oom(exc: BaseException) -> bool:
    """True for a real device/host out-of-memory error (CUDA, the emulated cap, or MemoryError)."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc)
    return "CUDA out of memory" in text or "OutOfMemoryError" in text or "out of memory" in text.lower()


def error_line(exc: BaseException) -> str:
    """One line for a result's ``error``: the out-of-memory line when the text has one
    (Ray wraps an actor's OOM in its own traceback), else the first line."""
    lines = [l.strip() for l in str(exc).splitlines() if l.strip()]
    oom = [l for l in lines if "out of memory" in l.lower()]
    return f"{type(exc).__name__}: {(oom or lines or [''])[0]}"[:500]


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
