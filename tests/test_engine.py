"""The batched engine against transformers' own generate (greedy tokens must be identical)."""
import time

import pytest

from djinn.engine.engine import Engine, EngineError, KVCacheFull
from djinn.engine.kv_cache import block_bytes
from djinn.engine.model_runner import bucket_sizes
from djinn.engine.transformer import PagedTransformer
from tests.conftest import hf_greedy

PROMPTS = [list(range(10, 82)), list(range(300, 340)), [7, 8, 9], list(range(1000, 1100))]


@pytest.fixture()
def engine(tiny_llama):
    eng = Engine(tiny_llama.model, max_seq=256, max_slots=8)
    yield eng
    eng.shutdown()


def test_single_session_matches_generate_and_continues_from_its_cache(engine, tiny_llama):
    m = tiny_llama.model
    s = engine.open_session().result()
    first = engine.generate(s.id, PROMPTS[0], 20).result()
    assert first.tokens == hf_greedy(m, PROMPTS[0], 20)
    assert first.kv_processed_len == 72 + 19  # the last generated token is not processed yet
    more = engine.generate(s.id, [5, 6, 7], 10).result()
    assert more.tokens == hf_greedy(m, PROMPTS[0] + first.tokens + [5, 6, 7], 10)
    assert engine.stats["reused_sessions"] == 1


def test_concurrent_sessions_are_batched_and_exact(engine, tiny_llama):
    sessions = [engine.open_session().result() for _ in PROMPTS]
    futures = [engine.generate(s.id, p, 16) for s, p in zip(sessions, PROMPTS)]
    outs = [f.result().tokens for f in futures]
    assert outs == [hf_greedy(tiny_llama.model, p, 16) for p in PROMPTS]
    snap = engine.snapshot()
    assert snap["decode_batch_tokens"] > snap["decode_steps"]  # steps carried several sessions at once


def test_a_park_asked_while_a_request_runs_happens_when_it_ends(engine, tiny_llama):
    """The server parks a dropped client's sessions; one whose request was still running parks at its end
    (it used to stay resident), and its owner coming back finds it exact."""
    s = engine.open_session().result()
    running = engine.generate(s.id, PROMPTS[0], 60)
    assert engine.park_session(s.id).result() is False  # busy: not yet
    first = running.result()
    engine.call(lambda: None).result()  # the park was started on the engine thread, after the request
    assert not engine.sessions[s.id].resident and engine.snapshot()["parked_sessions"] == 1
    more = engine.generate(s.id, [5, 6, 7], 10).result()
    assert more.tokens == hf_greedy(tiny_llama.model, PROMPTS[0] + first.tokens + [5, 6, 7], 10)


def small_cache(lm, blocks: int, **kw) -> Engine:
    """An engine whose KV cache holds ``blocks`` blocks of 16 tokens (one more is the scratch block)."""
    shape = PagedTransformer(lm.model).shape
    return Engine(lm.model, max_seq=256, kv_budget_bytes=(blocks + 1) * block_bytes(shape, 16, lm.model.dtype), **kw)


def test_idle_sessions_are_parked_and_restored(tiny_llama):
    eng = small_cache(tiny_llama, 8)  # 128 tokens: the three sessions (5 + 3 + 1 blocks of 16) do not fit
    try:
        sessions = [eng.open_session().result() for _ in range(3)]
        firsts = [eng.generate(s.id, p, 8).result().tokens for s, p in zip(sessions, PROMPTS)]
        parked = [i for i, s in enumerate(sessions) if eng.sessions[s.id].host_blocks is not None]
        assert eng.stats["parks"] >= 1 and parked and eng.snapshot()["parked_sessions"] == len(parked)
        # a parked session comes back with its cache and continues exactly
        i = parked[0]
        again = eng.generate(sessions[i].id, [42], 8).result().tokens
        assert again == hf_greedy(tiny_llama.model, PROMPTS[i] + firsts[i] + [42], 8)
        assert eng.stats["restores"] >= 1
    finally:
        eng.shutdown()


def test_stateless_forward_returns_logits_and_cache(engine, tiny_llama):
    ref = hf_greedy(tiny_llama.model, PROMPTS[1], 2)
    r = engine.forward(PROMPTS[1], return_kv=True).result()
    assert int(r.logits.argmax()) == ref[0]
    assert r.kv[0].shape == (2, 2, 40, 16)  # layers, kv heads, tokens, head dim
    r2 = engine.forward([ref[0]], past_kv=r.kv).result()
    assert int(r2.logits.argmax()) == ref[1]
    snap = engine.snapshot()
    assert snap["kv_blocks_free"] == snap["kv_blocks"]  # a stateless request's blocks are returned


