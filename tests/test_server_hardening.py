"""Clients the server did not expect, against a real server process on 127.0.0.1: every request gets a
reply, nobody touches another's session, bad input is refused at the boundary, the server stops cleanly."""
import json
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest
import torch

from djinn.client import ConcurrencyLimitExceeded, DjinnClient, DjinnError, SessionNotFound, Unauthorized
from djinn.runners.local_server import LocalServer, free_port
from djinn.server.config import ServerConfig
from djinn.server import protocol
from djinn.server.limits import kv_frame_bytes
from tests.conftest import TINY_LLAMA, hf_greedy

TOKEN, ADMIN = "client-token", "admin-token"
PROMPT = list(range(10, 82))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("hard") / "server.log"
    config = ServerConfig(model_id=TINY_LLAMA, weights="synthetic", device="cpu", max_concurrent=1, auth_token=TOKEN,
                          admin_token=ADMIN, read_timeout_s=1, idle_timeout_s=3, max_seq_len=1024, max_vram_gb=2)
    with LocalServer(config, log_path=str(log)) as s:
        s.log = log
        yield s


def client(server, **kw) -> DjinnClient:
    return DjinnClient(server.address, token=TOKEN, **kw).connect()


def raw_exchange(address: str, *frames: bytes, timeout: float = 10) -> list[dict]:
    """Send frames on one connection; every reply header until the server closes it."""
    host, port = address.split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        for f in frames:
            s.sendall(f)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    out = []
    while data:
        (length,) = struct.unpack(">I", data[5:9])
        out.append(protocol.decode_payload(data[9:9 + length])[0])
        data = data[9 + length:]
    return out


def frame(header: bytes, tail: bytes = b"") -> bytes:
    payload = struct.pack(">I", len(header)) + header + tail
    return struct.pack(">4sBI", b"DJNN", 1, len(payload)) + payload


HELLO = frame(json.dumps({"op": "hello", "token": TOKEN}).encode())


def http(server, method: str, path: str, body: bytes = b"", token: str = TOKEN, **headers) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{server.control_port}{path}", data=body or None, method=method,
                                 headers={**({"Authorization": f"Bearer {token}"} if token else {}), **headers})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as exc:
        text = exc.read()
        return exc.code, json.loads(text) if text.startswith(b"{") else {"text": text.decode()}


def test_1_every_request_is_answered_and_a_departed_client_frees_its_slot(server, tiny_llama):
    with client(server) as c:
        s = c.open_session()
        assert s.generate(PROMPT, 0) == []
        assert s.generate([], 5) == hf_greedy(tiny_llama.model, PROMPT, 5)  # it never replied
    # --max-concurrent 1: a client holding the only slot leaves mid-generate; the next one is served at once
    gone = client(server)
    gone.request("hello")
    sess = gone.open_session()
    gone._sock.sendall(protocol.encode({"op": "generate", "id": 1, "session_id": sess.id, "session_key": sess.key,
                                        "max_new_tokens": 900, "tokens": PROMPT}))
    time.sleep(0.3)
    gone.close()
    time.sleep(0.5)
    with client(server) as c:
        assert len(c.open_session().generate([1, 2, 3], 2)) == 2
    assert "client left; request generate cancelled" in server.log.read_text()


