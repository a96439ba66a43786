"""The Ray baselines: keep-alive (an actor per agent pins model + KV) and serverless
(every step a fresh task that loads the weights, recomputes the history and forgets it).

Keep-alive actors ask for ``gpu_per_actor`` (0.01) of a GPU so Ray's scheduler
never queues them: they all land on the device and contend for its memory for
real. An actor reports any failure as data: ``oom`` decided there from the type of
the exception it caught (CUDA's ``torch.OutOfMemoryError`` or the emulated cap's),
the error line and the whole traceback; the driver raises it as a ``ReportedFailure``.
"""
from __future__ import annotations

import os
import time
import uuid
from typing import Optional

import ray
import torch

from djinn.runners.agents import StepOutcome
from djinn.runners.common import ReportedFailure, empty_cuda_cache, error_line, is_oom, say, traceback_text
from djinn.runners.hf_agent import CachedAgent, ModelRef, cache_bytes, greedy, warm_up


def ensure_ray(address: Optional[str], max_agents: int) -> bool:
    """Connect to ``address`` or start a local Ray; returns True when this call started it.

    A local Ray gets at least ``max_agents`` logical CPUs so that tasks and actors
    run at once instead of queueing: contention stays physical, as with --gpu-per-actor.
    """
    if ray.is_initialized():
        return False
    if address:
        connect(address)
        return True
    gpus = torch.cuda.device_count()
    # address="local": a new Ray of our own even when the machine runs one (ray start) or left a
    # /tmp/ray/ray_current_cluster behind, which ray.init() would otherwise join and refuse our num_cpus
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, max_agents) + 1, num_gpus=gpus,
             include_dashboard=False, log_to_driver=False, configure_logging=False)
    return True


CONNECT_ATTEMPTS, CONNECT_BACKOFF_S = 4, 5.0


def connect(address: str) -> None:
    """``ray.init(address)``, retried: a Ray head that has just turned ready can fail its first client
    ("Starting Ray client server failed", seen on a KubeRay head pod under load) and serve the next."""
    for attempt in range(1, CONNECT_ATTEMPTS + 1):
        try:
            ray.init(address=address, log_to_driver=False)
            return
        except ConnectionError as exc:
            if attempt == CONNECT_ATTEMPTS:
                raise
            delay = CONNECT_BACKOFF_S * attempt
            say(f"Ray at {address} refused the connection ({error_line(exc)}); retrying in {delay:.0f} s")
            ray.shutdown()
            time.sleep(delay)


def _cluster_gpus() -> float:
    return ray.cluster_resources().get("GPU", 0)


@ray.remote(num_cpus=0)
class MemoryLedger:
    """An emulated device memory shared by all keep-alive actors (for CPU runs)."""

    def __init__(self, capacity: int):
        self.capacity, self.held = capacity, {}

    def reserve(self, owner: int, nbytes: int) -> Optional[str]:
        """Set ``owner``'s holding to ``nbytes``; returns an error text when it does not fit."""
        others = sum(v for k, v in self.held.items() if k != owner)
        if others + nbytes > self.capacity:
            return (f"emulated device out of memory: tried to allocate {nbytes} bytes with {others} of "
                    f"{self.capacity} held by other agents")
        self.held[owner] = nbytes
        return None


@ray.remote
class KeepAliveAgent:
    """One agent: its own copy of the model and its KV cache, resident for the whole run."""

    def __init__(self, ref: ModelRef, agent_id: int, ledger=None):
        self.ref, self.id, self.ledger = ref, agent_id, ledger
        self.agent: Optional[CachedAgent] = None
        self.weight_bytes = 0

    def _hold(self, nbytes: int) -> None:
        if self.ledger is not None:
            err = ray.get(self.ledger.reserve.remote(self.id, nbytes))
            if err:
                raise torch.OutOfMemoryError(err)

    def _guard(self, fn):
        try:
            return {"ok": True, "value": fn()}
        except Exception as exc:
            oom = is_oom(exc)
            if oom:
                self.agent = None
                empty_cuda_cache()
            return {"ok": False, "oom": oom, "error": error_line(exc), "traceback": traceback_text(exc)}

    def load(self) -> dict:
        def run():
            lm = self.ref.load()
            self.weight_bytes = lm.weight_bytes
            self.agent = CachedAgent(lm.model)
            self._hold(self.weight_bytes)
            warm_up(lm.model)
            return self.weight_bytes
        return self._guard(run)

    def step(self, new_tokens: list[int], max_new_tokens: int) -> dict:
        def run():
            out, before = self.agent.step(new_tokens, max_new_tokens)
            self._hold(self.weight_bytes + cache_bytes(self.agent.cache))
            return out, before
        return self._guard(run)