def test_errors_do_not_stop_the_engine(engine, tiny_llama):
    with pytest.raises(EngineError, match="not found"):
        engine.generate("nope", [1], 1).result()
    s = engine.open_session().result()
    with pytest.raises(EngineError, match="max-seq-len"):
        engine.generate(s.id, list(range(250)), 10).result()
    with pytest.raises(EngineError, match="mode"):
        engine.open_session("turbo")
    assert engine.generate(s.id, [1, 2, 3], 2).result().tokens == hf_greedy(tiny_llama.model, [1, 2, 3], 2)


def test_gpt2_family(tmp_path):
    from djinn.models import load_model

    lm = load_model("sshleifer/tiny-gpt2", weights="synthetic", device="cpu", quiet=True)
    eng = Engine(lm.model, max_seq=128, max_slots=2)
    try:
        s = eng.open_session().result()
        assert eng.generate(s.id, PROMPTS[0], 10).result().tokens == hf_greedy(lm.model, PROMPTS[0], 10)
    finally:
        eng.shutdown()


def test_recycled_host_blocks_keep_every_parked_cache_intact(tiny_llama):
    """Five sessions through a cache for one or two, three rounds in changing order: every round parks and
    restores caches through recycled host blocks, and every continuation still equals HF generate."""
    eng = small_cache(tiny_llama, 5, host_blocks=3)  # 80 tokens for 5 sessions of up to 40: parks overflow the arena
    try:
        sessions = [eng.open_session().result() for _ in range(5)]
        history = {s.id: list(range(20 + 9 * i, 40 + 9 * i)) for i, s in enumerate(sessions)}
        new = dict(history)
        for order in ([0, 1, 2, 3, 4], [4, 2, 0, 3, 1], [1, 3, 4, 0, 2]):
            for s in [sessions[i] for i in order]:
                out = eng.generate(s.id, new[s.id], 4).result().tokens
                assert out == hf_greedy(tiny_llama.model, history[s.id], 4)
                history[s.id] = history[s.id] + out + [11]
                new[s.id] = [11]
        assert eng.stats["restores"] >= 6 and eng.cache.overflow  # pinned arena and pageable overflow both used
        pinned_in_use = [h for s in eng.sessions.values() for h in s.host_blocks or [] if h < 3]
        assert eng.sched.host.available == 3 - len(pinned_in_use)  # no pinned block lost or lent twice
    finally:
        eng.shutdown()


def test_with_device_and_host_full_a_request_is_refused_and_nothing_else_is_lost(tiny_llama):
    """Host memory for parked KV is bounded (--host-kv-gb): past it nothing parks, and a request that cannot
    get in is refused at once (the server answers out_of_memory) instead of waiting forever."""
    bb = block_bytes(PagedTransformer(tiny_llama.model).shape, 16, tiny_llama.model.dtype)
    eng = small_cache(tiny_llama, 4, host_blocks=0, host_bytes=2 * bb)  # a 3-block session cannot park in 2
    try:
        a, b = eng.open_session().result(), eng.open_session().result()
        first = eng.generate(a.id, PROMPTS[1], 8).result(timeout=30).tokens
        with pytest.raises(KVCacheFull, match="the KV cache is full: 2 sessions hold 3 of 4 device blocks and 0 of 2"):
            eng.generate(b.id, list(range(20, 60)), 8).result(timeout=30)
        snap = eng.snapshot()
        assert snap["refused"] == 1 and snap["host_kv_blocks"] == 2 and snap["host_kv_blocks_free"] == 2
        more = eng.generate(a.id, [11], 4).result(timeout=30).tokens  # a is intact and still served
        assert more == hf_greedy(tiny_llama.model, PROMPTS[1] + first + [11], 4)
        eng.close_session(a.id).result()
        assert eng.generate(b.id, list(range(20, 60)), 8).result(timeout=30).tokens == \
            hf_greedy(tiny_llama.model, list(range(20, 60)), 8)  # b kept nothing of its refused request
    finally:
        eng.shutdown()


def test_a_generate_with_nothing_new_continues_from_the_last_token(engine, tiny_llama):
    """generate(ids, 0) then generate([], 5): the second has no pending token yet must decode (it spun forever)."""
    s = engine.open_session().result()
    assert engine.generate(s.id, PROMPTS[0], 0).result(timeout=30).tokens == []
    assert engine.generate(s.id, [], 5).result(timeout=30).tokens == hf_greedy(tiny_llama.model, PROMPTS[0], 5)


