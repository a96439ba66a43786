"""What the Djinn server does, independent of the wire: models, sessions, admission.

Both planes call into :class:`DjinnService` from the asyncio loop; compute runs on
each model's engine thread. One copy of each model's weights is shared by every
session of that model (Text Segment); each session's KV lives in the engine's
cache blocks or, when parked, in host memory (Data Segment).
"""
from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from djinn.engine.engine import MODES, Engine, EngineError, KVCacheFull, SessionGone, StepFailed
from djinn.engine.kv_cache import available_host_bytes
from djinn.models.loader import (LoadedModel, ModelLoadError, estimate_weight_bytes, load_model, resolve_device,
                                 shipped_model_ids)
from djinn.server.config import ServerConfig
from djinn.server.limits import MIN_FRAME, kv_frame_bytes

log = logging.getLogger("djinn.server")
GiB = 1 << 30
SHUTTING_DOWN = "the server is shutting down; retry on another server or later"


class RequestError(Exception):
    """A request the server refuses; ``code`` travels to the client, the server keeps serving."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def _refusal(exc: EngineError) -> RequestError:
    """What the client is told of an engine error: its code says whose fault it is."""
    code = ("out_of_memory" if isinstance(exc, KVCacheFull) else "not_found" if isinstance(exc, SessionGone)
            else "internal" if isinstance(exc, StepFailed) else "bad_request")
    return RequestError(code, str(exc))


def kv_budget_bytes(max_vram_gb: float, weight_bytes: int, device: torch.device, used_bytes: int = 0,
                    weights_resident: bool = False) -> int:
    """Device bytes left for a model's KV cache: --max-vram-gb (and 92% of a GPU, or on the CPU the host's
    free memory) less what is loaded, the weights, and a reserve for activations and allocator slack. The
    one budget every place that builds an engine uses (the server, bench-engine). ``weights_resident``: the
    weights are loaded already (so, on the CPU, no longer in the free memory)."""
    cap, limit, fix = max_vram_gb * GiB, f"--max-vram-gb {max_vram_gb}", "raise it"
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory * 0.92
        if total < cap:
            cap, limit, fix = total, f"{device} ({total / GiB:.1f} GiB usable)", "load a smaller model or dtype"
    else:  # the host's memory is the device's: a model past it would get the whole server OOM-killed
        free = available_host_bytes() + used_bytes + (weight_bytes if weights_resident else 0)  # held: not free
        if free < cap:
            cap, limit, fix = free, f"the host's free memory ({free / GiB:.1f} GiB)", "load a smaller model or dtype"
    reserve = min(4 * GiB, 0.05 * cap) + weight_bytes * 0.1
    budget = int(cap - used_bytes - weight_bytes - reserve)
    if budget <= 0:
        raise RequestError("out_of_memory", f"{limit} leaves no room for the KV cache after "
                                            f"{weight_bytes / GiB:.2f} GiB of weights; {fix}")
    return budget


def build_engine(config: ServerConfig, loaded: LoadedModel, used_bytes: int = 0) -> Engine:
    """The engine ``config`` asks for over ``loaded``: the one place (the server, bench-engine) that sizes a
    KV cache; ``used_bytes`` is what other models on the device already hold."""
    budget = kv_budget_bytes(config.max_vram_gb, loaded.weight_bytes, loaded.device, used_bytes, weights_resident=True)
    return Engine(loaded.model, max_seq=config.max_seq_len, kv_budget_bytes=budget, max_slots=config.max_slots,
                  prefill_chunk=config.prefill_chunk, max_step_ms=config.max_step_ms, block_size=config.kv_block_size,
                  host_blocks=None, host_bytes=None if config.host_kv_gb is None else int(config.host_kv_gb * GiB))


def allowed_models(config: ServerConfig) -> set[str]:
    """What clients may load: the server's --model-id, the shipped configs, each --allow-model."""
    return {*shipped_model_ids(), *config.allow_models, *([config.model_id] if config.model_id else [])}