def test_2_wrong_types_are_refused_at_the_boundary_and_a_neighbour_is_untouched(server, tiny_llama):
    result = {}

    def neighbour():
        with client(server) as c:
            s = c.open_session()
            for _ in range(50):
                try:
                    result["tokens"] = s.generate(PROMPT, 60)
                    return
                except ConcurrencyLimitExceeded:
                    time.sleep(0.05)

    t = threading.Thread(target=neighbour)
    t.start()
    with client(server) as c:
        s = c.open_session()
        for bad, message in ((["1", True], "^tokens: expected a list of integer token ids"),
                             ([1, True], "^tokens: expected a list of integer token ids")):
            for _ in range(5):
                with pytest.raises(DjinnError, match=message):
                    c.request("generate", session_id=s.id, session_key=s.key, max_new_tokens=2, tokens=bad)
        for fields, message in (({"model_id": 5}, "^model_id: expected a model id string"),
                                ({"model_id": TINY_LLAMA, "weights": 3}, "^weights: expected one of"),
                                ({"model_id": [TINY_LLAMA]}, "^model_id: expected a model id string")):
            with pytest.raises(DjinnError, match=message) as err:
                c.request("load_model", **fields)
            assert err.value.code == "bad_request"
        with pytest.raises(DjinnError, match="^max_new_tokens: expected an integer, got '2'"):
            c.request("generate", session_id=s.id, session_key=s.key, max_new_tokens="2", tokens=[1])
        with pytest.raises(DjinnError, match="^return_kv: expected true or false"):
            c.request("forward", tokens=[1], return_kv="yes")
        for tokens in (torch.tensor(5), torch.ones(2, 2, dtype=torch.int64), torch.ones(2)):  # a scalar, 2-D, float
            with pytest.raises(DjinnError, match=r"^tokens: expected a 1-D int64 or int32 tensor of token ids") as err:
                c.request("generate", {"tokens": tokens}, session_id=s.id, session_key=s.key, max_new_tokens=1)
            assert err.value.code == "bad_request"
    t.join(timeout=60)
    assert result["tokens"] == hf_greedy(tiny_llama.model, PROMPT, 60)
    with client(server) as c:  # JSON null is a field left out: the default max_new_tokens (1), no new tokens
        s = c.open_session()
        first = s.generate(PROMPT, 3)
        null_is_absent = c.request("generate", session_id=s.id, session_key=s.key, max_new_tokens=None, tokens=None)
        assert null_is_absent.tensors["tokens"].tolist() == hf_greedy(tiny_llama.model, PROMPT, 4)[3:]
        assert null_is_absent.header["kv_processed_len"] == len(PROMPT) + len(first)


@pytest.mark.parametrize("header, error", [
    (b"[" * 100000, "nests deeper"),
    (b'{"op":"generate","tensors":5}', "tensors: expected a list"),
    (b'{"op":"generate","tensors":[{"name":"tokens","dtype":"int64","shape":[1],"offset":Infinity,"nbytes":8}]}',
     "Infinity is not JSON"),
    (b'{"op":"generate","tensors":[{"name":["tokens"],"dtype":"int64","shape":[1],"offset":0,"nbytes":8}]}',
     "name must be a non-empty string"),
    (b'{"op":"generate","tensors":[{"name":"tokens","dtype":"int64","shape":[1e30,0],"offset":0,"nbytes":0}]}',
     "shape: expected an integer"),
    (b'{"op":"hello","id":NaN}', "NaN is not JSON"),
    # an empty tensor whose other dimensions overflow torch's strides; an integer Python will not parse
    (b'{"op":"hello","tensors":[{"name":"z","dtype":"int64","shape":[0,2147483648,2147483648,2147483648],'
     b'"offset":0,"nbytes":0}]}', "tensor 'z': shape [0, 2147483648, 2147483648, 2147483648] spans more than"),
    (b'{"op":"hello","x":' + b"1" * 4301 + b"}", "header: a number has more than 4300 digits"),
])
def test_3_malformed_descriptors_get_a_protocol_error_reply(server, header, error):
    replies = raw_exchange(server.address, HELLO, frame(header, bytes(8)))
    assert replies[0]["ok"] is True
    assert replies[1]["code"] == "protocol_error" and error in replies[1]["error"]
    assert "Traceback" not in server.log.read_text()


def test_3_a_protocol_error_echoes_the_id_of_a_header_that_parsed(server):
    replies = raw_exchange(server.address, HELLO, frame(b'{"op":"hello","id":5,"tensors":"x"}'))
    assert replies[1] == {"ok": False, "id": 5, "code": "protocol_error",
                          "error": "tensors: expected a list of at most 16 descriptors"}


