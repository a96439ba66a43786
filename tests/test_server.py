"""A real Djinn server process on 127.0.0.1 (tiny Llama, CPU) driven through djinn.client."""
import json
import re
import socket
import struct
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from djinn.client import ConcurrencyLimitExceeded, DjinnClient, DjinnError, SessionNotFound
from djinn.runners.decode import REMOTE_MODES
from djinn.runners.common import is_oom
from djinn.runners.local_server import LocalServer
from djinn.server.config import ServerConfig
from tests.conftest import ADMIN_TOKEN, TINY_LLAMA, hf_greedy

PROMPT = list(range(10, 82))
ROOT = Path(__file__).resolve().parent.parent


def test_full_djinn_matches_local_generate_and_reuses_the_session(djinn_server, tiny_llama):
    with DjinnClient(djinn_server.address) as c:
        s = c.open_session(model_id=TINY_LLAMA)
        before = c.bytes_sent
        reason = s.generate(PROMPT, 20)
        reason_bytes = c.bytes_sent - before
        assert reason == hf_greedy(tiny_llama.model, PROMPT, 20)
        sent_before = c.bytes_sent
        reflect = s.generate([5, 6, 7], 10)
        assert reflect == hf_greedy(tiny_llama.model, PROMPT + reason + [5, 6, 7], 10)
        assert s.kv_processed_len == 72 + 20 + 3 + 9
        # Reflect sent 3 token ids (24 bytes + header), not the 92-token history
        assert c.bytes_sent - sent_before < reason_bytes - 69 * 8
        assert s.close() is True
        with pytest.raises(SessionNotFound):
            s.generate([1], 1)
    time.sleep(0.2)
    assert f"Reusing session {s.id}" in djinn_server.log.read_text()


def test_three_modes_agree_on_tokens_and_differ_in_bytes(djinn_server, tiny_llama):
    expected = hf_greedy(tiny_llama.model, PROMPT, 8)
    per_token = {}
    with DjinnClient(djinn_server.address) as c:
        for mode, fn in REMOTE_MODES.items():
            before = c.bytes_sent + c.bytes_received
            assert fn(c, TINY_LLAMA, PROMPT, 8) == expected, mode
            per_token[mode] = (c.bytes_sent + c.bytes_received - before) / 8
    assert per_token["full_djinn"] < per_token["partially_aware"] < per_token["semantic_blind"]