def same_secret(given: Any, expected: Optional[str]) -> bool:
    """surrogatepass: JSON may carry a lone surrogate ("\\ud800"), which plain UTF-8 cannot encode."""
    return isinstance(given, str) and expected is not None and hmac.compare_digest(
        given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass"))


@dataclass
class SessionInfo:
    model_id: str
    mode: str
    owner: Optional[int]
    key: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    last_active: float = field(default_factory=time.monotonic)
    orphaned_at: Optional[float] = None
    in_flight: int = 0  # requests on it now: a session at work is not idle, however long its request takes


@dataclass
class ModelEntry:
    loaded: LoadedModel
    engine: Engine


class DjinnService:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.models: dict[str, ModelEntry] = {}
        self.sessions: dict[str, SessionInfo] = {}
        self.active = 0
        self._opening = 0  # open_session calls between their --max-sessions check and their session
        self.counters = {"requests_total": 0, "requests_refused_total": 0, "bytes_in_total": 0,
                         "bytes_out_total": 0, "sessions_opened_total": 0, "sessions_expired_total": 0}
        self._conn_ids = itertools.count(1)
        self._load_lock = asyncio.Lock()
        self.draining = False  # shutting down: no new request is taken
        self.default_model: Optional[str] = None

    # -- models ------------------------------------------------------------------
    def frame_limit(self) -> int:
        """--max-frame-mb, else the largest legitimate frame of the loaded models at --max-seq-len."""
        if self.config.max_frame is not None:
            return self.config.max_frame
        sizes = [kv_frame_bytes(m.engine.net.shape.n_layers, m.engine.net.shape.n_kv_heads, m.engine.net.shape.head_dim,
                                m.engine.net.shape.vocab_size, m.engine.max_seq, m.engine.dtype.itemsize)
                 for m in self.models.values()]
        return max([MIN_FRAME, *sizes])

    def _used_bytes(self) -> int:
        return sum(m.loaded.weight_bytes + m.engine.cache.nbytes for m in self.models.values())

    async def load(self, model_id: Any, weights: Any = None, dtype: Any = None, wire: bool = True) -> ModelEntry:
        """Load ``model_id`` once; later calls (any session, any client) share it. From the wire only an
        allowed id loads, and only if its weights and a KV cache fit --max-vram-gb (checked before allocating)."""
        if not isinstance(model_id, str) or not model_id:
            raise RequestError("bad_request", f"model_id: expected a model id string such as sshleifer/tiny-gpt2, "
                                              f"got {model_id!r}"[:200])
        for name, value, choices in (("weights", weights, ("auto", "pretrained", "synthetic")),
                                     ("dtype", dtype, ("auto", "float32", "float16", "bfloat16"))):
            if value is not None and value not in choices:
                raise RequestError("bad_request", f"{name}: expected one of {', '.join(choices)}, got {value!r}"[:200])
        if model_id in self.models:
            return self._as_loaded(self.models[model_id], weights, dtype)
        if wire and model_id not in allowed_models(self.config):
            raise RequestError("forbidden", f"model_id: {model_id!r} is not loadable on this server; allowed: "
                                            f"{', '.join(sorted(allowed_models(self.config)))} (operators add ids "
                                            "with --allow-model)"[:400])
        async with self._load_lock:
            if model_id in self.models:
                return self.models[model_id]
            try:
                if wire:
                    need = await asyncio.to_thread(estimate_weight_bytes, model_id, weights or self.config.weights,
                                                   dtype or self.config.dtype, self.config.device)
                    kv_budget_bytes(self.config.max_vram_gb, need, resolve_device(self.config.device), self._used_bytes())
                loaded = await asyncio.to_thread(load_model, model_id, weights or self.config.weights,
                                                 dtype or self.config.dtype, self.config.device, self.config.seed)
                engine = build_engine(self.config, loaded, self._used_bytes())
            except (ModelLoadError, OSError, ValueError) as exc:
                raise RequestError("bad_request", f"model_id: {model_id!r} cannot be loaded: "
                                                  f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                                   if not isinstance(exc, ModelLoadError) else str(exc)) from None
            self.models[model_id] = ModelEntry(loaded, engine)
            self.default_model = self.default_model or model_id
            log.info("loaded %s (%s weights, %.1f MiB, %s %s): KV cache of %d blocks of %d tokens (%.2f GiB), "
                     "sessions up to %d tokens", model_id, loaded.weights, loaded.weight_bytes / 2**20, loaded.device,
                     str(loaded.dtype).removeprefix("torch."), engine.cache.n_blocks, engine.cache.block_size,
                     engine.cache.nbytes / GiB, engine.max_seq)
            return self.models[model_id]

    @staticmethod
    def _as_loaded(entry: ModelEntry, weights: Any, dtype: Any) -> ModelEntry:
        """A model loads once: asking for it with other weights or another dtype is refused, not ignored."""
        loaded = entry.loaded
        have_dtype = str(loaded.dtype).removeprefix("torch.")
        for name, want, have in (("weights", weights, loaded.weights), ("dtype", dtype, have_dtype)):
            if want not in (None, "auto", have):
                raise RequestError("bad_request", f"{name}: {loaded.model_id} is loaded with {name} {have}, not {want}; "
                                                  f"ask for {have} or auto (one copy of a model serves every session)")
        return entry

    def _model(self, model_id: Any) -> ModelEntry:
        """The named model, or the server's default (its --model-id, else the first loaded)."""
        if model_id is None:
            if self.default_model is None:
                raise RequestError("not_found", "model_id: the server holds no model yet; send load_model first")
            return self.models[self.default_model]
        if not isinstance(model_id, str):
            raise RequestError("bad_request", f"model_id: expected a string, got {type(model_id).__name__}")
        entry = self.models.get(model_id)
        if entry is None:
            raise RequestError("not_found", f"model_id: {model_id} is not loaded; send load_model first")
        return entry

    # -- connections and sessions ------------------------------------------------------
    def new_connection(self) -> int:
        return next(self._conn_ids)

    async def connection_lost(self, conn: int) -> None:
        """Park the sessions of a dropped client (frees the device); they expire after orphan_ttl."""
        for sid, info in list(self.sessions.items()):
            if info.owner == conn:
                info.owner, info.orphaned_at = None, time.monotonic()
                entry = self.models.get(info.model_id)
                if entry is not None:
                    await asyncio.wrap_future(entry.engine.park_session(sid))

    async def open_session(self, conn: Optional[int], model_id: Any, mode: Any,
                           weights: Any = None) -> tuple[str, str]:
        """(session id, session key): the key proves ownership in every later request on the session."""
        if mode not in MODES:
            raise RequestError("bad_request", f"mode: {mode!r} is not one of {', '.join(MODES)}"[:200])
        if len(self.sessions) + self._opening >= self.config.max_sessions:  # a client that never closes must not
            self.counters["requests_refused_total"] += 1                      # exhaust memory
            raise RequestError("concurrency_limit", f"open_session: the server holds {len(self.sessions)} sessions, its "
                                                    f"--max-sessions {self.config.max_sessions}; close sessions you no "
                                                    f"longer use (idle ones expire after --session-ttl "
                                                    f"{self.config.session_ttl_s:g} s)")
        self._opening += 1  # the slot is taken before the awaits below, so concurrent opens count each other
        try:
            entry = (await self.load(model_id, weights) if model_id is not None
                     else self._as_loaded(self._model(None), weights, None))
            opening = entry.engine.open_session(mode)
            try:
                s = await asyncio.shield(asyncio.wrap_future(opening))
            except asyncio.CancelledError:  # its client left: the session still opens, so close it then
                opening.add_done_callback(lambda f: f.cancelled() or f.exception() or
                                          entry.engine.close_session(f.result().id))
                raise
        finally:
            self._opening -= 1
        info = self.sessions[s.id] = SessionInfo(entry.loaded.model_id, mode, conn)
        self.counters["sessions_opened_total"] += 1
        return s.id, info.key

    def _session(self, conn: Optional[int], sid: Any, key: Any, admin: bool = False) -> tuple[SessionInfo, ModelEntry]:
        """The session if ``key`` is its key (or the caller is the admin); anyone else learns nothing: not_found."""
        info = self.sessions.get(sid) if isinstance(sid, str) else None
        if info is None or not (admin or same_secret(key, info.key)):
            raise RequestError("not_found", f"session_id: {sid!r} not found (closed, expired, or not yours: send "
                                            "its session_key); open a new session"[:300])
        info.last_active = time.monotonic()
        if conn is not None:  # the owner, from this connection now (a reconnect)
            info.owner, info.orphaned_at = conn, None
        return info, self.models[info.model_id]

    async def close_session(self, conn: Optional[int], sid: Any, key: Any, admin: bool = False) -> bool:
        info, entry = self._session(conn, sid, key, admin)
        del self.sessions[sid]
        return await asyncio.wrap_future(entry.engine.close_session(sid))

    async def park_session(self, conn: Optional[int], sid: Any, key: Any) -> bool:
        _, entry = self._session(conn, sid, key)
        return await asyncio.wrap_future(entry.engine.park_session(sid))

    async def expire_sessions(self) -> int:
        now, n = time.monotonic(), 0
        for sid, info in list(self.sessions.items()):
            if info.in_flight:
                continue
            idle = now - info.last_active
            if idle > self.config.session_ttl_s or (info.orphaned_at and now - info.orphaned_at > self.config.orphan_ttl_s):
                self.sessions.pop(sid, None)
                await asyncio.wrap_future(self.models[info.model_id].engine.close_session(sid))
                self.counters["sessions_expired_total"] += 1
                log.info("expired session %s (idle %.0f s)", sid, idle)
                n += 1
        return n

    # -- compute -------------------------------------------------------------------------
    @staticmethod
    def _check_tokens(entry: ModelEntry, tokens: list[int]) -> None:
        """Refuse ids outside the vocabulary here: on a GPU they would trip a device assert."""
        vocab = entry.loaded.model.config.vocab_size
        bad = next((t for t in tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError("bad_request", f"tokens: id {bad} is outside the model's vocabulary (0..{vocab - 1})")

    def admit(self) -> None:
        if self.draining:
            raise RequestError("shutting_down", SHUTTING_DOWN)
        if self.active >= self.config.max_concurrent:
            self.counters["requests_refused_total"] += 1
            raise RequestError("concurrency_limit", f"Concurrency limit exceeded: {self.active} active requests "
                                                    f">= {self.config.max_concurrent} limit")
        self.active += 1
        self.counters["requests_total"] += 1

    async def generate(self, conn: Optional[int], sid: Any, key: Any, tokens: list[int], max_new_tokens: int):
        info, entry = self._session(conn, sid, key)
        if info.mode != "full_djinn":
            raise RequestError("bad_request", f"session {sid} is {info.mode}: use forward, or open a full_djinn session")
        if max_new_tokens < 0:
            raise RequestError("bad_request", "max_new_tokens: must be >= 0")
        self._check_tokens(entry, tokens)
        info.in_flight += 1
        try:
            return await asyncio.wrap_future(entry.engine.generate(sid, tokens, max_new_tokens))
        except EngineError as exc:
            raise _refusal(exc) from None
        finally:
            info.in_flight -= 1
            info.last_active = time.monotonic()  # idle from the end of its last request, not the start

    async def forward(self, model_id: Optional[str], tokens: list[int], past_kv=None, return_kv: bool = False):
        entry = self._model(model_id)
        self._check_tokens(entry, tokens)
        if past_kv is not None:
            shape = entry.engine.net.shape
            want = (shape.n_layers, shape.n_kv_heads, shape.head_dim)
            for name, t in zip("kv", past_kv):
                if t.dim() != 4 or (t.shape[0], t.shape[1], t.shape[3]) != want or t.shape != past_kv[0].shape:
                    raise RequestError("bad_request", f"{name}: expected a cache of shape [{want[0]}, {want[1]}, "
                                                      f"length, {want[2]}], got {list(t.shape)}")
        try:
            if past_kv is not None:
                past_kv = tuple(t.to(entry.loaded.dtype) for t in past_kv)
            return await asyncio.wrap_future(entry.engine.forward(tokens, past_kv, return_kv))
        except EngineError as exc:
            raise _refusal(exc) from None

    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.counters, active_requests=self.active,
                                   max_concurrent=self.config.max_concurrent, sessions=len(self.sessions))
        for mid, m in self.models.items():
            out[mid] = m.engine.snapshot()
        if torch.cuda.is_available():
            out["cuda_memory_allocated_bytes"] = torch.cuda.memory_allocated()
            out["cuda_memory_reserved_bytes"] = torch.cuda.memory_reserved()
        return out

    def shutdown(self) -> None:
        for m in self.models.values():
            m.engine.shutdown()
