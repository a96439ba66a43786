"""The sequential runner: every requested baseline, one after another, with the
Djinn server and Ray started and stopped around the baselines that need them
(so only one of them holds the GPU at a time), results written as they finish."""
from __future__ import annotations

import gc
import os
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Optional

from djinn.results import ResultDocument
from djinn.runners.common import (empty_cuda_cache, error_line, is_oom, prompt_text, say, traceback_text,
                                  write_result)
from djinn.spec import AGENT_BASELINES, DECODE_MODES, RAY_BASELINES, Baseline, ExperimentSpec

SERVER_BASELINES = {Baseline.djinn_agents, *DECODE_MODES}


@dataclass(frozen=True)
class Task:
    experiment: str  # "decode" | "agent_scaling"
    baseline: Baseline


def plan_tasks(spec: ExperimentSpec) -> list[Task]:
    """Baselines in the spec's order: decode modes first, preceded by the native decode reference
    when native_pytorch is requested too (one Job of the operator runs exactly one baseline)."""
    modes = [b for b in spec.baselines if b in DECODE_MODES]
    tasks = [Task("decode", Baseline.native_pytorch)] if modes and Baseline.native_pytorch in spec.baselines else []
    tasks += [Task("decode", b) for b in modes]
    tasks += [Task("agent_scaling", b) for b in spec.baselines if b in AGENT_BASELINES]
    return tasks


class Resources:
    """Lazily started server / Ray / local model, released when a task no longer needs them."""

    def __init__(self, spec: ExperimentSpec, log_dir: str, tag: Optional[str] = None):
        self.spec, self.log_dir, self.tag = spec, log_dir, tag
        self.server = None
        self.ray_started = False
        self.model = None

    def server_address(self) -> str:
        if self.spec.djinn_server:
            return self.spec.djinn_server
        if self.server is None:
            from djinn.runners.local_server import LocalServer
            from djinn.server.sizing import server_config

            log = os.path.join(self.log_dir, "djinn-server.log")
            say(f"starting Djinn server for {self.spec.model_id} (log: {log})")
            self.server = LocalServer(server_config(self.spec), log_path=log).start()
        return self.server.address

    def ray(self) -> None:
        if not self.ray_started:
            from djinn.runners.ray_backends import ensure_ray

            say("connecting to Ray" + (f" at {self.spec.ray_address}" if self.spec.ray_address else " (local)"))
            self.ray_started = ensure_ray(self.spec.ray_address, max(self.spec.agent_counts))

    def local_model(self):
        if self.model is None:
            from djinn.runners.hf_agent import ModelRef

            self.model = ModelRef(self.spec.model_id, self.spec.weights, self.spec.dtype, self.spec.device,
                                  self.spec.seed).load()
        return self.model

    def release_except(self, task: Task) -> None:
        if self.server is not None and task.baseline not in SERVER_BASELINES:
            say("stopping Djinn server")
            self.server.stop()
            self.server = None
        if self.ray_started and task.baseline not in RAY_BASELINES:
            import ray

            ray.shutdown()
            self.ray_started = False
        if self.model is not None and task.baseline != Baseline.native_pytorch:
            self.model = None
            gc.collect()
            empty_cuda_cache()

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self.ray_started:
            import ray

            ray.shutdown()
            self.ray_started = False
        self.model = None


def _document(spec: ExperimentSpec, task: Task, prompt_tokens: int, backend: str,
              tag: Optional[str] = None) -> ResultDocument:
    """The run's document; weights as resolved where the run reads them (the same files on a cluster: its
    pods mount the same model volume or download the same snapshot)."""
    import torch

    from djinn.models.loader import resolve_weights

    device = spec.device if spec.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and torch.cuda.is_available():
        device = f"cuda ({torch.cuda.get_device_name(0)})"
    weights, source = resolve_weights(spec.model_id, spec.weights, spec.seed)
    return ResultDocument(baseline=task.baseline.value, experiment=task.experiment, model_id=spec.model_id,
                          prompt_tokens=prompt_tokens, new_tokens=spec.new_tokens, backend=backend, device=device,
                          djinn_server=spec.djinn_server, weights=weights, weights_source=source,
                          dtype=spec.dtype, tag=tag)


