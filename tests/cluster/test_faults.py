"""Faults with real processes: a killed Djinn server, a killed operator, an experiment deleted mid-run."""
from __future__ import annotations

import collections
import os
import signal

import pytest

from cluster import NAMESPACE

FAST = {"sleepSeconds": 3, "iterations": 1, "newTokens": 8}

pytestmark = pytest.mark.timeout(900)  # the scenario's own deadline fires first, with the pod logs


def _replica(c, kind: str, name: str):
    return next((r for (k, _, n, _), r in c.kubelet.replicas.items() if k == kind and n == name), None)


async def _running(c, kind: str, name: str):
    r = _replica(c, kind, name)
    return r if r and r.ready and r.pod.proc and r.pod.proc.returncode is None else None


async def _job_running(c, name: str):
    run = next((r for (_, n, _), r in c.kubelet.jobs.items() if n == name), None)
    return run if run and run.pod and run.pod.exit_code is None else None


def test_killed_server_and_operator_mid_run_neither_hang_nor_duplicate(kind):
    async def scenario(c):
        name, _ = await c.kind_up(**FAST, baselines=["djinn_agents"], agentCounts=[1, 2])
        server = await c.wait("Djinn server running", lambda: _running(c, "Deployment", f"{name}-djinn-server"), 240)
        await c.wait("first run's client running", lambda: _job_running(c, f"{name}-djinn-agents-n1"), 60)
        os.kill(server.pod.proc.pid, signal.SIGKILL)  # the server dies under a live client
        operator = await _running(c, "Deployment", "djinn-bench-operator")
        os.kill(operator.pod.proc.pid, signal.SIGKILL)  # and the operator with it

        status = await c.wait_phase(name, ("Succeeded", "Failed"), timeout=300)
        assert server.pod.restarts >= 1 and operator.pod.restarts >= 1  # both Deployments restarted their pod
        if status["phase"] == "Failed":  # allowed, with the run and its reason stated
            failed = next(x for x in status["conditions"] if x["type"] == "Failed")
            assert failed["reason"] == "RunFailed" and f"{name}-djinn-agents-n1" in failed["message"], failed
        else:
            assert [r["state"] for r in status["runs"]] == ["Succeeded", "Succeeded"]
        jobs = collections.Counter(c.created("Job"))
        assert jobs[f"{name}-djinn-agents-n1"] >= 1 and jobs[f"{name}-djinn-agents-n2"] <= 1
        for run in c.kubelet.jobs.values():  # a restarted operator never starts a run twice
            assert run.attempts == run.failed + run.succeeded, run

    kind(scenario, timeout=480)


def test_deleting_the_experiment_stops_every_process_it_started(kind):
    async def scenario(c):
        name, _ = await c.kind_up(**{**FAST, "sleepSeconds": 30}, baselines=["ray_keepalive"], agentCounts=[1, 2])
        await c.wait("Ray head running", lambda: _running(c, "RayCluster", f"{name}-ray"), 240)
        await c.wait("first run's client running", lambda: _job_running(c, f"{name}-ray-keepalive-n1"), 60)
        theirs = [p for p in c.kubelet.pods() if p.meta.name.startswith(name)]
        namespaces = {os.stat(f"/var/run/netns/{p.netns}").st_ino for p in theirs}
        assert len(theirs) == 2 and _processes_in(namespaces)

        assert await c.api.delete("AgentScalingExperiment", NAMESPACE, name)  # kubectl delete ase
        await c.wait("its pods gone", lambda: _none_left(c, name), 60)
        assert _processes_in(namespaces) == []  # nothing of theirs survives: no Ray worker, no client
        assert [p.meta.name.rsplit("-", 1)[0] for p in c.kubelet.pods()] == ["djinn-bench-operator"]
        for kind_ in ("Job", "RayCluster", "Service"):  # the garbage collector took every child
            assert [o for o in await c.api.list(kind_, NAMESPACE) if o["metadata"]["name"].startswith(name)] == []

    kind(scenario, timeout=420)


async def _none_left(c, name: str) -> bool:
    return not [p for p in c.kubelet.pods() if p.meta.name.startswith(name)]


def _processes_in(namespaces: set[int]) -> list[int]:
    """PIDs on this machine living in one of these network namespaces (by inode)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}/ns/net").st_ino in namespaces:
                pids.append(int(pid))
        except OSError:
            pass
    return pids
