"""The operator's thin I/O layer without a cluster: the periodic reconcile and the Events it posts."""
import asyncio
import collections
import logging
import re

from djinn.spec import API_VERSION, KIND
from djinn_operator import handlers, k8s

SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def test_a_failing_experiment_does_not_stop_the_tick_for_the_others(monkeypatch, caplog):
    experiments = [{"metadata": {"namespace": "lab", "name": name}, "status": {"phase": phase}}
                   for name, phase in (("a-broken", "Running"), ("b-waiting", "Provisioning"), ("c-done", "Succeeded"))]
    reconciled = []

    async def list_all(kind):
        return experiments

    async def reconcile(ns, name, lock):
        reconciled.append(name)
        if name == "a-broken":
            raise RuntimeError("S3 said no")

    monkeypatch.setattr(handlers.k8s, "list_all", list_all)
    monkeypatch.setattr(handlers, "reconcile", reconcile)
    memo = type("Memo", (), {"locks": collections.defaultdict(asyncio.Lock)})()

    async def two_rounds():
        ticker = asyncio.create_task(handlers.tick(memo, 0.01))
        while len(reconciled) < 4:
            await asyncio.sleep(0.01)
        ticker.cancel()

    with caplog.at_level(logging.ERROR):
        asyncio.run(asyncio.wait_for(two_rounds(), 5))
    assert reconciled[:4] == ["a-broken", "b-waiting", "a-broken", "b-waiting"]  # finished ones are left alone
    assert "periodic reconcile of lab/a-broken failed" in caplog.text


def test_an_event_is_named_as_any_object_however_long_its_experiments_name(monkeypatch):
    posted = []

    async def call(verb, kind, namespace, body=None, **_):
        posted.append(body)

    monkeypatch.setattr(k8s, "_call", call)
    for name in ("exp1", "a" * 235 + "." + "b" * 17):  # 253 characters, a dot where the cut falls
        owner = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name, "namespace": "lab", "uid": "u"}}
        asyncio.run(k8s.event(owner, "Warning", "InvalidSpec", "x" * 2000))
    for body, name in zip(posted, ("exp1", "a" * 235)):
        assert body["metadata"]["name"].startswith(name + ".") and SUBDOMAIN.fullmatch(body["metadata"]["name"])
        assert len(body["metadata"]["name"]) <= 253
        assert len(body["message"]) == 1024
