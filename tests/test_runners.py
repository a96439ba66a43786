"""The agent loop and its planning, on a scripted backend: no model, Ray or server."""
import threading

import pytest
import torch

from djinn.results import ResultDocument
from djinn.runners import plan
from djinn.runners.agents import AgentWorkload, StepOutcome, run_agents
from djinn.runners.decode import measure
from djinn.spec import Baseline, parse_spec


class Scripted:
    """A backend whose step ``fail_at`` (counted over all agents and rounds) raises ``error``."""

    name, backend = "scripted", "test"

    def __init__(self, error=None, fail_at=None):
        self.error, self.fail_at = error, fail_at
        self.calls, self.setups, self.teardowns = 0, [], 0
        self.lock = threading.Lock()

    def setup(self, n):
        self.setups.append(n)

    def step(self, agent, new_tokens, max_new_tokens):
        with self.lock:
            self.calls += 1
            if self.calls == self.fail_at:
                raise self.error
        return StepOutcome([1] * max_new_tokens, len(new_tokens), 0)

    def teardown(self):
        self.teardowns += 1


WORK = AgentWorkload([1] * 72, [2] * 18, [3] * 10)


def _doc():
    return ResultDocument(baseline="djinn_agents", experiment="agent_scaling", model_id="m", prompt_tokens=72,
                          new_tokens=2)


def _spec(**kw):
    return parse_spec({"sleepSeconds": 0, "newTokens": 2, "output": {"uri": "x"}, **kw})


def test_sweep_doubles_djinn_past_agent_counts_up_to_the_cap():
    spec = _spec(agentCounts=[1, 4, 32], djinnSweepCap=300)
    assert plan.agent_counts(spec, Baseline.djinn_agents) == [1, 4, 32, 64, 128, 256, 300]
    assert plan.agent_counts(spec, Baseline.ray_keepalive) == [1, 4, 32]  # only Djinn is swept
    assert plan.agent_counts(_spec(agentCounts=[1, 32]), Baseline.djinn_agents) == [1, 32]
    assert plan.agent_counts(_spec(agentCounts=[1, 32], djinnSweepCap=32), Baseline.djinn_agents) == [1, 32]
    assert plan.stops_at_first_failure(spec, Baseline.djinn_agents)
    assert not plan.stops_at_first_failure(spec, Baseline.ray_serverless)


def test_rounds_reach_min_steps_at_every_n():
    spec = _spec(minSteps=100)
    assert {n: plan.rounds(spec, n) for n in (1, 2, 3, 32, 64)} == {1: 50, 2: 25, 3: 17, 32: 2, 64: 1}
    assert all(2 * n * spec.iterations * plan.rounds(spec, n) >= 100 for n in range(1, 130))
    assert plan.rounds(_spec(minSteps=100, iterations=3), 1) == 17
    assert plan.rounds(_spec(), 1) == 1


def test_rounds_pool_steps_of_fresh_agents():
    backend = Scripted()
    doc = run_agents(backend, 3, _spec(iterations=2), WORK, _doc(), rounds=4)
    assert backend.setups == [3] * 4 and backend.teardowns == 4
    assert len(doc.steps) == 4 * 3 * 2 * 2 and doc.rounds == 4
    assert sorted({(s.round, s.agent_id, s.iteration) for s in doc.steps}) == \
        [(r, a, i) for r in range(4) for a in range(3) for i in range(2)]
    assert doc.oom is False and doc.error is None


def test_a_failure_is_recorded_with_its_type_and_traceback_and_ends_the_run():
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
    doc = run_agents(Scripted(oom, fail_at=3), 1, _spec(), WORK, _doc(), rounds=3)
    assert doc.oom and doc.error == "OutOfMemoryError: CUDA out of memory. Tried to allocate 1 GiB"
    assert "Traceback" in doc.traceback and "raise self.error" in doc.traceback
    assert len(doc.steps) == 2  # the first round's steps are kept, no round after the failure
    other = run_agents(Scripted(ModuleNotFoundError("No module named 'x' (OutOfMemoryError)"), fail_at=1),
                       1, _spec(), WORK, _doc())
    assert not other.oom and other.error.startswith("ModuleNotFoundError") and other.traceback


def test_decode_discards_warmups_and_keeps_the_measured_runs():
    calls = []

    def once():
        calls.append(1)
        return [7, 8], 0.5, 0.25
    doc = measure(ResultDocument(baseline="full_djinn", experiment="decode", model_id="m", prompt_tokens=3,
                                 new_tokens=2), once, runs=30, warmup=5)
    assert len(calls) == 35 and [r.run_id for r in doc.runs] == list(range(1, 31))
    assert all(r.tokens_generated == 2 and r.host_to_device_mb == 0.5 for r in doc.runs)


class FailsFrom(Scripted):
    def __init__(self, first_bad_n, error):
        super().__init__()
        self.first_bad_n, self.failure = first_bad_n, error

    def setup(self, n):
        if n >= self.first_bad_n:
            raise self.failure