def _start(tmp_path, *extra: str) -> tuple[subprocess.Popen, str, int]:
    port, control = free_port(), free_port()
    log = open(tmp_path / f"server-{port}.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "djinn.server.server_main", "--host", "127.0.0.1", "--port",
                             str(port), "--control-port", str(control), "--model-id", TINY_LLAMA, "--weights",
                             "synthetic", "--device", "cpu", *extra], stdout=log, stderr=log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{control}/healthz", timeout=2):
                return proc, f"127.0.0.1:{port}", control
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise TimeoutError("server not healthy")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_4_a_signal_stops_the_server_gracefully_with_clients_connected(tmp_path, sig, tiny_llama):
    proc, address, _ = _start(tmp_path, "--shutdown-grace", "20")
    idle = DjinnClient(address).connect()  # a connected client that sends nothing
    busy = DjinnClient(address).connect()
    s = busy.open_session()
    busy._sock.sendall(protocol.encode({"op": "generate", "id": 7, "session_id": s.id, "session_key": s.key,
                                        "max_new_tokens": 150, "tokens": PROMPT}))
    time.sleep(0.3)
    proc.send_signal(sig)
    assert proc.wait(timeout=25) == 0
    (length,) = struct.unpack(">I", busy._recv_exact(9)[5:9])
    header, tensors = protocol.decode_payload(busy._recv_exact(length))
    assert header["ok"] is True and header["id"] == 7  # finished within the grace, answered
    assert tensors["tokens"].tolist() == hf_greedy(tiny_llama.model, PROMPT, 150)
    idle.close()
    busy.close()


def test_4_requests_past_the_grace_are_answered_shutting_down(tmp_path):
    proc, address, _ = _start(tmp_path, "--shutdown-grace", "0.1", "--max-seq-len", "1024")
    c = DjinnClient(address).connect()
    s = c.open_session()
    c._sock.sendall(protocol.encode({"op": "generate", "id": 8, "session_id": s.id, "session_key": s.key,
                                     "max_new_tokens": 900, "tokens": PROMPT}))
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    (length,) = struct.unpack(">I", c._recv_exact(9)[5:9])
    header, _ = protocol.decode_payload(c._recv_exact(length))
    assert header == {"ok": False, "id": 8, "code": "shutting_down",
                      "error": "the server stopped before this request finished"}
    c.close()


def test_4_a_stopping_server_refuses_every_new_request_and_exits_though_clients_keep_sending(tmp_path):
    """Clients looping hello used to keep a stopping server up (a cancel lost in asyncio.wait_for) and every op
    but generate/forward was still served during the grace."""
    proc, address, control = _start(tmp_path, "--shutdown-grace", "3", "--max-seq-len", "1024")
    stalled = socket.create_connection(("127.0.0.1", control), timeout=10)  # its body never comes: held the exit 60 s
    stalled.sendall(b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{}")
    busy = DjinnClient(address).connect()  # holds the grace open
    s = busy.open_session()
    busy._sock.sendall(protocol.encode({"op": "generate", "id": 1, "session_id": s.id, "session_key": s.key,
                                        "max_new_tokens": 900, "tokens": PROMPT}))
    codes: list[str] = []

    def loop_hello():
        c = DjinnClient(address).connect()
        try:
            while True:
                c._sock.sendall(protocol.encode({"op": "hello"}))
                (length,) = struct.unpack(">I", c._recv_exact(9)[5:9])
                header, _ = protocol.decode_payload(c._recv_exact(length))
                if not header["ok"]:
                    codes.append(header["code"])
                    return
        except (OSError, DjinnError):
            codes.append("closed")

    loopers = [threading.Thread(target=loop_hello, daemon=True) for _ in range(6)]
    for t in loopers:
        t.start()
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)  # within the grace: the generate still runs
    late = DjinnClient(address)
    with pytest.raises((DjinnError, OSError)):
        late.connect()  # no new connections
    assert http(SimpleNamespace(control_port=control), "POST", "/v1/sessions", b"{}", token="") == \
        (503, {"error": "the server is shutting down; retry on another server or later", "code": "shutting_down"})
    assert proc.wait(timeout=10) == 0  # grace 3 s, then every connection closed
    for t in loopers:
        t.join(timeout=5)
    assert codes == ["shutting_down"] * 6
    busy.close()
    stalled.close()


