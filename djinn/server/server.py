"""The Djinn server's two listeners: the framed data plane and the HTTP control plane.

Every request gets a reply; a request whose client disconnects is cancelled (its admission
slot freed); SIGTERM/SIGINT stop accepting, give in-flight requests the shutdown grace, answer
what is left with ``shutting_down`` and return.
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
from dataclasses import dataclass
from typing import Any, Optional

import torch
from aiohttp import web

from djinn.server import protocol
from djinn.server.config import ServerConfig
from djinn.server.limits import CONTROL_MAX_BODY
from djinn.server.service import SHUTTING_DOWN, DjinnService, RequestError, same_secret

log = logging.getLogger("djinn.server")
DISCONNECT_POLL_S = 0.2  # how often the requests in flight are checked for a client that left
LET_GO_S = 2.0           # after the shutdown grace: how long a connection (either plane) may take to end


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _field(h: dict, name: str, kind: type, default: Any = None) -> Any:
    """A header field of exactly ``kind`` (bool is not an int); one-line bad_request otherwise. JSON null is
    the field left out."""
    value = h.get(name)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        what = {int: "an integer", bool: "true or false", str: "a string"}[kind]
        raise RequestError("bad_request", f"{name}: expected {what}, got {value!r}"[:200])
    return value


def _tokens(header: dict, tensors: dict, key: str = "tokens") -> list[int]:
    """Token ids: an int64/int32 tensor, or a JSON list of integers (never booleans)."""
    if key in tensors:
        t = tensors[key]
        if header.get(key) is not None:
            raise RequestError("bad_request", f"{key}: sent both as a tensor and as a JSON list; send one")
        if t.dtype not in (torch.int64, torch.int32) or t.dim() != 1:
            raise RequestError("bad_request", f"{key}: expected a 1-D int64 or int32 tensor of token ids, "
                                              f"got {str(t.dtype).removeprefix('torch.')} of shape {list(t.shape)}")
        return t.tolist()
    value = [] if header.get(key) is None else header[key]
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise RequestError("bad_request", f"{key}: expected a list of integer token ids")
    return value


def _request_id(h: dict) -> Any:
    rid = h.get("id")
    return rid if isinstance(rid, (str, int)) and not isinstance(rid, bool) else None


@dataclass
class Connection:
    id: int
    authenticated: bool


class DataPlane:
    """One coroutine per client connection; requests on a connection are served in order."""

    def __init__(self, service: DjinnService, config: ServerConfig, read_timeout: float, idle_timeout: float):
        self.service, self.config = service, config
        self.read_timeout, self.idle_timeout = read_timeout, idle_timeout
        self.handlers: dict[asyncio.Task, asyncio.StreamWriter] = {}
        self.inflight: dict[asyncio.Future, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}
        self.left: set[asyncio.Future] = set()  # requests cancelled because their client left
        self._watcher: Optional[asyncio.Task] = None

    async def _send(self, writer: asyncio.StreamWriter, reply: bytes) -> None:
        """Write ``reply``; a client that does not take it within --read-timeout (it sends and never reads)
        loses the connection instead of holding its handler and the buffered replies for good."""
        self.service.counters["bytes_out_total"] += len(reply)
        writer.write(reply)
        try:
            await protocol.within(writer.drain(), self.read_timeout)
        except asyncio.TimeoutError:
            log.warning("a client did not take its reply within %g s; closing its connection", self.read_timeout)
            writer.transport.abort()
            raise ConnectionError("reply not taken") from None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(self.service.new_connection(), authenticated=self.config.auth_token is None)
        task = asyncio.current_task()
        self.handlers[task] = writer
        try:
            while True:
                try:
                    payload = await protocol.read_frame(reader, self.service.frame_limit(),
                                                        self.idle_timeout, self.read_timeout)
                    if payload is None:
                        break
                    header, tensors = protocol.decode_payload(payload)
                except protocol.ProtocolError as exc:
                    log.warning("connection %d: %s; closing it", conn.id, exc)
                    rid = _request_id({"id": exc.request_id})
                    await self._send(writer, protocol.encode({"ok": False, "id": rid, "code": "protocol_error",
                                                              "error": str(exc)}))
                    break
                self.service.counters["bytes_in_total"] += len(payload) + protocol.PREFIX_BYTES
                if self.service.draining:  # every new request, whatever its op; then the connection goes
                    await self._send(writer, protocol.encode({"ok": False, "id": _request_id(header),
                                                              "code": "shutting_down", "error": SHUTTING_DOWN}))
                    break
                if not self._authenticate(conn, header):
                    await self._send(writer, protocol.encode({
                        "ok": False, "id": _request_id(header), "code": "unauthorized",
                        "error": "token: this server requires its bearer token (send hello with token first)"}))
                    break
                reply = await self._serve(conn, header, tensors, reader, writer)
                if reply is None:  # the client left: its request was cancelled
                    break
                await self._send(writer, reply)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:  # shutdown after the grace: the connection's request was answered
            pass
        except Exception as exc:  # a frame the decoder should have refused: logged as the bug it is, still answered
            log.exception("connection %d: frame not served", conn.id)
            with contextlib.suppress(Exception):
                await self._send(writer, protocol.encode({
                    "ok": False, "id": None, "code": "protocol_error",
                    "error": f"frame: not decodable ({type(exc).__name__}); check it against docs/protocol.md"}))
        finally:
            self.handlers.pop(task, None)
            await self.service.connection_lost(conn.id)
            writer.close()

    async def close_all(self, wait_s: float = LET_GO_S) -> None:
        """After the grace: cancel every connection's handler (a request still running is answered
        shutting_down first), then abort the transports of any that did not end within ``wait_s``."""
        handlers = dict(self.handlers)
        for task in handlers:
            task.cancel()
        _, left = await asyncio.wait(handlers, timeout=wait_s) if handlers else (set(), set())
        for task in left:
            handlers[task].transport.abort()
        if left:
            await asyncio.wait(left, timeout=wait_s)

    def _authenticate(self, conn: Connection, header: dict) -> bool:
        if not conn.authenticated and same_secret(header.get("token"), self.config.auth_token):
            conn.authenticated = True
        return conn.authenticated

    async def _serve(self, conn: Connection, header: dict, tensors: dict, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> Optional[bytes]:
        """The reply; None when the client disconnected first (the request is cancelled, its slot freed)."""
        work = asyncio.ensure_future(self.dispatch(conn.id, header, tensors))
        self.inflight[work] = (reader, writer)
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.ensure_future(self._watch_departures())
        try:
            return await work
        except asyncio.CancelledError:
            if work in self.left:  # the watcher cancelled it (a server stop then closes the connection too)
                log.info("connection %d: client left; request %s cancelled", conn.id, header.get("op"))
                return None
            # the server stops: answer before the connection goes
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await work
            with contextlib.suppress(Exception):
                await self._send(writer, protocol.encode({"ok": False, "id": _request_id(header),
                                                          "code": "shutting_down",
                                                          "error": "the server stopped before this request finished"}))
            raise
        finally:
            self.inflight.pop(work, None)
            self.left.discard(work)

    async def _watch_departures(self) -> None:
        """One poller for every request in flight (not a wake-up per request: at 512 agents those took the
        interpreter from the engine thread): a request whose client left is cancelled."""
        while self.inflight:
            await asyncio.sleep(DISCONNECT_POLL_S)
            for work, (reader, writer) in list(self.inflight.items()):
                if not work.done() and (reader.at_eof() or writer.is_closing()):
                    self.left.add(work)
                    work.cancel()

    async def dispatch(self, conn: int, header: dict, tensors: dict) -> bytes:
        rid, op = _request_id(header), header.get("op")
        handler = getattr(self, f"op_{op}", None) if isinstance(op, str) and op.isidentifier() else None
        try:
            if header.get("id") is not None and rid is None:
                raise RequestError("bad_request", f"id: expected a string or an integer, got {header['id']!r}"[:200])
            if handler is None:
                raise RequestError("bad_request", f"op: unknown operation {op!r}"[:200])
            body, out = await handler(conn, header, tensors)
            return protocol.encode(dict(body, ok=True, id=rid), out)
        except RequestError as exc:
            return protocol.encode({"ok": False, "id": rid, "code": exc.code, "error": str(exc)})
        except Exception as exc:  # a bug must not take the server down
            log.exception("op %s failed", op)
            return protocol.encode({"ok": False, "id": rid, "code": "internal", "error": f"{type(exc).__name__}: {exc}"})

    async def op_hello(self, conn, h, t):
        return {"version": protocol.VERSION, "models": list(self.service.models),
                "max_frame": self.service.frame_limit()}, None

    async def op_load_model(self, conn, h, t):
        entry = await self.service.load(h.get("model_id"), h.get("weights"), h.get("dtype"))
        return {"model_id": entry.loaded.model_id, "weights": entry.loaded.weights,
                "weight_bytes": entry.loaded.weight_bytes}, None

    async def op_open_session(self, conn, h, t):
        sid, key = await self.service.open_session(conn, h.get("model_id"), _field(h, "mode", str, "full_djinn"),
                                                   h.get("weights"))
        return {"session_id": sid, "session_key": key}, None

    async def op_close_session(self, conn, h, t):
        return {"closed": await self.service.close_session(conn, h.get("session_id"), h.get("session_key"))}, None

    async def op_park(self, conn, h, t):
        return {"parked": await self.service.park_session(conn, h.get("session_id"), h.get("session_key"))}, None

    async def op_stats(self, conn, h, t):
        return {"metrics": self.service.metrics()}, None

    async def op_generate(self, conn, h, t):
        tokens = _tokens(h, t)
        max_new = _field(h, "max_new_tokens", int, default=1)
        self.service.admit()
        try:
            res = await self.service.generate(conn, h.get("session_id"), h.get("session_key"), tokens, max_new)
        finally:
            self.service.active -= 1
        body = {"kv_processed_len": res.kv_processed_len, "server_ms": res.total_ms, "queue_ms": res.queue_ms}
        return body, {"tokens": torch.tensor(res.tokens, dtype=torch.int64)}

    async def op_forward(self, conn, h, t):
        """partially_aware (history in, logits out) or semantic_blind (KV + tokens in, logits + KV out)."""
        tokens = _tokens(h, t)
        return_kv = _field(h, "return_kv", bool, default=False)
        if ("k" in t) != ("v" in t):
            raise RequestError("bad_request", "k, v: send both past tensors or neither")
        past = (t["k"], t["v"]) if "k" in t else None
        if past is not None and any(x.dtype not in (torch.float16, torch.bfloat16, torch.float32) for x in past):
            raise RequestError("bad_request", "k, v: expected floating-point tensors")
        self.service.admit()
        try:
            res = await self.service.forward(h.get("model_id"), tokens, past, bool(return_kv))
        finally:
            self.service.active -= 1
        out = {"logits": res.logits}
        if res.kv is not None:
            out.update(k=res.kv[0], v=res.kv[1])
        return {"server_ms": res.total_ms}, out


def control_app(service: DjinnService, config: ServerConfig, read_timeout: float) -> web.Application:
    """HTTP control plane: health (open), metrics, models and sessions (bearer token when one is set)."""

    def bearer(request: web.Request) -> Optional[str]:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        return token.strip() if scheme.lower() == "bearer" else None

    @web.middleware
    async def auth(request: web.Request, handler):
        if request.path != "/healthz" and config.auth_token is not None \
                and not (same_secret(bearer(request), config.auth_token)
                         or same_secret(bearer(request), config.admin_token)):
            return web.json_response({"error": "Authorization: send 'Bearer <the server's token>'",
                                      "code": "unauthorized"}, status=401, headers={"WWW-Authenticate": "Bearer"})
        if service.draining and request.method != "GET":  # reads go on: /healthz says stopping
            return web.json_response({"error": SHUTTING_DOWN, "code": "shutting_down"}, status=503)
        return await handler(request)

    @web.middleware
    async def json_errors(request: web.Request, handler):
        """aiohttp's own refusals (unknown path, wrong method, stalled body) as {"error", "code"} too."""
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400 or exc.content_type == "application/json":
                raise
            what = {404: f"path: no {request.path[:100]!r} here; see docs/protocol.md",
                    405: f"method: {request.method} is not served on {request.path[:100]!r}"}
            error = what.get(exc.status) or " ".join((exc.text or exc.reason).split())
            return web.json_response({"error": error, "code": "not_found" if exc.status == 404 else "bad_request"},
                                     status=exc.status, headers={k: v for k, v in exc.headers.items()
                                                                 if k.lower() == "allow"})

    async def healthz(_):
        # ready once a model serves: a client loading another one must not take the pod out of its Service
        ready = bool(service.models) and not service.draining
        status = "ok" if ready else "stopping" if service.draining else "loading"
        return web.json_response({"status": status, "models": list(service.models)}, status=200 if ready else 503)

    async def metrics(_):
        lines = []
        for key, value in service.metrics().items():
            if isinstance(value, dict):
                lines += [f'djinn_engine_{k}{{model="{key}"}} {v}' for k, v in value.items()]
            else:
                lines.append(f"djinn_{key} {value}")
        return web.Response(text="\n".join(lines) + "\n")

    async def call(fn, *args) -> web.Response:
        try:
            return web.json_response(await fn(*args))
        except RequestError as exc:
            status = {"not_found": 404, "concurrency_limit": 429, "forbidden": 403, "unauthorized": 401,
                      "out_of_memory": 507, "shutting_down": 503}.get(exc.code, 400)
            return web.json_response({"error": str(exc), "code": exc.code}, status=status)

    async def body(request) -> dict:
        """The JSON object body; 413 beyond CONTROL_MAX_BODY (aiohttp's client_max_size; at once when the
        Content-Length says so, rather than after waiting for bytes that may never come), 408 if it stalls."""
        too_large = web.HTTPRequestEntityTooLarge(
            max_size=CONTROL_MAX_BODY, actual_size=request.content_length or CONTROL_MAX_BODY + 1,
            content_type="application/json", text=f'{{"error": "body: larger than {CONTROL_MAX_BODY} bytes; send '
                                                   f'less", "code": "bad_request"}}')
        if (request.content_length or 0) > CONTROL_MAX_BODY:
            raise too_large
        try:
            raw = await asyncio.wait_for(request.read(), read_timeout)
        except web.HTTPRequestEntityTooLarge:  # a chunked body past the limit
            raise too_large from None
        except asyncio.TimeoutError:
            raise web.HTTPRequestTimeout(text=f"body: not received within {read_timeout:g} s") from None
        try:
            data = protocol.parse_header(raw) if raw else {}
        except protocol.ProtocolError as exc:
            raise RequestError("bad_request", "body" + str(exc).removeprefix("header")) from None
        return data

    def admin(request) -> bool:
        return config.admin_token is not None and same_secret(bearer(request), config.admin_token)

    async def load_model(request):
        async def run():
            d = await body(request)
            entry = await service.load(d.get("modelId"), d.get("weights"), d.get("dtype"))
            return {"modelId": entry.loaded.model_id, "weights": entry.loaded.weights}
        return await call(run)

    async def models(_):
        return web.json_response({"models": [{"modelId": k, "weights": m.loaded.weights, "weightBytes": m.loaded.weight_bytes}
                                             for k, m in service.models.items()]})

    async def open_session(request):
        async def run():
            d = await body(request)
            sid, key = await service.open_session(None, d.get("modelId"), _field(d, "mode", str, "full_djinn"))
            return {"sessionId": sid, "sessionKey": key}
        return await call(run)

    async def close_session(request):
        async def run():
            sid = request.match_info["sid"]
            return {"closed": await service.close_session(None, sid, request.headers.get("X-Session-Key"),
                                                          admin=admin(request))}
        return await call(run)

    async def sessions(request):
        if not admin(request):
            return web.json_response({"error": "listing sessions needs the admin token (--admin-token): "
                                               "Authorization: Bearer <admin token>", "code": "forbidden"}, status=403)
        return web.json_response({"sessions": [{"sessionId": k, "modelId": v.model_id, "mode": v.mode}
                                               for k, v in service.sessions.items()]})

    app = web.Application(middlewares=[json_errors, auth], client_max_size=CONTROL_MAX_BODY)
    app.add_routes([web.get("/healthz", healthz), web.get("/metrics", metrics), web.get("/v1/models", models),
                    web.post("/v1/models", load_model), web.get("/v1/sessions", sessions),
                    web.post("/v1/sessions", open_session), web.delete("/v1/sessions/{sid}", close_session)])
    return app