def test_a_failing_request_fails_alone_and_keeps_no_undelivered_tokens(engine, tiny_llama, monkeypatch):
    prefill = engine.runner.prefill

    def poisoned(rows, chunks, starts, riders=None):
        if any(999 in c for c in chunks):
            raise RuntimeError("poisoned step")
        return prefill(rows, chunks, starts, riders)

    monkeypatch.setattr(engine.runner, "prefill", poisoned)
    good, bad = engine.open_session().result(), engine.open_session().result()
    engine.generate(bad.id, [1, 2, 3], 2).result(timeout=30)
    history = list(engine.sessions[bad.id].history)
    futures = [engine.generate(good.id, [5, 6, 7], 8), engine.generate(bad.id, [999, 998, 997], 8)]
    assert futures[0].result(timeout=30).tokens == hf_greedy(tiny_llama.model, [5, 6, 7], 8)
    with pytest.raises(EngineError, match="poisoned step"):
        futures[1].result(timeout=30)
    st = engine.sessions[bad.id]
    assert st.history == history and st.kv_len <= len(history) and not st.busy
    more = engine.generate(bad.id, [4], 3).result(timeout=30)  # the session goes on from what was delivered
    assert more.tokens == hf_greedy(tiny_llama.model, history + [4], 3)


def test_a_cancelled_request_frees_its_session(engine, tiny_llama):
    s = engine.open_session().result()
    fut = engine.generate(s.id, PROMPTS[3], 150)
    time.sleep(0.05)  # in flight
    assert fut.cancel()
    deadline = time.monotonic() + 10
    while engine.sessions[s.id].busy and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not engine.sessions[s.id].busy and engine.sessions[s.id].history == []
    assert engine.generate(s.id, PROMPTS[0], 4).result(timeout=30).tokens == hf_greedy(tiny_llama.model, PROMPTS[0], 4)


def test_prompts_of_unequal_length_and_start_share_a_padded_prefill_exactly(engine, tiny_llama, monkeypatch):
    calls = []
    prefill = engine.runner.prefill
    monkeypatch.setattr(engine.runner, "prefill", lambda rows, chunks, starts, riders=None: calls.append(
        [len(c) for c in chunks]) or prefill(rows, chunks, starts, riders))
    a, b, c = (engine.open_session().result() for _ in range(3))
    first = {a.id: engine.generate(a.id, PROMPTS[0], 4).result().tokens,
             c.id: engine.generate(c.id, PROMPTS[1], 4).result().tokens}
    calls.clear()
    new = {a.id: [5, 6, 7], b.id: list(range(60, 70)), c.id: list(range(80, 92))}
    futures = [engine.call(time.sleep, 0.3)] + [engine.generate(s, t, 6) for s, t in new.items()]  # one drain
    outs = [f.result(timeout=30) for f in futures][1:]
    full = {a.id: PROMPTS[0] + first[a.id] + new[a.id], b.id: new[b.id], c.id: PROMPTS[1] + first[c.id] + new[c.id]}
    assert [o.tokens for o in outs] == [hf_greedy(tiny_llama.model, full[s], 6) for s in new]
    assert any(len(set(lens)) > 1 for lens in calls)  # rows of different lengths (and starts) in one call


def test_a_lone_decode_runs_several_steps_per_host_round_trip_and_stays_exact(engine, tiny_llama):
    s = engine.open_session().result()
    assert engine.generate(s.id, PROMPTS[0], 40).result(timeout=30).tokens == hf_greedy(tiny_llama.model, PROMPTS[0], 40)
    assert engine.stats["decode_steps"] == 39 and engine.stats["decode_calls"] < 20


def test_graph_buckets_double_then_grow_by_128_so_a_large_batch_pads_little():
    sizes = bucket_sizes(1024)
    assert sizes == [1, 2, 4, 8, 16, 32, 64, 128, 256, 384, 512, 640, 768, 896, 1024]
    assert bucket_sizes(1000)[-1] == 1024 and bucket_sizes(3) == [1, 2, 4] and bucket_sizes(1) == [1]
    assert next(b for b in sizes if b >= 600) == 640


def test_the_next_iteration_is_launched_before_the_last_one_is_read_back(engine, tiny_llama, monkeypatch):
    """The host plans and launches iteration k+1 while the device computes k: the decode after a prefill is
    launched before the prefill's first token is read back (it feeds on the token on the device)."""
    import djinn.engine.engine as engine_module

    events = []
    decode, prefill, get = engine.runner.decode, engine.runner.prefill, engine_module.Pending.get
    monkeypatch.setattr(engine.runner, "decode", lambda *a: events.append("launch") or decode(*a))
    monkeypatch.setattr(engine.runner, "prefill", lambda *a: events.append("launch") or prefill(*a))
    monkeypatch.setattr(engine_module.Pending, "get", lambda self: events.append("read") or get(self))
    s = engine.open_session().result()
    assert engine.generate(s.id, PROMPTS[1], 6).result().tokens == hf_greedy(tiny_llama.model, PROMPTS[1], 6)
    assert events[:3] == ["launch", "launch", "read"] and events.count("launch") == events.count("read")