def test_5_sessions_belong_to_their_opener_and_the_token_guards_both_planes(server):
    with client(server) as owner, client(server) as other:
        s = owner.open_session()
        s.generate([1, 2, 3], 2)
        for op in ("generate", "park", "close_session"):
            with pytest.raises(SessionNotFound):  # the id alone is not enough
                other.request(op, session_id=s.id, max_new_tokens=1, tokens=[4])
            for key in ("guess", "\ud800"):  # a lone surrogate is a JSON string too (it used to be internal)
                with pytest.raises(SessionNotFound):
                    other.request(op, session_id=s.id, session_key=key, max_new_tokens=1, tokens=[4])
        assert len(s.generate([4], 2)) == 2  # still the owner's, from the same place
        status, body = http(server, "DELETE", f"/v1/sessions/{s.id}")
        assert status == 404
        assert http(server, "GET", "/v1/sessions")[0] == 403
        status, body = http(server, "GET", "/v1/sessions", token=ADMIN)
        assert status == 200 and s.id in [x["sessionId"] for x in body["sessions"]]
        assert s.close() is True
    with pytest.raises(Unauthorized):
        DjinnClient(server.address, token="wrong").connect()
    for header in (b'{"op":"stats","id":3}', b'{"op":"stats","id":3,"token":"\\ud800"}'):
        assert raw_exchange(server.address, frame(header)) == [{
            "ok": False, "id": 3, "code": "unauthorized",
            "error": "token: this server requires its bearer token (send hello with token first)"}]
    assert http(server, "GET", "/metrics", token="")[0] == 401
    assert http(server, "GET", "/healthz", token="")[0] == 200  # the kubelet's probe needs none