def _run_decode(spec: ExperimentSpec, task: Task, res: Resources, prompt: list[int]) -> list[str]:
    from djinn.runners import decode

    if task.baseline == Baseline.native_pytorch:
        lm = res.local_model()
        doc = _document(spec, task, len(prompt), "native", res.tag)
        doc.weights, doc.dtype = lm.weights, str(lm.dtype).removeprefix("torch.")
        once = decode.native_once(lm.model, prompt, spec.new_tokens)
        return [write_result(spec, decode.measure(doc, once, spec.runs, spec.warmup_runs))]
    from djinn.client import DjinnClient

    address = res.server_address()
    with DjinnClient(address) as client:
        client.load_model(spec.model_id, spec.weights, spec.dtype)
        doc = _document(spec, task, len(prompt), "djinn", res.tag)
        doc.djinn_server = address
        once = decode.remote_once(client, task.baseline.value, spec.model_id, prompt, spec.new_tokens)
        return [write_result(spec, decode.measure(doc, once, spec.runs, spec.warmup_runs))]


def _agent_backend(spec: ExperimentSpec, task: Task, res: Resources):
    from djinn.runners import agents

    if task.baseline == Baseline.native_pytorch:
        return agents.NativeBackend(res.local_model().model)
    if task.baseline == Baseline.djinn_agents:
        return agents.DjinnBackend(res.server_address(), spec.model_id, spec.weights)
    from djinn.runners import ray_backends
    from djinn.runners.hf_agent import ModelRef

    res.ray()
    ref = ModelRef(spec.model_id, spec.weights, spec.dtype, spec.device, spec.seed)
    if task.baseline == Baseline.ray_keepalive:
        return ray_backends.RayKeepAliveBackend(ref, spec.gpu_per_actor, spec.emulated_device_bytes)
    return ray_backends.RayServerlessBackend(ref, spec.gpu_per_task)


def _run_agents(spec: ExperimentSpec, task: Task, res: Resources, work, failed: list[str]) -> list[str]:
    """Every N of one baseline; a failure that is not an OOM nor a sweep's planned stop goes to ``failed``."""
    from djinn.runners import plan
    from djinn.runners.agents import run_agents

    written = []
    for n in plan.agent_counts(spec, task.baseline):
        doc = _document(spec, task, len(work.prompt), "", res.tag)
        try:
            backend = _agent_backend(spec, task, res)
            doc.backend = backend.backend
            doc.djinn_server = res.server_address() if task.baseline == Baseline.djinn_agents else None
            run_agents(backend, n, spec, work, doc, plan.rounds(spec, n))
        except Exception as exc:
            if not is_oom(exc):
                raise
            doc.oom, doc.error, doc.traceback = True, error_line(exc), traceback_text(exc)
        doc.finalize()
        a = doc.aggregates
        say(f"{task.baseline.value} N={n}: " + ("OOM" if doc.oom else "failed" if doc.error else
            f"{len(doc.steps)} steps, p50 {a.p50_ms:.1f} ms, p99 {a.p99_ms:.1f} ms (reason p50 "
            f"{a.reason_p50_ms:.1f}, reflect p50 {a.reflect_p50_ms:.1f})") + (f" [{doc.error}]" if doc.error else ""))
        written.append(write_result(spec, doc))
        if doc.oom and spec.stop_on_oom:
            say(f"{task.baseline.value}: out of memory at N={n}; --stop-on-oom skips larger N")
            break
        if doc.error and plan.stops_at_first_failure(spec, task.baseline):
            say(f"{task.baseline.value}: first failure at N={n}; the sweep stops here")
            break
        if doc.error and not doc.oom:
            failed.append(f"{task.baseline.value} N={n}")
    return written


@dataclass(frozen=True)
class Outcome:
    written: list[str]  # where each result document went
    failed: list[str]   # runs whose document records a failure (not an OOM, not a sweep's planned stop)


def run_experiment(spec: ExperimentSpec, tasks: list[Task], log_dir: Optional[str] = None,
                   tag: Optional[str] = None) -> Outcome:
    """Run ``tasks`` in order; every document is written, failed runs included."""
    from djinn.models.loader import load_tokenizer_for
    from djinn.runners.agents import AgentWorkload

    tok = load_tokenizer_for(spec.model_id, spec.weights)
    text = prompt_text(spec)
    work = AgentWorkload.from_tokenizer(tok, text)
    say(f"model {spec.model_id}, prompt {len(work.prompt)} tokens ({tok.name} tokenizer), "
        f"{len(tasks)} baseline runs, output {spec.output.uri}")
    written: list[str] = []
    failed: list[str] = []
    with ExitStack() as stack:
        res = Resources(spec, log_dir or stack.enter_context(tempfile.TemporaryDirectory()), tag)
        stack.callback(res.close)
        for i, task in enumerate(tasks, 1):
            say(f"({i}/{len(tasks)}) {task.experiment}: {task.baseline.value}")
            res.release_except(task)
            if task.experiment == "decode":
                written += _run_decode(spec, task, res, work.prompt)
            else:
                written += _run_agents(spec, task, res, work, failed)
    return Outcome(written, failed)