async def serve(config: ServerConfig, ready: Optional[asyncio.Event] = None,
                stop: Optional[asyncio.Event] = None) -> None:
    """Run both planes until ``stop`` is set or SIGTERM / SIGINT arrives, then stop gracefully
    (config.model_id, if any, is loaded first)."""
    host, port, control_port = config.host, config.port, config.control_port
    grace_s, read_timeout, idle_timeout = config.shutdown_grace_s, config.read_timeout_s, config.idle_timeout_s
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread
            loop.add_signal_handler(sig, stop.set)
    service = DjinnService(config)
    plane = DataPlane(service, config, read_timeout, idle_timeout)
    data = await asyncio.start_server(plane.handle, host, port)
    runner = None
    if control_port is not None:
        # shutdown_timeout: a request still in a handler (a body that stalls, a load) must not hold the exit for 60 s;
        # keepalive_timeout: a connection idle or stalled inside its headers (aiohttp has no header deadline) goes
        # after --read-timeout, not aiohttp's hour
        runner = web.AppRunner(control_app(service, config, read_timeout), access_log=None, shutdown_timeout=LET_GO_S,
                               keepalive_timeout=read_timeout)
        await runner.setup()
        await web.TCPSite(runner, host, control_port).start()
    log.info("Djinn server: data plane %s:%d, control plane %s, auth %s", host, port,
             f"{host}:{control_port}" if control_port is not None else "off",
             "on" if config.auth_token else "off (loopback or --insecure)")

    async def reaper():
        while True:
            await asyncio.sleep(max(0.05, min(5.0, config.orphan_ttl_s / 2, config.session_ttl_s / 2)))
            await service.expire_sessions()

    reap = asyncio.create_task(reaper())
    try:
        if config.model_id:
            await service.load(config.model_id, config.weights, config.dtype, wire=False)
        if ready is not None:
            ready.set()
        await stop.wait()
        log.info("stopping: no new connections or requests; %d in flight get %.0f s", service.active, grace_s)
        service.draining = True
        data.close()
        deadline = loop.time() + grace_s
        while service.active and loop.time() < deadline:
            await asyncio.sleep(0.05)
        await plane.close_all()
    finally:
        reap.cancel()
        data.close()
        if runner is not None:
            await runner.cleanup()
        service.shutdown()
        log.info("stopped")