def _get(refs):
    """``ray.get``; Ray's memory monitor killing a worker (ray.exceptions.OutOfMemoryError) is an OOM too."""
    try:
        return ray.get(refs)
    except ray.exceptions.OutOfMemoryError as exc:
        raise ReportedFailure(True, error_line(exc), traceback_text(exc)) from exc


def _unwrap(reply: dict):
    if not reply["ok"]:
        raise ReportedFailure(reply["oom"], reply["error"], reply["traceback"])
    return reply["value"]


class RayKeepAliveBackend:
    name, backend = "ray_keepalive", "ray"

    def __init__(self, ref: ModelRef, gpu_per_actor: float, device_memory_bytes: Optional[int] = None):
        self.ref, self.gpu_per_actor, self.cap = ref, gpu_per_actor, device_memory_bytes
        self.actors: list = []
        self.ledger = None

    def setup(self, n: int) -> None:
        total = _cluster_gpus()
        gpus = self.gpu_per_actor if total > 0 else 0
        if n * gpus > total + 1e-9:  # Ray would queue the rest for good: the run would hang to its deadline
            raise ReportedFailure(False, f"gpuPerActor: {n} actors x {gpus:g} GPU need {n * gpus:g} GPUs and Ray has "
                                         f"{total:g}; set --gpu-per-actor (spec.gpuPerActor) to at most {total / n:g}", "")
        if self.cap is not None:
            self.ledger = MemoryLedger.options(name=f"djinn-ledger-{uuid.uuid4().hex[:8]}").remote(self.cap)
        self.actors = [KeepAliveAgent.options(num_gpus=gpus, num_cpus=0).remote(self.ref, i, self.ledger)
                       for i in range(n)]
        try:  # all load at once, like N tenants arriving together
            for reply in _get([a.load.remote() for a in self.actors]):
                _unwrap(reply)
        except BaseException:
            self.teardown()
            raise

    def step(self, agent: int, new_tokens: list[int], max_new_tokens: int) -> StepOutcome:
        out, before = _unwrap(_get(self.actors[agent].step.remote(new_tokens, max_new_tokens)))
        return StepOutcome(out, len(new_tokens), before)

    def teardown(self) -> None:
        for a in self.actors + ([self.ledger] if self.ledger is not None else []):
            ray.kill(a)
        self.actors, self.ledger = [], None


@ray.remote(num_cpus=0)
def serverless_step(ref: ModelRef, history: list[int], max_new_tokens: int) -> list[int]:
    """A cold step: load weights, recompute the whole history, generate, discard everything."""
    lm = ref.load()
    try:
        return greedy(lm.model, history, max_new_tokens)
    finally:
        del lm
        empty_cuda_cache()


class RayServerlessBackend:
    name, backend = "ray_serverless", "ray"

    def __init__(self, ref: ModelRef, gpu_per_task: float):
        self.ref, self.gpu_per_task = ref, gpu_per_task
        self.histories: dict[int, list[int]] = {}
        self.gpus = 0.0

    def setup(self, n: int) -> None:
        self.histories = {i: [] for i in range(n)}
        self.gpus = self.gpu_per_task if _cluster_gpus() > 0 else 0

    def step(self, agent: int, new_tokens: list[int], max_new_tokens: int) -> StepOutcome:
        history = self.histories[agent] + list(new_tokens)
        out = _get(serverless_step.options(num_gpus=self.gpus).remote(self.ref, history, max_new_tokens))
        self.histories[agent] = history + out
        return StepOutcome(out, len(history), 0)

    def teardown(self) -> None:
        self.histories = {}