def test_2_odd_but_documented_requests_get_what_the_protocol_says(server, tiny_llama):
    with client(server) as c:
        s = c.open_session()
        for rid in (1.5, [1], {}, True):  # the client numbers its own requests: this one by hand
            c._sock.sendall(protocol.encode({"op": "hello", "id": rid}))
            (length,) = struct.unpack(">I", c._recv_exact(9)[5:9])
            assert protocol.decode_payload(c._recv_exact(length))[0] == {
                "ok": False, "id": None, "code": "bad_request",
                "error": f"id: expected a string or an integer, got {rid!r}"}
        with pytest.raises(DjinnError, match=r"^tokens: sent both as a tensor and as a JSON list; send one"):
            c.request("generate", {"tokens": torch.tensor([5])}, session_id=s.id, session_key=s.key, tokens=[6])
        for fields, message in (({"dtype": "float16"}, "^dtype: djinn/tiny-llama is loaded with dtype float32, not "
                                                       "float16; ask for float32 or auto"),
                                ({"weights": "pretrained"}, "^weights: djinn/tiny-llama is loaded with weights "
                                                            "synthetic, not pretrained")):
            with pytest.raises(DjinnError, match=message) as err:  # one copy of a model: never silently another
                c.request("load_model", model_id=TINY_LLAMA, **fields)
            assert err.value.code == "bad_request"
        assert c.request("load_model", model_id=TINY_LLAMA, dtype="float32", weights="auto").header["ok"]
        nulled = c.request("open_session", mode=None)  # JSON null is a field left out
        assert nulled.header["ok"] and nulled.header["session_id"]
        # a zero-length past is a past: semantic_blind's first step may send one
        shape = tiny_llama.model.config
        empty = torch.zeros(shape.num_hidden_layers, shape.num_key_value_heads,
                            0, shape.hidden_size // shape.num_attention_heads)
        out = c.request("forward", {"tokens": torch.tensor(PROMPT[:4]), "k": empty, "v": empty}, return_kv=True)
        no_past = c.request("forward", {"tokens": torch.tensor(PROMPT[:4])}, return_kv=True)
        assert torch.equal(out.tensors["logits"], no_past.tensors["logits"]) and out.tensors["k"].shape[2] == 4
    assert http(server, "POST", "/v1/sessions", json.dumps({"mode": None}).encode())[0] == 200
    assert http(server, "GET", "/v1/nowhere") == (404, {"error": "path: no '/v1/nowhere' here; see docs/protocol.md",
                                                        "code": "not_found"})
    assert http(server, "PUT", "/v1/models") == (405, {"error": "method: PUT is not served on '/v1/models'",
                                                       "code": "bad_request"})


def test_5_a_non_loopback_bind_needs_a_token_or_insecure():
    base = [sys.executable, "-m", "djinn.server.server_main", "--host", "0.0.0.0", "--device", "cpu",
            "--port", str(free_port()), "--control-port", "-1"]
    env = {k: v for k, v in os.environ.items() if k != "DJINN_AUTH_TOKEN"}
    out = subprocess.run(base, capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        "djinn-server: --host 0.0.0.0: not loopback; set --auth-token (or DJINN_AUTH_TOKEN) so only your clients are served, "
        "or pass --insecure on a network you trust")


def test_6_clients_load_only_allowed_models_that_fit_and_get_the_default_model(server, tmp_path):
    config = tmp_path / "evil.json"
    config.write_text("{}")
    status, body = http(server, "POST", "/v1/models", json.dumps({"modelId": str(config)}).encode(),
                        **{"Content-Type": "application/json"})
    assert status == 403 and body["code"] == "forbidden" and "not loadable on this server" in body["error"]
    started = time.monotonic()
    status, body = http(server, "POST", "/v1/models", json.dumps({"modelId": "meta-llama/Llama-2-7b-hf"}).encode())
    assert status == 507 and body["code"] == "out_of_memory" and "--max-vram-gb 2.0" in body["error"]
    assert time.monotonic() - started < 30  # refused from the config, not after allocating 13 GB
    with client(server) as c:
        assert c.load_model("sshleifer/tiny-gpt2")["model_id"] == "sshleifer/tiny-gpt2"
        s = c.open_session()  # two models loaded: the server's --model-id serves sessions that name none
        assert len(s.generate([1, 2, 3], 2)) == 2
        assert c.stats()["sessions"] >= 1
        assert TINY_LLAMA in c.hello()["models"]


def test_7_limits_are_derived_enforced_and_typed(server, tiny_llama):
    cfg = tiny_llama.model.config
    expected = kv_frame_bytes(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads,
                              cfg.vocab_size, 1024, 4)
    with client(server) as c:
        assert c.hello()["max_frame"] == expected  # a semantic_blind KV frame at --max-seq-len
    too_big = struct.pack(">4sBI", b"DJNN", 1, expected + 1)
    [reply] = raw_exchange(server.address, HELLO, too_big)[1:]
    assert reply["code"] == "protocol_error" and f"exceeds the {expected}-byte limit" in reply["error"]
    # a sender that stalls inside a frame, and a connection that idles, are closed with a reply
    started = time.monotonic()
    [reply] = raw_exchange(server.address, HELLO, frame(b'{"op":"hello"}')[:12])[1:]
    assert "not received within 1 s" in reply["error"] and time.monotonic() - started < 5
    [reply] = raw_exchange(server.address, HELLO)[1:]
    assert reply["error"].startswith("idle for 3 s with no request")
    too_large = {"error": "body: larger than 1048576 bytes; send less", "code": "bad_request"}
    assert http(server, "POST", "/v1/sessions", b"{" + b" " * (1 << 20) + b"}") == (413, too_large)
    with socket.create_connection(("127.0.0.1", server.control_port), timeout=10) as s:  # refused on its word alone
        s.sendall(b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
                  + b"\r\nContent-Length: 10000000\r\n\r\n{}")
        head, _, text = s.recv(65536).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413") and json.loads(text) == too_large
    status, body = http(server, "POST", "/v1/sessions", b'{"modelId": 5}')
    assert status == 400 and body == {"error": "model_id: expected a model id string such as sshleifer/tiny-gpt2, got 5", "code": "bad_request"}
    status, body = http(server, "POST", "/v1/sessions", b'{"mode": NaN}')
    assert status == 400 and body["error"] == "body: NaN is not JSON (strict JSON has no NaN or Infinity)"
    assert http(server, "POST", "/v1/sessions", b'{"mode": ' + b"1" * 4301 + b"}") == \
        (400, {"error": "body: a number has more than 4300 digits", "code": "bad_request"})  # was 500, plain text
    with socket.create_connection(("127.0.0.1", server.control_port), timeout=10) as s:  # a body that stalls
        s.sendall(b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
                  + b"\r\nContent-Length: 10\r\n\r\n{}")
        head, _, text = s.recv(65536).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408") and json.loads(text) == {"error": "body: not received within 1 s",
                                                                          "code": "bad_request"}


