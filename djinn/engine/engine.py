"""The Djinn engine: one model, many sessions, continuous batching in one thread.

Every loop iteration (1) takes new work, (2) gives waiting requests a KV slot,
restoring parked caches on a side stream, (3) runs ONE batched decode step for
all generating requests, and (4) prefills up to ``prefill_chunk`` tokens of
newly admitted requests, so long prompts never stall running decodes.
Sessions own their slot between calls; an idle session is parked to host memory
only when another request needs its slot (least recently used first).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from djinn.engine.decode_runner import DecodeRunner
from djinn.engine.kv_pool import KVPool, slot_bytes
from djinn.engine.transformer import PoolTransformer

log = logging.getLogger("djinn.engine")

MODES = ("full_djinn", "partially_aware", "semantic_blind")


class EngineError(RuntimeError):
    """A request the engine cannot serve (bad session, too long); the server replies with it."""


@dataclass
class Session:
    id: str
    mode: str = "full_djinn"
    history: list[int] = field(default_factory=list)
    kv_len: int = 0
    slot: Optional[int] = None
    host_kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    busy: bool = False
    last_used: float = field(default_factory=time.monotonic)
    temporary: bool = False

    @property
    def resident(self) -> bool:
        return self.slot is not None


@dataclass
class Request:
    session: Session
    pending: list[int]
    max_new_tokens: int
    future: Future
    past_kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    return_kv: bool = False
    out: list[int] = field(default_factory=list)
    logits: Optional[torch.Tensor] = None
    submitted: float = field(default_factory=time.perf_counter)
    admitted: Optional[float] = None
    base_len: int = 0          # the session's history before this request: restored if it fails
    start: tuple[int, int] = (0, 0)  # (history length, kv_len) once queued: where a retry starts over
    suspect: bool = False      # was in a step that failed: runs alone until it succeeds or fails alone

    @property
    def decoding(self) -> bool:
        return not self.pending and self.max_new_tokens > len(self.out) > 0


@dataclass
class Result:
    tokens: list[int]
    kv_processed_len: int
    queue_ms: float
    total_ms: float
    logits: Optional[torch.Tensor] = None
    kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None


def _settle(fut: Future, result: Any = None, exc: Optional[BaseException] = None) -> None:
    """Complete ``fut`` unless the client cancelled it meanwhile (its loop thread may do so at any time)."""
    try:
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
    except InvalidStateError:
        pass


class Engine:
    def __init__(self, model, *, max_seq: int = 512, kv_budget_bytes: Optional[int] = None,
                 max_slots: int = 256, prefill_chunk: int = 512, cuda_graphs: bool = True,
                 host_slots: Optional[int] = 0, host_bytes: Optional[int] = None):
        self.model = model
        self.net = PoolTransformer(model)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        max_seq = min(max_seq, self.net.shape.max_positions)
        per_slot = slot_bytes(self.net.shape, max_seq, self.dtype)
        n_slots = max_slots if kv_budget_bytes is None else min(max_slots, kv_budget_bytes // per_slot - 1)
        self.pool = KVPool(self.net.shape, int(n_slots), max_seq, self.dtype, self.device, host_slots, host_bytes)
        self.decoder = DecodeRunner(self.net, self.pool, cuda_graphs)
        self.prefill_chunk = prefill_chunk
        self.sessions: dict[str, Session] = {}
        self.stats = {"requests": 0, "tokens_generated": 0, "tokens_prefilled": 0, "decode_steps": 0,
                      "decode_batch_tokens": 0, "parks": 0, "restores": 0, "reused_sessions": 0,
                      "admit_ms": 0.0, "decode_ms": 0.0, "prefill_ms": 0.0}
        self._inbox: queue.Queue = queue.Queue()
        self._waiting: list[Request] = []
        self._running: list[Request] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="djinn-engine", daemon=True)
        self._thread.start()

    # -- thread-safe API -----------------------------------------------------
    def call(self, fn: Callable, *args) -> Future:
        """Run ``fn(*args)`` on the engine thread (all session/slot state lives there)."""
        fut: Future = Future()
        self._inbox.put((fn, args, fut))
        return fut

    def submit(self, req: Request) -> Future:
        self._inbox.put(self._queued(req))
        return req.future

    def open_session(self, mode: str = "full_djinn", session_id: Optional[str] = None) -> Future:
        if mode not in MODES:
            raise EngineError(f"mode: {mode!r} is not one of {', '.join(MODES)}")
        return self.call(self._open, mode, session_id)

    def close_session(self, session_id: str) -> Future:
        return self.call(self._close, session_id)

    def park_session(self, session_id: str) -> Future:
        return self.call(self._park_by_id, session_id)

    def generate(self, session_id: str, new_tokens: list[int], max_new_tokens: int) -> Future:
        """full_djinn: append ``new_tokens`` to the session and greedily generate ``max_new_tokens``."""
        fut: Future = Future()
        self._inbox.put(("generate", session_id, list(new_tokens), max_new_tokens, fut))
        return fut

    def forward(self, tokens: list[int], past_kv=None, return_kv: bool = False) -> Future:
        """Stateless step (partially_aware / semantic_blind): last-position logits, optionally the new KV."""
        start = 0 if past_kv is None else past_kv[0].shape[2]
        if start + len(tokens) > self.pool.max_seq:
            raise EngineError(f"request of {start + len(tokens)} tokens exceeds --max-seq-len {self.pool.max_seq}")
        if not tokens:
            raise EngineError("tokens: a forward step needs at least one token")
        s = Session(id=f"tmp-{uuid.uuid4().hex[:8]}", temporary=True, kv_len=start)
        s.history = [0] * start + list(tokens)
        return self.submit(Request(s, list(tokens), 0, Future(), past_kv=past_kv, return_kv=return_kv))

    def snapshot(self) -> dict:
        """Counters for /metrics (read without locking; values are ints)."""
        resident = sum(1 for s in list(self.sessions.values()) if s.resident)
        return dict(self.stats, sessions=len(self.sessions), resident_sessions=resident,
                    parked_sessions=len(self.sessions) - resident, kv_slots=self.pool.n_slots,
                    kv_slots_free=len(self.pool.free), kv_pool_bytes=self.pool.nbytes,
                    host_kv_slots=self.pool.host_slots,
                    max_seq_len=self.pool.max_seq, waiting=len(self._waiting), running=len(self._running))

    def shutdown(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        self._thread.join(timeout=10)

    # -- engine thread -----------------------------------------------------------
    def _open(self, mode: str, session_id: Optional[str]) -> Session:
        sid = session_id or uuid.uuid4().hex
        if sid in self.sessions:
            raise EngineError(f"session {sid} already exists")
        s = self.sessions[sid] = Session(id=sid, mode=mode)
        return s

    def _close(self, session_id: str) -> bool:
        s = self.sessions.pop(session_id, None)
        if s is None:
            return False
        for r in self._waiting + self._running:
            if r.session is s:
                _settle(r.future, exc=EngineError(f"session {session_id} closed"))
        self._waiting = [r for r in self._waiting if r.session is not s]
        self._running = [r for r in self._running if r.session is not s]
        self._free(s)
        return True

    def _free(self, s: Session) -> None:
        if s.slot is not None:
            self.pool.release(s.slot)
            s.slot = None
        if s.host_kv is not None and not s.temporary:
            self.pool.recycle(s.host_kv)
        s.host_kv = None

    def _park(self, s: Session) -> None:
        if s.slot is None or s.busy:
            return
        s.host_kv = self.pool.save(s.slot, s.kv_len) if s.kv_len else None
        self.pool.release(s.slot)
        s.slot = None
        self.stats["parks"] += 1
        log.debug("parked session %s (%d tokens)", s.id, s.kv_len)

    def _park_by_id(self, session_id: str) -> bool:
        s = self.sessions.get(session_id)
        if s is None:
            raise EngineError(f"session {session_id} not found")
        self._park(s)
        return not s.resident

    def _new_generate(self, session_id, new_tokens, max_new_tokens, fut) -> Optional[Request]:
        s = self.sessions.get(session_id)
        if fut.cancelled():  # its client left before the engine saw it
            return None
        if s is None:
            _settle(fut, exc=EngineError(f"session {session_id} not found; open it first"))
            return None
        if s.busy:
            _settle(fut, exc=EngineError(f"session {session_id} already has a request in flight"))
            return None
        total = len(s.history) + len(new_tokens) + max_new_tokens
        if total > self.pool.max_seq:
            _settle(fut, exc=EngineError(f"session {session_id} would hold {total} tokens > --max-seq-len "
                                         f"{self.pool.max_seq}; close it or start a new one"))
            return None
        if not s.history and not new_tokens:
            _settle(fut, exc=EngineError("tokens: a new session's first request needs at least one token"))
            return None
        if s.history:
            self.stats["reused_sessions"] += 1
            log.info("Reusing session %s (kv_processed_len=%d, new tokens=%d)", s.id, s.kv_len, len(new_tokens))
        s.busy = True
        base = len(s.history)
        s.history.extend(new_tokens)
        if s.kv_len == len(s.history) and max_new_tokens > 0:
            s.kv_len -= 1  # every token processed: recompute the last one for the logits the first new token needs
        return self._queued(Request(s, s.history[s.kv_len:], max_new_tokens, fut, base_len=base))

    @staticmethod
    def _queued(r: Request) -> Request:
        r.start = (len(r.session.history), r.session.kv_len)
        return r

    def _abort(self, r: Request, exc: Optional[BaseException]) -> None:
        """Fail (or drop, when cancelled) ``r``: its session keeps no token the client did not receive."""
        s = r.session
        s.busy = False
        del s.history[r.base_len:]
        s.kv_len = min(s.kv_len, r.base_len)
        if s.temporary:
            self._free(s)
        if exc is not None:
            _settle(r.future, exc=exc)

    def _retry(self, r: Request) -> None:
        """Back to where ``r`` was queued; the KV before that is untouched (steps write only past kv_len)."""
        s = r.session
        del s.history[r.start[0]:]
        s.kv_len = r.start[1]
        r.pending, r.out, r.logits, r.suspect = s.history[s.kv_len:], [], None, True
        if s.temporary:
            self._free(s)

    def _drain(self, block: bool) -> None:
        while True:
            try:
                item = self._inbox.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            block = False
            if item is None:
                return
            if isinstance(item, Request):
                self._waiting.append(item)
            elif item[0] == "generate":
                req = self._new_generate(*item[1:])
                if req is not None:
                    self._waiting.append(req)
            else:
                fn, args, fut = item
                try:
                    _settle(fut, fn(*args))
                except Exception as exc:  # reported to the caller, engine keeps running
                    _settle(fut, exc=exc)

    def _drop_cancelled(self) -> None:
        """A client that went away cancelled its request: stop spending steps and its slot on it."""
        for r in [r for r in self._waiting + self._running if r.future.cancelled()]:
            self._abort(r, None)
        self._waiting = [r for r in self._waiting if not r.future.cancelled()]
        self._running = [r for r in self._running if not r.future.cancelled()]

    def _admit(self) -> None:
        if any(r.suspect for r in self._running):
            return  # a suspect of a failed step runs alone
        suspect = next((r for r in self._waiting if r.suspect), None)
        if suspect is not None and self._running:
            return  # let the running requests finish first
        still = []
        for r in ([suspect] if suspect is not None else self._waiting):
            s = r.session
            if s.slot is None:
                slot = self.pool.acquire()
                if slot is None:
                    victim = min((x for x in self.sessions.values() if x.resident and not x.busy),
                                 key=lambda x: x.last_used, default=None)
                    if victim is not None:
                        self._park(victim)
                        slot = self.pool.acquire()
                if slot is None:
                    still.append(r)
                    continue
                s.slot = slot
                kv = r.past_kv if s.temporary else s.host_kv
                if kv is not None:
                    self.pool.load(slot, kv)
                    if not s.temporary:
                        self.pool.recycle(kv)
                        s.host_kv = None
                        self.stats["restores"] += 1
            r.admitted = r.admitted or time.perf_counter()
            self._running.append(r)
        self._waiting = still if suspect is None else [r for r in self._waiting if r is not suspect] + still

    def _finish(self, r: Request) -> None:
        s = r.session
        s.busy = False
        s.last_used = time.monotonic()
        res = Result(tokens=r.out, kv_processed_len=s.kv_len,
                     queue_ms=((r.admitted or r.submitted) - r.submitted) * 1e3,
                     total_ms=(time.perf_counter() - r.submitted) * 1e3)
        if s.temporary:
            res.logits = r.logits.float().cpu() if r.logits is not None else None
            if r.return_kv:
                res.kv = self.pool.save(s.slot, s.kv_len, pooled=False)
                self.pool.synchronize()
            self._free(s)
        self.stats["requests"] += 1
        _settle(r.future, res)

    def _decode_step(self) -> None:
        batch = [r for r in self._running if r.decoding]
        if not batch:
            return
        nxt = self.decoder([r.session.slot for r in batch], [r.session.history[r.session.kv_len] for r in batch],
                           [r.session.kv_len for r in batch])
        for r, t in zip(batch, nxt):
            r.session.kv_len += 1
            r.out.append(t)
            r.session.history.append(t)
        self.stats["decode_steps"] += 1
        self.stats["decode_batch_tokens"] += len(batch)
        self.stats["tokens_generated"] += len(batch)

    def _prefill_step(self) -> None:
        """Up to ``prefill_chunk`` tokens of pending prompts; chunks of one length run as one batch."""
        budget = self.prefill_chunk
        groups: dict[int, list[tuple[Request, list[int]]]] = {}
        for r in self._running:
            if budget <= 0:
                break
            if r.pending:
                chunk, r.pending = r.pending[:budget], r.pending[budget:]
                budget -= len(chunk)
                groups.setdefault(len(chunk), []).append((r, chunk))
        dev = self.device
        for length, items in groups.items():
            for r, _ in items:
                self.pool.wait_ready(r.session.slot)
            logits = self.net.prefill(self.pool.k, self.pool.v,
                                      torch.tensor([r.session.slot for r, _ in items], device=dev),
                                      torch.tensor([c for _, c in items], device=dev),
                                      torch.tensor([r.session.kv_len for r, _ in items], device=dev))
            firsts = logits.argmax(-1).tolist()
            for (r, _), row, t in zip(items, logits, firsts):
                s = r.session
                s.kv_len += length
                self.stats["tokens_prefilled"] += length
                if not r.pending:
                    r.logits = row
                    if r.max_new_tokens > 0:
                        r.out.append(t)
                        s.history.append(t)
                        self.stats["tokens_generated"] += 1

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._drain(block=not (self._waiting or self._running))
                self._drop_cancelled()
                for phase, step in (("admit_ms", self._admit), ("decode_ms", self._decode_step),
                                    ("prefill_ms", self._prefill_step)):
                    t0 = time.perf_counter()
                    step()
                    self.stats[phase] += (time.perf_counter() - t0) * 1e3  # host time, for /metrics
                done = [r for r in self._running if not r.pending and len(r.out) >= r.max_new_tokens]
                for r in done:
                    self._finish(r)
                self._running = [r for r in self._running if r not in done]
            except Exception as exc:  # never die; fail only the request that caused it
                log.exception("engine step failed (%d requests in the step)", len(self._running))
                if len(self._running) == 1:
                    self._abort(self._running[0], EngineError(f"engine error: {exc}"))
                else:  # which one? each runs alone until it succeeds or fails on its own
                    for r in self._running:
                        self._retry(r)
                    self._waiting = self._running + self._waiting
                self._running = []