def test_control_plane_health_metrics_and_sessions(djinn_server):
    base = f"http://127.0.0.1:{djinn_server.control_port}"
    with urllib.request.urlopen(base + "/healthz") as r:
        assert json.load(r)["models"] == [TINY_LLAMA]
    req = urllib.request.Request(base + "/v1/sessions", data=json.dumps({"mode": "full_djinn"}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        opened = json.load(r)
    sid = opened["sessionId"]
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with urllib.request.urlopen(urllib.request.Request(base + "/v1/sessions", headers=admin)) as r:
        assert sid in [s["sessionId"] for s in json.load(r)["sessions"]]
    with pytest.raises(urllib.error.HTTPError) as err:  # listing is the admin's
        urllib.request.urlopen(base + "/v1/sessions")
    assert err.value.code == 403
    with pytest.raises(urllib.error.HTTPError) as err:  # deleting needs the session's key
        urllib.request.urlopen(urllib.request.Request(f"{base}/v1/sessions/{sid}", method="DELETE"))
    assert err.value.code == 404
    with urllib.request.urlopen(urllib.request.Request(f"{base}/v1/sessions/{sid}", method="DELETE",
                                                       headers={"X-Session-Key": opened["sessionKey"]})) as r:
        assert json.load(r)["closed"] is True
    text = djinn_server.metrics()
    assert "djinn_requests_total" in text
    doc = open(ROOT / "docs" / "protocol.md").read()
    engine_doc = doc[doc.index("per loaded model"):doc.index("Bodies are strict JSON")]
    names = re.findall(r"`(\w+)`", engine_doc)
    assert "kv_blocks_free" in names and "parked_sessions" in names
    for name in names:  # every engine metric the protocol documents is served
        assert f'djinn_engine_{name}{{model="{TINY_LLAMA}"}}' in text, name


def _raw(address, data: bytes) -> bytes:
    host, port = address.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(data)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return b"".join(chunks)  # the server closed the connection
            chunks.append(chunk)


def test_malformed_frames_get_an_error_reply_and_the_server_survives(djinn_server):
    from djinn.server import protocol

    for junk in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", struct.pack(">4sBI", b"DJNN", 1, 2**31),
                 struct.pack(">4sBI", b"DJNN", 1, 6) + struct.pack(">I", 2) + b"{]"):
        reply = _raw(djinn_server.address, junk)
        header, _ = protocol.decode_payload(reply[9:])
        assert header["ok"] is False and header["code"] == "protocol_error"
    with DjinnClient(djinn_server.address) as c:
        with pytest.raises(DjinnError, match="unknown operation"):
            c.request("explode")
        with pytest.raises(DjinnError, match="mode"):
            c.open_session(mode="turbo")
        s = c.open_session()
        with pytest.raises(DjinnError, match="^tokens: id 32000 is outside the model's vocabulary"):
            s.generate([5, 32000], 2)
        with pytest.raises(DjinnError, match="^max_new_tokens: expected an integer"):
            c.request("generate", session_id=s.id, session_key=s.key, max_new_tokens="many", tokens=[1])
        with pytest.raises(DjinnError, match="^tokens: id -1"):
            c.forward([-1])
        with pytest.raises(DjinnError, match="^tokens: expected a 1-D int64 or int32 tensor of token ids, got float32"):
            c.request("forward", {"tokens": torch.ones(3)})
        with pytest.raises(DjinnError, match=r"^k: expected a cache of shape \[2, 2, length, 16\]"):
            c.forward([1], past_kv=(torch.zeros(2, 2, 4, 8), torch.zeros(2, 2, 4, 8)))
        assert len(s.generate([5, 6], 2)) == 2  # the session is still usable
        assert c.hello()["version"] == 1


def test_concurrent_clients_get_correct_tokens(djinn_server, tiny_llama):
    n, results, errors = 12, {}, []

    def agent(i):
        try:
            with DjinnClient(djinn_server.address, timeout=60) as c:
                s = c.open_session()
                results[i] = (s.generate(PROMPT[i:], 12), s.generate([i + 1], 6))
                s.close()
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(n)]
    [t.start() for t in threads]
    [t.join(timeout=120) for t in threads]
    assert not errors and len(results) == n
    for i in (0, 5, 11):
        first, second = results[i]
        assert first == hf_greedy(tiny_llama.model, PROMPT[i:], 12)
        assert second == hf_greedy(tiny_llama.model, PROMPT[i:] + first + [i + 1], 6)


@pytest.fixture(scope="module")
def strict_server(tmp_path_factory):
    log = tmp_path_factory.mktemp("strict") / "server.log"
    config = ServerConfig(model_id=TINY_LLAMA, weights="synthetic", device="cpu", max_concurrent=1, session_ttl_s=2,
                          orphan_ttl_s=1, max_frame=10_485, max_seq_len=512)  # a 10 kB frame limit
    with LocalServer(config, log_path=str(log)) as server:
        yield server


def test_concurrency_limit_refuses_with_the_seed_message(strict_server):
    slow_done = threading.Event()

    def slow():  # keeps trying until it holds the only slot for a long generation
        with DjinnClient(strict_server.address) as c:
            s = c.open_session()
            for _ in range(200):
                try:
                    s.generate(PROMPT, 400)
                    break
                except ConcurrencyLimitExceeded:
                    time.sleep(0.01)
        slow_done.set()

    t = threading.Thread(target=slow)
    t.start()
    with DjinnClient(strict_server.address) as c:
        deadline, refused = time.monotonic() + 20, None
        while refused is None and time.monotonic() < deadline and not slow_done.is_set():
            try:
                c.forward([1, 2])
            except ConcurrencyLimitExceeded as exc:
                refused = exc
        t.join(timeout=60)
        assert str(refused) == "Concurrency limit exceeded: 1 active requests >= 1 limit"
        assert len(c.open_session().generate([1, 2], 2)) == 2  # served again once the slow one finished


