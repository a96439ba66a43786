"""The Djinn server's two listeners: the framed data plane and the HTTP control plane."""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Optional

import torch
from aiohttp import web

from djinn.server import protocol
from djinn.server.service import DjinnService, RequestError, ServerConfig

log = logging.getLogger("djinn.server")


def _tokens(header: dict, tensors: dict, key: str = "tokens") -> list[int]:
    if key in tensors:
        if tensors[key].dtype not in (torch.int64, torch.int32):
            raise RequestError("bad_request", f"{key}: expected an int64 tensor of token ids, got {tensors[key].dtype}")
        return tensors[key].reshape(-1).tolist()
    value = header.get(key, [])
    if not isinstance(value, list) or not all(isinstance(t, int) and t >= 0 for t in value):
        raise RequestError("bad_request", f"{key}: expected a list of non-negative token ids")
    return value


class DataPlane:
    """One coroutine per client connection; requests on a connection are served in order."""

    def __init__(self, service: DjinnService, max_frame: int):
        self.service, self.max_frame = service, max_frame

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = self.service.new_connection()
        try:
            while True:
                try:
                    payload = await protocol.read_frame(reader, self.max_frame)
                    if payload is None:
                        break
                    header, tensors = protocol.decode_payload(payload)
                except protocol.ProtocolError as exc:
                    log.warning("connection %d: %s; closing it", conn, exc)
                    writer.write(protocol.encode({"ok": False, "code": "protocol_error", "error": str(exc)}))
                    await writer.drain()
                    break
                self.service.counters["bytes_in_total"] += len(payload) + 9
                reply = await self.dispatch(conn, header, tensors)
                self.service.counters["bytes_out_total"] += len(reply)
                writer.write(reply)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            await self.service.connection_lost(conn)
            writer.close()

    async def dispatch(self, conn: int, header: dict, tensors: dict) -> bytes:
        rid = header.get("id")
        op = header.get("op")
        handler = getattr(self, f"op_{op}", None) if isinstance(op, str) else None
        try:
            if handler is None:
                raise RequestError("bad_request", f"op: unknown operation {op!r}")
            body, out = await handler(conn, header, tensors)
            return protocol.encode(dict(body, ok=True, id=rid), out)
        except RequestError as exc:
            return protocol.encode({"ok": False, "id": rid, "code": exc.code, "error": str(exc)})
        except Exception as exc:  # a bug must not take the server down
            log.exception("op %s failed", op)
            return protocol.encode({"ok": False, "id": rid, "code": "internal", "error": f"{type(exc).__name__}: {exc}"})

    async def op_hello(self, conn, h, t):
        return {"version": protocol.VERSION, "models": list(self.service.models), "max_frame": self.max_frame}, None

    async def op_load_model(self, conn, h, t):
        entry = await self.service.load(str(h.get("model_id")), h.get("weights"), h.get("dtype"))
        return {"model_id": entry.loaded.model_id, "weights": entry.loaded.weights,
                "weight_bytes": entry.loaded.weight_bytes}, None

    async def op_open_session(self, conn, h, t):
        sid = await self.service.open_session(conn, h.get("model_id"), h.get("mode", "full_djinn"), h.get("weights"))
        return {"session_id": sid}, None

    async def op_close_session(self, conn, h, t):
        return {"closed": await self.service.close_session(conn, str(h.get("session_id")))}, None

    async def op_park(self, conn, h, t):
        return {"parked": await self.service.park_session(conn, str(h.get("session_id")))}, None

    async def op_stats(self, conn, h, t):
        return {"metrics": self.service.metrics()}, None

    async def op_generate(self, conn, h, t):
        tokens = _tokens(h, t)
        max_new = h.get("max_new_tokens", 1)
        if not isinstance(max_new, int) or isinstance(max_new, bool):
            raise RequestError("bad_request", f"max_new_tokens: expected an integer, got {max_new!r}")
        self.service.admit()
        try:
            res = await self.service.generate(conn, str(h.get("session_id")), tokens, max_new)
        finally:
            self.service.active -= 1
        body = {"kv_processed_len": res.kv_processed_len, "server_ms": res.total_ms, "queue_ms": res.queue_ms}
        return body, {"tokens": torch.tensor(res.tokens, dtype=torch.int64)}

    async def op_forward(self, conn, h, t):
        """partially_aware (history in, logits out) or semantic_blind (KV + tokens in, logits + KV out)."""
        tokens = _tokens(h, t)
        past = (t["k"], t["v"]) if "k" in t and "v" in t else None
        self.service.admit()
        try:
            res = await self.service.forward(h.get("model_id"), tokens, past, bool(h.get("return_kv")))
        finally:
            self.service.active -= 1
        out = {"logits": res.logits}
        if res.kv is not None:
            out.update(k=res.kv[0], v=res.kv[1])
        return {"server_ms": res.total_ms}, out


