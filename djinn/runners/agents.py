"""Experiment 2.2: N agents doing Reason -> Act (sleep) -> Reflect against one backend.

A backend gives each agent a ``step(agent, phase, new_tokens, max_new_tokens)``;
the loop here is the same for every baseline, so latencies are comparable.
All agents start each run together (a barrier), the worst case for contention.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Optional, Protocol

from djinn.results import ResultDocument, StepRecord
from djinn.runners.common import OBSERVATION, empty_cuda_cache, error_line, is_oom, traceback_text
from djinn.spec import ExperimentSpec

NEXT_TASK = "Next task: plan the following step and explain it."


@dataclass
class StepOutcome:
    tokens: list[int]
    input_tokens: int
    kv_processed_len: int


class AgentBackend(Protocol):
    name: str
    backend: str

    def setup(self, n: int) -> None:
        """Create ``n`` agents; raises the real out-of-memory error when they do not fit."""

    def step(self, agent: int, new_tokens: list[int], max_new_tokens: int) -> StepOutcome: ...

    def teardown(self) -> None: ...


@dataclass
class AgentWorkload:
    prompt: list[int]
    observation: list[int]
    next_task: list[int]

    @classmethod
    def from_tokenizer(cls, tokenizer, prompt: str) -> "AgentWorkload":
        return cls(tokenizer.encode(prompt), tokenizer.encode(OBSERVATION), tokenizer.encode(NEXT_TASK))


def run_agents(backend: AgentBackend, n: int, spec: ExperimentSpec, work: AgentWorkload,
               doc: ResultDocument, rounds: int = 1) -> ResultDocument:
    """Run ``n`` agents for ``spec.iterations`` cycles, ``rounds`` times with fresh agents.

    A failure anywhere ends the run and is recorded, not raised: ``oom`` from the exception's
    type, ``error`` one line, ``traceback`` all of it; steps measured before it are kept.
    """
    doc.n_agents, doc.iterations, doc.sleep_seconds, doc.rounds = n, spec.iterations, spec.sleep_seconds, rounds
    steps: list[StepRecord] = []
    t0 = time.perf_counter()
    try:
        for r in range(rounds):
            _run_round(backend, n, r, spec, work, steps, t0)
    except Exception as exc:
        doc.oom, doc.error, doc.traceback = is_oom(exc), error_line(exc), traceback_text(exc)
    doc.steps = sorted(steps, key=lambda s: (s.started_at_s, s.agent_id))
    return doc


def _run_round(backend: AgentBackend, n: int, rnd: int, spec: ExperimentSpec, work: AgentWorkload,
               steps: list[StepRecord], t0: float) -> None:
    """One round: set up ``n`` fresh agents, run them from a barrier, tear down; raises the first failure."""
    errors: list[BaseException] = []
    lock = threading.Lock()
    backend.setup(n)
    barrier = threading.Barrier(n)

    def agent(i: int) -> None:
        try:
            barrier.wait(timeout=600)
            for it in range(spec.iterations):
                for phase, new in (("REASON", work.prompt if it == 0 else work.next_task),
                                   ("REFLECT", work.observation)):
                    start = time.perf_counter()
                    out = backend.step(i, new, spec.new_tokens)
                    end = time.perf_counter()
                    with lock:
                        steps.append(StepRecord(agent_id=i, round=rnd, iteration=it, phase=phase,
                                                latency_ms=(end - start) * 1e3, input_tokens=out.input_tokens,
                                                new_tokens=len(out.tokens), kv_processed_len=out.kv_processed_len,
                                                started_at_s=start - t0))
                    if phase == "REASON":
                        time.sleep(spec.sleep_seconds)  # Act: the agent waits on its tool
        except BaseException as exc:  # raised below; one agent's failure must not hang the others
            barrier.abort()
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=agent, args=(i,), name=f"agent-{i}") for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    backend.teardown()
    real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if real:
        raise next((e for e in real if is_oom(e)), real[0])


class NativeBackend:
    """native_pytorch: agents share one local HF model in this process, each with its own cache."""

    name, backend = "native_pytorch", "native"

    def __init__(self, model):
        self.model = model
        self.agents: dict[int, object] = {}

    def setup(self, n: int) -> None:
        from djinn.runners.hf_agent import CachedAgent, warm_up

        warm_up(self.model)
        self.agents = {i: CachedAgent(self.model) for i in range(n)}

    def step(self, agent: int, new_tokens: list[int], max_new_tokens: int) -> StepOutcome:
        out, before = self.agents[agent].step(new_tokens, max_new_tokens)
        return StepOutcome(out, len(new_tokens), before)

    def teardown(self) -> None:
        self.agents = {}
        empty_cuda_cache()


class DjinnBackend:
    """djinn_agents: one connection and one server session per agent; Reflect sends only new tokens."""

    name, backend = "djinn_agents", "djinn"

    def __init__(self, address: str, model_id: str, weights: Optional[str] = None):
        self.address, self.model_id, self.weights = address, model_id, weights
        self.sessions: dict[int, object] = {}

    def setup(self, n: int) -> None:
        from djinn.client import DjinnClient

        self.sessions = {}
        for i in range(n):
            client = DjinnClient(self.address).connect()
            self.sessions[i] = client.open_session(model_id=self.model_id, weights=self.weights)

    def step(self, agent: int, new_tokens: list[int], max_new_tokens: int) -> StepOutcome:
        s = self.sessions[agent]
        before = s.kv_processed_len
        out = s.generate(new_tokens, max_new_tokens)
        return StepOutcome(out, len(new_tokens), before)

    def teardown(self) -> None:
        for s in self.sessions.values():
            try:
                s.close()
            finally:
                s.client.close()
        self.sessions = {}