def test_a_client_past_1024_descriptors_works(server):
    """The experiment at N=1,024 holds a connection per agent in one process: descriptors past
    select()'s FD_SETSIZE (1,024) must not break the client's check for a closed connection."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the descriptor limit ({hard}) is below 1,200")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    filler = []
    try:
        while not filler or filler[-1] < 1100:
            filler.append(os.open(os.devnull, os.O_RDONLY))
        with client(server) as c:
            assert c._sock.fileno() > 1024
            s = c.open_session()
            assert len(s.generate([1, 2, 3], 2)) == 2 and len(s.generate([4, 5], 2)) == 2
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_client_reconnects_by_itself_after_the_servers_idle_timeout(server):
    with client(server) as c:
        s = c.open_session()
        s.generate([1, 2, 3], 2)
        time.sleep(3.5)  # --idle-timeout 3: the server closed the connection (with a reply nobody read)
        assert len(s.generate([4, 5], 2)) == 2  # reconnected, authenticated, same session by its key


def test_a_client_loading_another_model_leaves_the_server_ready(monkeypatch):
    """/healthz is the server pod's readiness probe: while a client's load_model runs (a 7B takes a minute),
    the model already loaded keeps serving, so the pod must stay in its Service."""
    import asyncio
    from types import SimpleNamespace

    from aiohttp.test_utils import TestClient, TestServer

    import djinn.server.service as service_module
    from djinn.server.server import control_app
    from djinn.server.service import DjinnService, RequestError

    release = threading.Event()
    monkeypatch.setattr(service_module, "estimate_weight_bytes", lambda *a: 1 << 20)

    def slow_load(*args):
        release.wait(30)
        raise OSError("the test stopped this load")
    monkeypatch.setattr(service_module, "load_model", slow_load)

    async def probe():
        service = DjinnService(ServerConfig(device="cpu"))
        service.models[TINY_LLAMA] = SimpleNamespace(loaded=SimpleNamespace(weight_bytes=0),
                                                     engine=SimpleNamespace(cache=SimpleNamespace(nbytes=0)))
        async with TestClient(TestServer(control_app(service, service.config, 5))) as http_client:
            loading = asyncio.create_task(service.load("sshleifer/tiny-gpt2"))
            await asyncio.sleep(0.2)
            assert not loading.done()  # the load is in flight
            r = await http_client.get("/healthz")
            status, body = r.status, await r.json()
            release.set()
            with pytest.raises(RequestError, match="the test stopped this load"):
                await loading
        return status, body

    assert asyncio.run(probe()) == (200, {"status": "ok", "models": [TINY_LLAMA]})


def test_open_sessions_are_capped_by_max_sessions():
    """A client that opens sessions and never closes them (2,400 a second over loopback, ~0.85 KiB each on the
    server) would grow it until --session-ttl; past --max-sessions open_session is refused on both planes, with
    the flag in the message, and a close makes room again."""
    import asyncio

    from aiohttp.test_utils import TestClient, TestServer

    from djinn.server.server import control_app
    from djinn.server.service import DjinnService, RequestError

    async def scenario():
        service = DjinnService(ServerConfig(device="cpu", weights="synthetic", max_sessions=2))
        await service.load(TINY_LLAMA)
        try:
            opened = [await service.open_session(None, None, "full_djinn") for _ in range(2)]
            with pytest.raises(RequestError, match=r"^open_session: the server holds 2 sessions, its --max-sessions 2; "
                                                   r"close sessions you no longer use") as err:
                await service.open_session(None, None, "full_djinn")
            async with TestClient(TestServer(control_app(service, service.config, 5))) as http_client:
                r = await http_client.post("/v1/sessions", json={})
                refused = r.status, (await r.json())["code"]
            await service.close_session(None, *opened[0])
            reopened = await service.open_session(None, None, "full_djinn")
            return err.value.code, refused, len(service.sessions), reopened[0] in service.sessions
        finally:
            for entry in service.models.values():
                entry.engine.shutdown()

    assert asyncio.run(scenario()) == ("concurrency_limit", (429, "concurrency_limit"), 2, True)


def test_concurrent_opens_count_each_other_against_max_sessions():
    """Each open awaits the engine thread between its --max-sessions check and its session: 30 at once used to
    all get in."""
    import asyncio

    from djinn.server.service import DjinnService, RequestError

    async def scenario():
        service = DjinnService(ServerConfig(device="cpu", weights="synthetic", max_sessions=8))
        await service.load(TINY_LLAMA)
        try:
            opened = await asyncio.gather(*[service.open_session(None, None, "full_djinn") for _ in range(30)],
                                          return_exceptions=True)
            refused = [o.code for o in opened if isinstance(o, RequestError)]
            return len(service.sessions), refused
        finally:
            for entry in service.models.values():
                entry.engine.shutdown()

    assert asyncio.run(scenario()) == (8, ["concurrency_limit"] * 22)


def test_a_failing_compute_step_is_internal_and_fails_only_its_request():
    """A step that raises on a request the engine accepted is the server's bug: code internal, not bad_request
    (docs/protocol.md); the session stays as it was and the next request is served."""
    import asyncio

    from djinn.server.service import DjinnService, RequestError

    async def scenario():
        service = DjinnService(ServerConfig(device="cpu", weights="synthetic"))
        engine = (await service.load(TINY_LLAMA)).engine
        try:
            sid, key = await service.open_session(None, None, "full_djinn")
            real = engine._launch

            def broken(plan, steps):
                if plan.prefill:
                    engine._launch = real
                    raise RuntimeError("a kernel fell over")
                return real(plan, steps)

            engine._launch = broken
            with pytest.raises(RequestError) as err:
                await service.generate(None, sid, key, PROMPT, 3)
            again = await service.generate(None, sid, key, PROMPT, 3)
            fresh = await service.generate(None, *(await service.open_session(None, None, "full_djinn")), PROMPT, 3)
            return err.value.code, str(err.value), (again.tokens, again.kv_processed_len) == (fresh.tokens,
                                                                                              fresh.kv_processed_len)
        finally:
            engine.shutdown()

    assert asyncio.run(scenario()) == ("internal", "engine step failed: RuntimeError: a kernel fell over", True)


def test_a_session_closed_under_its_running_request_answers_it_not_found():
    """Its owner closes it from another connection while a generate runs: the session is gone (not_found), the
    request was not bad."""
    import asyncio

    from djinn.server.service import DjinnService, RequestError

    async def scenario():
        service = DjinnService(ServerConfig(device="cpu", weights="synthetic", max_seq_len=1024))
        engine = (await service.load(TINY_LLAMA)).engine
        try:
            sid, key = await service.open_session(1, None, "full_djinn")
            running = asyncio.ensure_future(service.generate(1, sid, key, PROMPT, 900))
            await asyncio.sleep(0)  # it reaches the engine first
            assert await service.close_session(2, sid, key)
            with pytest.raises(RequestError) as err:
                await running
            return err.value.code, str(err.value) == f"session {sid} was closed while this request waited"
        finally:
            engine.shutdown()

    assert asyncio.run(scenario()) == ("not_found", True)


async def _plane_on_loopback():
    """A data plane (no model) on a free loopback port, served in this process: (plane, asyncio server, address)."""
    import asyncio

    from djinn.server.server import DataPlane
    from djinn.server.service import DjinnService

    config = ServerConfig(device="cpu")
    plane = DataPlane(DjinnService(config), config, read_timeout=5, idle_timeout=5)
    listener = await asyncio.start_server(plane.handle, "127.0.0.1", 0)
    return plane, listener, listener.sockets[0].getsockname()[:2]


def test_a_frame_the_decoder_fails_on_is_answered_protocol_error(monkeypatch):
    """Should a check miss (here: the span check off, so torch's strides overflow), the client still gets a reply
    and the connection closes; it used to be dropped without one."""
    import asyncio

    monkeypatch.setattr(protocol, "MAX_SPAN", 1 << 200)
    header = (b'{"op":"hello","tensors":[{"name":"z","dtype":"int64","shape":[0,2147483648,2147483648,2147483648],'
              b'"offset":0,"nbytes":0}]}')

    async def scenario():
        _, listener, address = await _plane_on_loopback()
        reader, writer = await asyncio.open_connection(*address)
        try:
            writer.write(frame(header))
            return await asyncio.wait_for(reader.read(), 10)  # to the end: the server closes
        finally:
            writer.close()
            listener.close()

    data = asyncio.run(scenario())
    (length,) = struct.unpack(">I", data[5:9])
    reply = protocol.decode_payload(data[9:9 + length])[0]
    assert reply == {"ok": False, "id": None, "code": "protocol_error",
                     "error": "frame: not decodable (RuntimeError); check it against docs/protocol.md"}


def test_after_the_grace_a_connection_that_ignores_its_cancel_is_cut_off(monkeypatch):
    """A handler whose read swallows the cancel (as asyncio.wait_for could before Python 3.12) must not keep the
    server up: its transport is aborted, which ends the read, and close_all returns within its bound."""
    import asyncio

    async def deaf_read(reader, *args, **kwargs):
        while True:
            try:
                return await reader.read(1) or None  # None at the end of the stream
            except asyncio.CancelledError:
                continue

    monkeypatch.setattr(protocol, "read_frame", deaf_read)

    async def scenario():
        plane, listener, address = await _plane_on_loopback()
        reader, writer = await asyncio.open_connection(*address)
        try:
            await asyncio.sleep(0.1)  # its handler waits in the read
            await asyncio.wait_for(plane.close_all(wait_s=0.2), 5)
            return await asyncio.wait_for(reader.read(), 5) == b"", len(plane.handlers)
        finally:
            writer.close()  # the client's end too: a handler left behind would keep asyncio.run from returning
            listener.close()

    assert asyncio.run(scenario()) == (True, 0)


@pytest.mark.parametrize("flag", ["--session-ttl", "--orphan-ttl", "--idle-timeout"])
def test_time_flags_must_be_positive(flag):
    from djinn.server.server_main import build_parser, config_from_args

    with pytest.raises(SystemExit, match=f"^{flag}: must be > 0 seconds$"):
        config_from_args(build_parser().parse_args(["--device", "cpu", flag, "0"]))


def test_a_session_at_work_does_not_expire_and_an_open_whose_client_left_leaves_no_session():
    """--session-ttl counts from the end of a session's last request, never while one runs; an open_session
    cancelled by its client's departure still lands in the engine, and is closed there."""
    import asyncio

    from djinn.server.service import DjinnService

    async def scenario():
        service = DjinnService(ServerConfig(device="cpu", weights="synthetic", session_ttl_s=0.3, max_seq_len=1024))
        engine = (await service.load(TINY_LLAMA)).engine
        try:
            sid, key = await service.open_session(None, None, "full_djinn")
            work = asyncio.ensure_future(service.generate(None, sid, key, PROMPT, 600))  # longer than the TTL
            expired = 0
            while not work.done():
                expired += await service.expire_sessions()
                await asyncio.sleep(0.05)
            expired += await service.expire_sessions()  # just finished: not idle yet
            survived = (await work).kv_processed_len, expired, sid in service.sessions
            left = asyncio.ensure_future(service.open_session(None, None, "full_djinn"))
            await asyncio.sleep(0)  # it reached the engine call
            left.cancel()
            for _ in range(2):  # the engine runs its inbox in order: the open, then the close it queued
                await asyncio.wrap_future(engine.call(lambda: None))
            return survived, len(engine.sessions), len(service.sessions)
        finally:
            engine.shutdown()

    assert asyncio.run(scenario()) == ((len(PROMPT) + 599, 0, True), 1, 1)


def test_a_client_that_never_reads_its_replies_loses_the_connection_not_the_server(server):
    """Replies (logits, 128 KiB each) pile up unread: after --read-timeout (1 s) the server drops that
    connection; its handler does not wait on the client for good, and others are served meanwhile."""
    host, port = server.address.split(":")
    hello = frame(json.dumps({"op": "hello", "token": TOKEN}).encode())
    forward = frame(json.dumps({"op": "forward", "tokens": [1, 2]}).encode())
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fixed and small: no autotuning
        s.connect((host, int(port)))
        s.settimeout(10)
        s.sendall(hello + forward * 200)  # ~25 MiB of replies; the server reads on only while it can write
        deadline = time.time() + 10
        while "did not take its reply within 1 s" not in server.log.read_text() and time.time() < deadline:
            with client(server) as c:
                assert c.request("hello").header["ok"]
            time.sleep(0.2)
        assert "did not take its reply within 1 s" in server.log.read_text()
        received = b""
        try:  # what was in flight, then the end of the connection (EOF or reset), not a wait for more
            while chunk := s.recv(1 << 20):
                received += chunk
        except ConnectionResetError:
            pass
    assert len(received) < 200 * 128 * 1024  # cut off, not all 200 replies


def test_an_http_connection_stalled_inside_its_headers_is_closed_after_the_read_timeout(server):
    with socket.create_connection(("127.0.0.1", server.control_port), timeout=8) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never the blank line that ends the headers
        t0 = time.time()
        assert s.recv(1024) == b""  # closed by the server (read timeout 1 s), not held
        assert time.time() - t0 < 5
    assert http(server, "GET", "/healthz")[0] == 200
