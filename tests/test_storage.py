import json

import pytest

from djinn.results import ResultDocument, StepRecord, result_key
from djinn.storage import KeyExists, LocalStore, open_store, put_json


def _doc():
    steps = [StepRecord(agent_id=0, iteration=0, phase=p, latency_ms=v, input_tokens=1, new_tokens=1,
                        started_at_s=0) for p, v in (("REASON", 10.0), ("REFLECT", 2.0), ("REASON", 30.0))]
    return ResultDocument(baseline="djinn_agents", experiment="agent_scaling", model_id="m", prompt_tokens=72,
                          new_tokens=50, n_agents=1, steps=steps).finalize()


def test_aggregates_from_steps():
    a = _doc().aggregates
    assert a.p50_ms == 10.0 and a.mean_ms == 14.0 and a.reason_p50_ms == 20.0 and a.reflect_p99_ms == 2.0
    assert a.p99_ms == pytest.approx(29.6)


def test_local_store_is_atomic_and_never_overwrites(tmp_path):
    store = LocalStore(tmp_path)
    key = result_key("djinn_agents", 4)
    assert key.startswith("results/djinn_agents/") and key.endswith("_n4.json")
    put_json(store, key, _doc())
    with pytest.raises(KeyExists):
        put_json(store, key, {"other": True})
    assert json.loads(store.get_bytes(key))["baseline"] == "djinn_agents"
    assert store.list("results/") == [key]  # no temp files left behind
    assert result_key("x", 1) != result_key("x", 1)


def test_s3_store_through_moto(s3_endpoint, s3_bucket):
    store = open_store(f"s3://{s3_bucket}/exp/one", endpoint_url=s3_endpoint)
    key = result_key("ray_serverless", 2)
    uri = put_json(store, key, _doc())
    assert uri == f"s3://{s3_bucket}/exp/one/{key}"
    with pytest.raises(KeyExists):
        put_json(store, key, _doc())
    assert store.list("results/") == [key]
    assert json.loads(store.get_bytes(key))["aggregates"]["p50_ms"] == 10.0


def test_s3_write_racing_another_writer_never_overwrites(s3_endpoint, s3_bucket):
    """Another writer stores the same key just before our PUT leaves (after any check we could
    make): the PUT must be refused and the other writer's bytes stay."""
    store = open_store(f"s3://{s3_bucket}/race", endpoint_url=s3_endpoint)
    rival = open_store(f"s3://{s3_bucket}/race", endpoint_url=s3_endpoint)
    key = result_key("djinn_agents", 8)

    def rival_writes_first(**_):
        store.client.meta.events.unregister("before-call.s3.PutObject", rival_writes_first)
        rival.put_bytes(key, b'{"writer": "rival"}')

    store.client.meta.events.register("before-call.s3.PutObject", rival_writes_first)
    with pytest.raises(KeyExists):
        store.put_bytes(key, b'{"writer": "us"}')
    assert json.loads(store.get_bytes(key)) == {"writer": "rival"}
    store.put_bytes(key, b'{"writer": "us"}', overwrite=True)  # analysis artifacts may be replaced
    assert json.loads(store.get_bytes(key)) == {"writer": "us"}