def test_env_overrides_max_concurrent(monkeypatch):
    from djinn.server.server_main import build_parser, config_from_args

    monkeypatch.setenv("GENIE_QOS_MAX_CONCURRENCY", "7")
    assert config_from_args(build_parser().parse_args(["--device", "cpu"])).max_concurrent == 7
    monkeypatch.setenv("GENIE_QOS_MAX_CONCURRENCY", "many")
    with pytest.raises(SystemExit, match="GENIE_QOS_MAX_CONCURRENCY"):
        config_from_args(build_parser().parse_args(["--device", "cpu"]))


def test_oversized_request_is_refused_and_sessions_expire(strict_server):
    with DjinnClient(strict_server.address) as c:
        with pytest.raises(DjinnError, match="exceeds"):
            c.forward(list(range(5000)))  # 40 kB frame over the 10 kB limit: error reply, then closed
        s = c.open_session()  # the client reconnects
        s.generate([1, 2, 3], 2)
        time.sleep(4.5)  # session TTL 2 s
        with pytest.raises(SessionNotFound):
            s.generate([4], 1)


def _parks(server) -> int:
    return int(re.search(rf'djinn_engine_parks{{model="{TINY_LLAMA}"}} (\d+)', server.metrics()).group(1))


def test_dropped_client_is_parked_then_expired(strict_server):
    c = DjinnClient(strict_server.address).connect()
    s = c.open_session()
    s.generate(PROMPT, 4)
    parks = _parks(strict_server)
    c.close()  # drop without closing the session: its blocks park at once
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        m = strict_server.metrics()
        if "djinn_sessions 0" in m:
            break
        time.sleep(0.3)
    m = strict_server.metrics()
    assert "djinn_sessions 0" in m and int(re.search(r"djinn_sessions_expired_total (\d+)", m).group(1)) >= 1
    assert _parks(strict_server) == parks + 1  # parked when its client dropped, before it expired
    blocks = re.search(rf'djinn_engine_kv_blocks{{model="{TINY_LLAMA}"}} (\d+)', m).group(1)
    assert f'djinn_engine_kv_blocks_free{{model="{TINY_LLAMA}"}} {blocks}' in m  # nothing left on the device


def test_a_full_kv_cache_answers_out_of_memory_and_keeps_serving(tmp_path):
    """Four device blocks (--max-slots 1 --max-seq-len 64) and no host memory for parking (--host-kv-gb 0):
    a second session's request cannot get in while the first holds three blocks, and says so."""
    config = ServerConfig(model_id=TINY_LLAMA, weights="synthetic", device="cpu", max_slots=1, max_seq_len=64,
                          host_kv_gb=0)
    with LocalServer(config, log_path=str(tmp_path / "server.log")) as server, DjinnClient(server.address) as c:
        a, b = c.open_session(), c.open_session()
        a.generate(list(range(10, 50)), 8)  # 47 positions: 3 of the 4 blocks
        with pytest.raises(DjinnError) as refused:
            b.generate(list(range(20, 60)), 8)
        assert refused.value.code == "out_of_memory" and is_oom(refused.value)
        assert "the KV cache is full" in str(refused.value) and "--host-kv-gb" in str(refused.value)
        assert len(a.generate([11], 4)) == 4  # the first session is served as before
        a.close()
        assert len(b.generate(list(range(20, 60)), 8)) == 8
        assert re.search(rf'djinn_engine_refused{{model="{TINY_LLAMA}"}} 1\b', server.metrics())