def _run_baseline(tmp_path, monkeypatch, baseline, backend, **spec):
    import json
    from types import SimpleNamespace

    from djinn.runners import experiment

    monkeypatch.setattr(experiment, "_agent_backend", lambda *_: backend)
    res = SimpleNamespace(tag=None, server_address=lambda: "localhost:5556")
    failed = []
    experiment._run_agents(_spec(output={"uri": str(tmp_path)}, **spec),
                           experiment.Task("agent_scaling", baseline), res, WORK, failed)
    docs = [json.loads(p.read_text()) for p in tmp_path.glob("results/*/*.json")]
    return {d["n_agents"]: (d["oom"], d["error"]) for d in docs}, failed


def test_swept_djinn_stops_at_its_first_failure(tmp_path, monkeypatch):
    from djinn.client import ConcurrencyLimitExceeded

    refused = ConcurrencyLimitExceeded("concurrency_limit", "Concurrency limit exceeded: 8 active requests >= 8 limit")
    got, failed = _run_baseline(tmp_path, monkeypatch, Baseline.djinn_agents, FailsFrom(8, refused),
                                agentCounts=[1, 2], djinnSweepCap=64)
    assert sorted(got) == [1, 2, 4, 8] and failed == []  # 16, 32, 64 not run; N=8 is the sweep's measurement
    assert got[8] == (False, "ConcurrencyLimitExceeded: Concurrency limit exceeded: 8 active requests >= 8 limit")


def test_unswept_baseline_stops_only_on_oom(tmp_path, monkeypatch):
    got, failed = _run_baseline(tmp_path / "a", monkeypatch, Baseline.ray_keepalive,
                                FailsFrom(2, ModuleNotFoundError("No module named 'x'")), agentCounts=[1, 2, 4])
    assert sorted(got) == [1, 2, 4] and got[2][0] is False
    assert failed == ["ray_keepalive N=2", "ray_keepalive N=4"]  # the command exits non-zero for these
    got, failed = _run_baseline(tmp_path / "b", monkeypatch, Baseline.ray_keepalive,
                                FailsFrom(2, torch.OutOfMemoryError("CUDA out of memory")), agentCounts=[1, 2, 4])
    assert sorted(got) == [1, 2] and got[2] == (True, "OutOfMemoryError: CUDA out of memory") and failed == []


def test_connecting_to_a_ray_head_retries_a_refused_first_client(monkeypatch):
    """A KubeRay head just marked ready failed its first client; the next connection worked."""
    from djinn.runners import ray_backends

    calls = []

    def init(address, **_):
        calls.append(address)
        if len(calls) < 3:
            raise ConnectionAbortedError("Initialization failure from server: Starting Ray client server failed")

    monkeypatch.setattr(ray_backends.ray, "init", init)
    monkeypatch.setattr(ray_backends.ray, "shutdown", lambda: None)
    monkeypatch.setattr(ray_backends.time, "sleep", lambda s: None)
    ray_backends.connect("ray://head-svc:10001")
    assert calls == ["ray://head-svc:10001"] * 3

    def refuse(address, **_):
        calls.append(address)
        raise ConnectionError("ray client connection timeout")

    calls.clear()
    monkeypatch.setattr(ray_backends.ray, "init", refuse)
    with pytest.raises(ConnectionError):  # a head that never answers still fails the run, after the retries
        ray_backends.connect("ray://head-svc:10001")
    assert len(calls) == ray_backends.CONNECT_ATTEMPTS


def test_a_failed_run_exits_non_zero_with_its_document_written(tmp_path, capsys):
    """So that a Kubernetes Job retries it; an OOM or a sweep's stop is a measurement and exits 0."""
    import json

    from djinn import cli

    rc = cli.main(["agents", "--baseline", "djinn_agents", "--agent-counts", "1", "--djinn-server", "127.0.0.1:1",
                   "--model-id", "sshleifer/tiny-gpt2", "--weights", "synthetic", "--device", "cpu",
                   "--output-dir", str(tmp_path)])
    assert rc == 1
    assert "1 run(s) failed (djinn_agents N=1); their result documents record the error" in capsys.readouterr().err
    [doc] = [json.loads(p.read_text()) for p in tmp_path.glob("results/djinn_agents/*.json")]
    assert doc["error"].startswith("DjinnConnectionError") and doc["oom"] is False


def test_keepalive_actors_that_cannot_all_get_their_gpu_share_fail_at_once(monkeypatch):
    """gpuPerActor x N past the cluster's GPUs: Ray would queue the extra actors for good (the Job would
    hang to its deadline); the run fails at once, naming the field and the largest share that fits."""
    from djinn.runners import ray_backends
    from djinn.runners.common import ReportedFailure

    monkeypatch.setattr(ray_backends.ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 1.0})
    backend = ray_backends.RayKeepAliveBackend(ref=None, gpu_per_actor=0.5)
    with pytest.raises(ReportedFailure, match=r"^gpuPerActor: 3 actors x 0.5 GPU need 1.5 GPUs and Ray has 1; set "
                                              r"--gpu-per-actor \(spec.gpuPerActor\) to at most 0.333333$") as err:
        backend.setup(3)
    assert err.value.oom is False and backend.actors == []