def control_app(service: DjinnService) -> web.Application:
    """HTTP control plane: health, metrics, models and sessions."""

    async def healthz(_):
        ready = not service.loading and bool(service.models)
        return web.json_response({"status": "ok" if ready else "loading", "models": list(service.models)},
                                 status=200 if ready else 503)

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
            status = {"not_found": 404, "concurrency_limit": 429}.get(exc.code, 400)
            return web.json_response({"error": str(exc), "code": exc.code}, status=status)

    async def body(request) -> dict:
        try:
            data = await request.json()
        except Exception:
            raise RequestError("bad_request", "body: expected a JSON object") from None
        if not isinstance(data, dict):
            raise RequestError("bad_request", "body: expected a JSON object")
        return data

    async def load_model(request):
        async def run():
            d = await body(request)
            entry = await service.load(str(d.get("modelId", "")), d.get("weights"), d.get("dtype"))
            return {"modelId": entry.loaded.model_id, "weights": entry.loaded.weights}
        return await call(run)

    async def models(_):
        return web.json_response({"models": [{"modelId": k, "weights": m.loaded.weights, "weightBytes": m.loaded.weight_bytes}
                                             for k, m in service.models.items()]})

    async def open_session(request):
        async def run():
            d = await body(request)
            return {"sessionId": await service.open_session(None, d.get("modelId"), d.get("mode", "full_djinn"))}
        return await call(run)

    async def close_session(request):
        return await call(lambda: _closed(request.match_info["sid"]))

    async def _closed(sid):
        return {"closed": await service.close_session(None, sid)}

    async def sessions(_):
        return web.json_response({"sessions": [{"sessionId": k, "modelId": v.model_id, "mode": v.mode}
                                               for k, v in service.sessions.items()]})

    app = web.Application()
    app.add_routes([web.get("/healthz", healthz), web.get("/metrics", metrics), web.get("/v1/models", models),
                    web.post("/v1/models", load_model), web.get("/v1/sessions", sessions),
                    web.post("/v1/sessions", open_session), web.delete("/v1/sessions/{sid}", close_session)])
    return app


async def serve(config: ServerConfig, host: str, port: int, control_port: Optional[int],
                max_frame: int, preload: Optional[dict[str, Any]] = None,
                ready: Optional[asyncio.Event] = None, stop: Optional[asyncio.Event] = None) -> None:
    """Run both planes until ``stop`` is set (or forever)."""
    service = DjinnService(config)
    data = await asyncio.start_server(DataPlane(service, max_frame).handle, host, port)
    runner = None
    if control_port is not None:
        runner = web.AppRunner(control_app(service), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, control_port).start()
    log.info("Djinn server: data plane %s:%d, control plane %s", host, port,
             f"{host}:{control_port}" if control_port is not None else "off")

    async def reaper():
        while True:
            await asyncio.sleep(min(5.0, config.orphan_ttl_s / 2, config.session_ttl_s / 2))
            await service.expire_sessions()

    reap = asyncio.create_task(reaper())
    try:
        if preload:
            await service.load(**preload)
        if ready is not None:
            ready.set()
        await (stop.wait() if stop is not None else asyncio.Event().wait())
    finally:
        reap.cancel()
        data.close()
        if runner is not None:
            await runner.cleanup()
        service.shutdown()
