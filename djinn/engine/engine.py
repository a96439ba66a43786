"""The Djinn engine: one model, many sessions, continuous batching in one thread.

Every loop iteration (1) takes new work, (2) lets the scheduler admit what fits (parking idle
sessions' blocks to host memory for room, restoring a parked session's blocks when its next request
comes; the copies run on side streams and only that request waits for them), (3) runs ONE batched
decode step for every generating request, and (4) prefills a chunk of newly admitted prompts sized so
the decode step stays within ``max_step_ms``. Decisions live in :mod:`djinn.engine.scheduler` (pure),
device work in :mod:`djinn.engine.model_runner` and :mod:`djinn.engine.kv_cache`.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from djinn.engine.kv_cache import PagedKVCache, block_bytes
from djinn.engine.model_runner import ModelRunner, Pending
from djinn.engine.scheduler import Plan, Request, Scheduler, Session, blocks_for, pad_groups, prefill_budget
from djinn.engine.transformer import PagedTransformer

log = logging.getLogger("djinn.engine")

MODES = ("full_djinn", "partially_aware", "semantic_blind")
EMA = 0.2  # weight of the newest step in the measured step costs
COSTED_PREFILL = 512  # prefill calls of at least this many tokens measure the per-token cost
MAX_LOOKAHEAD = 8     # decode steps replayed per host round trip when nothing else waits


class EngineError(RuntimeError):
    """A request the engine cannot serve (bad session, too long); the server replies with it."""


class KVCacheFull(EngineError):
    """No room for a request's KV on the device nor, by parking idle sessions, on the host."""


class SessionGone(EngineError):
    """The session does not exist (never opened, or closed while its request waited)."""


class StepFailed(EngineError):
    """A compute step raised on a request the engine had accepted: a bug, not the request's fault."""


@dataclass
class Launched:
    """One iteration's device work, launched and not yet read back."""
    decode: list[Request]
    steps: int
    decoded: Optional[Pending]                           # None: no decode, or it rode in the first call
    calls: list[tuple[list, torch.Tensor, Pending]]      # per prefill call: (request, chunk, start, last)s


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
                 max_slots: int = 1024, prefill_chunk: int = 4096, max_step_ms: float = 100.0,
                 block_size: int = 16, cuda_graphs: bool = True, host_blocks: Optional[int] = 0,
                 host_bytes: Optional[int] = None):
        """``max_slots``: requests running at once (the decode batch); ``max_seq``: a session's token cap;
        the KV cache takes ``kv_budget_bytes`` in blocks of ``block_size`` tokens (at most ``max_slots``
        full-length sessions' worth); ``host_blocks`` pinned host blocks for parking (None: from ``host_bytes``,
        else half the free host memory, on a GPU)."""
        self.model = model
        self.net = PagedTransformer(model)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        max_seq = min(max_seq, self.net.shape.max_positions)
        n_blocks = max_slots * blocks_for(max_seq, block_size)
        if kv_budget_bytes is not None:
            n_blocks = min(n_blocks, kv_budget_bytes // block_bytes(self.net.shape, block_size, self.dtype) - 1)
        self.cache = PagedKVCache(self.net.shape, int(n_blocks), block_size, max_seq, max_slots, self.dtype,
                                  self.device, host_blocks, host_bytes)
        self.sched = Scheduler(self.cache.n_blocks, block_size, max_slots, self.cache.host_blocks,
                               self.cache.host_capacity)
        self.runner = ModelRunner(self.net, self.cache, max_slots, cuda_graphs)
        self.prefill_chunk, self.max_step_ms = prefill_chunk, max_step_ms
        self.sessions: dict[str, Session] = {}
        self._moving: list[tuple[Session, str]] = []  # copies in flight: (session, "park" | "restore")
        self._cost = {"decode_ms": 0.0, "prefill_ms_per_token": 0.0}  # measured, for prefill_budget
        self.stats = {"requests": 0, "tokens_generated": 0, "tokens_prefilled": 0, "decode_steps": 0,
                      "decode_calls": 0, "prefill_calls": 0, "decode_batch_tokens": 0, "parks": 0, "restores": 0,
                      "reused_sessions": 0, "refused": 0, "admit_ms": 0.0, "launch_ms": 0.0, "wait_ms": 0.0}
        self._inbox: queue.Queue = queue.Queue()
        self._cancelled = False  # a request's client cancelled it (set from any thread by _note_cancel)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="djinn-engine", daemon=True)
        self._thread.start()

    @property
    def max_seq(self) -> int:
        return self.cache.max_seq

    # -- thread-safe API -----------------------------------------------------
    def call(self, fn: Callable, *args) -> Future:
        """Run ``fn(*args)`` on the engine thread (all session/block state lives there)."""
        fut: Future = Future()
        self._inbox.put((fn, args, fut))
        return fut

    def submit(self, req: Request) -> Future:
        req.future.add_done_callback(self._note_cancel)
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
        fut.add_done_callback(self._note_cancel)
        self._inbox.put(("generate", session_id, list(new_tokens), max_new_tokens, fut))
        return fut

    def _note_cancel(self, fut: Future) -> None:
        """A request's future is done (any thread): if its client cancelled it, the loop looks for it."""
        if fut.cancelled():
            self._cancelled = True

    def forward(self, tokens: list[int], past_kv=None, return_kv: bool = False) -> Future:
        """Stateless step (partially_aware / semantic_blind): last-position logits, optionally the new KV."""
        start = 0 if past_kv is None else past_kv[0].shape[2]
        if start + len(tokens) > self.max_seq:
            raise EngineError(f"request of {start + len(tokens)} tokens exceeds --max-seq-len {self.max_seq}")
        if not self.sched.fits_ever(start + len(tokens)):
            raise EngineError(f"request of {start + len(tokens)} tokens exceeds the KV cache "
                              f"({self.cache.n_blocks} blocks of {self.cache.block_size}); raise --max-vram-gb")
        if not tokens:
            raise EngineError("tokens: a forward step needs at least one token")
        s = Session(id=f"tmp-{uuid.uuid4().hex[:8]}", temporary=True, kv_len=start)
        s.history = [0] * start + list(tokens)
        return self.submit(Request(s, list(tokens), 0, Future(), past_kv=past_kv, return_kv=return_kv))

    def snapshot(self) -> dict:
        """Counters for /metrics (read without locking; values are ints)."""
        sessions = list(self.sessions.values())
        parked = sum(1 for s in sessions if s.host_blocks is not None)
        return dict(self.stats, sessions=len(sessions), resident_sessions=len(sessions) - parked,
                    parked_sessions=parked, kv_blocks=self.cache.n_blocks, kv_blocks_free=self.sched.device.available,
                    kv_block_tokens=self.cache.block_size, kv_cache_bytes=self.cache.nbytes,
                    host_kv_blocks=self.cache.host_capacity, host_kv_pinned_blocks=self.cache.host_blocks,
                    host_kv_blocks_free=self.cache.host_capacity - self.sched.host_held,
                    max_seq_len=self.max_seq, waiting=len(self.sched.waiting), running=len(self.sched.running))

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
        for r in self.sched.waiting + self.sched.running:
            if r.session is s:
                self._abort(r, SessionGone(f"session {session_id} was closed while this request waited"))
        if s.moving is not None:  # a copy in flight reads or writes its blocks: let it land first
            s.moving.wait()
            self._landed()
        self.sched.free(s)
        return True

    def _park_by_id(self, session_id: str) -> bool:
        s = self.sessions.get(session_id)
        if s is None:
            raise SessionGone(f"session {session_id} not found")
        s.park_when_idle = s.busy  # a request runs on it: it parks when that request ends
        if not s.busy:
            self._park(s)
        return not s.resident

    def _park(self, s: Session) -> None:
        plan = Plan()
        self.sched.park(s, plan)
        self._start(plan)

    def _park_if_asked(self, s: Session) -> None:
        if s.park_when_idle and not s.busy:
            s.park_when_idle = False
            self._park(s)

    def _new_generate(self, session_id, new_tokens, max_new_tokens, fut) -> Optional[Request]:
        s = self.sessions.get(session_id)
        if fut.cancelled():  # its client left before the engine saw it
            return None
        if s is None:
            _settle(fut, exc=SessionGone(f"session {session_id} not found; open it first"))
            return None
        if s.busy:
            _settle(fut, exc=EngineError(f"session {session_id} already has a request in flight"))
            return None
        total = len(s.history) + len(new_tokens) + max_new_tokens
        if total > self.max_seq:
            _settle(fut, exc=EngineError(f"session {session_id} would hold {total} tokens > --max-seq-len "
                                         f"{self.max_seq}; close it or start a new one"))
            return None
        if not self.sched.fits_ever(total):
            _settle(fut, exc=EngineError(f"session {session_id} would hold {total} tokens, more than the KV cache "
                                         f"({self.cache.n_blocks} blocks of {self.cache.block_size}); raise --max-vram-gb"))
            return None
        if not s.history and not new_tokens:
            _settle(fut, exc=EngineError("tokens: a new session's first request needs at least one token"))
            return None
        if s.history:
            self.stats["reused_sessions"] += 1
            log.info("Reusing session %s (kv_processed_len=%d, new tokens=%d)", s.id, s.kv_len, len(new_tokens))
        self.sched.arrived(s, time.monotonic())
        s.busy, s.park_when_idle = True, False  # its owner is back
        base = len(s.history)
        s.history.extend(new_tokens)
        if s.kv_len == len(s.history) and max_new_tokens > 0:
            s.kv_len -= 1  # every token processed: recompute the last one for the logits the first new token needs
        return self._queued(Request(s, s.history[s.kv_len:], max_new_tokens, fut, base_len=base))

    @staticmethod
    def _queued(r: Request) -> Request:
        r.start = (len(r.session.history), r.session.kv_len)
        return r

    def _release(self, r: Request) -> None:
        """``r`` leaves the queues: its row and unused blocks go back (a temporary session's all)."""
        if r in self.sched.waiting:
            self.sched.waiting.remove(r)
        self.sched.finish(r)
        if r.session.temporary:
            self.sched.free(r.session)

    def _abort(self, r: Request, exc: Optional[BaseException]) -> None:
        """Fail (or drop, when cancelled) ``r``: its session keeps no token the client did not receive."""
        s = r.session
        s.busy = False
        del s.history[r.base_len:]
        s.kv_len = min(s.kv_len, r.base_len)
        self._release(r)
        self._park_if_asked(s)
        if exc is not None:
            _settle(r.future, exc=exc)

    def _retry(self, r: Request) -> None:
        """Back to where ``r`` was queued; the KV before that is untouched (steps write only past kv_len)."""
        s = r.session
        del s.history[r.start[0]:]
        s.kv_len = r.start[1]
        r.pending, r.out, r.logits, r.suspect = s.history[s.kv_len:], [], None, True
        r.launched, r.prefilled = 0, False
        self._release(r)

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
                self.sched.waiting.append(item)
            elif item[0] == "generate":
                req = self._new_generate(*item[1:])
                if req is not None:
                    self.sched.waiting.append(req)
            else:
                fn, args, fut = item
                try:
                    _settle(fut, fn(*args))
                except Exception as exc:  # reported to the caller, engine keeps running
                    _settle(fut, exc=exc)

    def _drop_cancelled(self) -> None:
        """A client that went away cancelled its request: stop spending steps and blocks on it. Only after
        a cancel was noted (asking 500 futures each iteration took a fifth of the loop's host time)."""
        if not self._cancelled:
            return
        self._cancelled = False  # a cancel noted from now on sets it again: looked for next iteration
        for r in [r for r in self.sched.waiting + self.sched.running if r.future.cancelled()]:
            self._abort(r, None)

    def _landed(self) -> None:
        """Apply the copies that have landed: a park frees device blocks, a restore host blocks."""
        still = []
        for s, kind in self._moving:
            if not s.moving.done():
                still.append((s, kind))
            elif kind == "park":
                self.sched.parked(s)
            else:
                self.sched.restored(s)
                if not s.busy:
                    self.sched.trim(s)
        self._moving = still

    def _start(self, plan: Plan) -> None:
        """Refuse what can never get in, carry out the plan's copies, give admitted requests their table rows."""
        if plan.refused:
            full = KVCacheFull(
                f"the KV cache is full: {len(self.sessions)} sessions hold {self.cache.n_blocks - self.sched.device.available} "
                f"of {self.cache.n_blocks} device blocks and {self.sched.host_held} of {self.cache.host_capacity} host "
                f"blocks; close idle sessions or raise --max-vram-gb or --host-kv-gb")
            self.stats["refused"] += len(plan.refused)
            log.warning("refusing %d requests: %s", len(plan.refused), full)
            for r in plan.refused:
                self._abort(r, full)
        for s, device, host in plan.park:
            s.moving = self.cache.copy_out(device, host)
            self._moving.append((s, "park"))
            self.stats["parks"] += 1
            log.debug("parking session %s (%d tokens, %d blocks)", s.id, s.kv_len, len(device))
        for s, host, device in plan.restore:
            s.moving = self.cache.copy_in(host, device)
            self._moving.append((s, "restore"))
            self.stats["restores"] += 1
        if plan.admitted:
            now = time.perf_counter()
            for r in plan.admitted:
                r.admitted = r.admitted or now
                if r.session.temporary and r.past_kv is not None:
                    self.cache.write(r.session.blocks, *r.past_kv)
            self.cache.set_rows([r.row for r in plan.admitted], [r.session.blocks for r in plan.admitted])

    def _chunk_for(self, decoding: int) -> int:
        return prefill_budget(self.prefill_chunk, decoding, self.max_step_ms, self._cost["decode_ms"],
                              self._cost["prefill_ms_per_token"])

    def _measured(self, key: str, value: float) -> None:
        old = self._cost[key]
        self._cost[key] = value if old == 0 else (1 - EMA) * old + EMA * value

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
                res.kv = self.cache.read(s.blocks, s.kv_len)
        self._release(r)
        self._park_if_asked(s)
        self.stats["requests"] += 1
        _settle(r.future, res)

    def _lookahead(self, batch: list[Request], plan: Plan) -> int:
        """Decode steps to run in one host round trip: several only when nothing else waits for the loop
        (no admission, prefill or copy), within ``max_step_ms`` and no further than any row's last token."""
        if plan.prefill or self.sched.waiting or self._moving or not self._cost["decode_ms"]:
            return 1
        fit = int(self.max_step_ms // self._cost["decode_ms"])
        return max(1, min(MAX_LOOKAHEAD, fit, *(r.max_new_tokens - r.launched for r in batch)))

    def _launch(self, plan: Plan, steps: int) -> Launched:
        """Launch the iteration's device work, reading nothing back: ``steps`` decode steps of the batch and
        the prompt chunks in as few padded calls as ``pad_groups`` allows. A single decode step rides in the
        first prefill call where the runner mixes (its tokens share the GEMMs: one read of the weights for
        both). Positions and counts advance now, so the next iteration can be planned and launched before
        this one's tokens are read back (the tokens themselves stay on the device, ``next_tokens``)."""
        items = []
        for r, n in plan.prefill:
            s = r.session
            chunk, r.pending = r.pending[:n], r.pending[n:]
            items.append((r, chunk, s.kv_len, not r.pending))
            s.kv_len += n
            if not r.pending and r.max_new_tokens > 0:
                r.launched += 1
        groups = pad_groups([len(c) for _, c, _, _ in items])
        decoded, riders = None, None
        if plan.decode:
            args = ([r.row for r in plan.decode], [r.session.kv_len for r in plan.decode])
            for r in plan.decode:
                r.session.kv_len += steps
                r.launched += steps
            if groups and steps == 1 and self.runner.mixes:
                riders = args
            else:
                pending = Pending(self.device)
                decoded = pending.of(self.runner.decode(*args, steps))
        calls = []
        for group in groups:
            batch = [items[i] for i in group]
            pending = Pending(self.device)
            logits, firsts = self.runner.prefill([r.row for r, *_ in batch], [c for _, c, *_ in batch],
                                                 [start for _, _, start, _ in batch], riders)
            calls.append((batch, logits, pending.of(firsts)))
            riders = None
        return Launched(plan.decode, steps, decoded, calls)

    def _take_decode(self, batch: list[Request], outs: list[list[int]], steps: int) -> None:
        for nxt in outs:
            for r, t in zip(batch, nxt):
                if r.row is not None:  # else it was aborted since its launch
                    r.out.append(t)
                    r.session.history.append(t)
        self.stats["decode_steps"] += steps
        self.stats["decode_calls"] += 1
        self.stats["decode_batch_tokens"] += len(batch) * steps
        self.stats["tokens_generated"] += len(batch) * steps

    def _take_prefill(self, batch: list, firsts: list[int], logits: torch.Tensor) -> None:
        for i, ((r, chunk, _, last), t) in enumerate(zip(batch, firsts)):
            self.stats["tokens_prefilled"] += len(chunk)
            if last and r.row is not None:
                r.logits, r.prefilled = logits[i], True
                if r.max_new_tokens > 0:
                    r.out.append(t)
                    r.session.history.append(t)
                    self.stats["tokens_generated"] += 1

    def _take(self, launched: Launched) -> None:
        """Read back what ``_launch`` started, in launch order (each wait covers its own call alone), and
        apply it; measure the step costs ``prefill_budget`` plans with."""
        if launched.decoded is not None:
            self._take_decode(launched.decode, launched.decoded.get(), launched.steps)
            self._measured("decode_ms", launched.decoded.ms / launched.steps)
        for i, (batch, logits, pending) in enumerate(launched.calls):
            tokens = pending.get()
            riding = launched.decode if i == 0 and launched.decoded is None else []
            self._take_prefill(batch, tokens[:len(batch)], logits)
            if riding:
                self._take_decode(riding, [tokens[len(batch):]], 1)
            work = sum(len(c) for _, c, _, _ in batch) + len(riding)  # a rider costs about a prompt token
            self.stats["prefill_calls"] += 1
            if work >= COSTED_PREFILL:  # smaller calls are dominated by reading the weights, not by tokens
                self._measured("prefill_ms_per_token", pending.ms / work)

    def _loop(self) -> None:
        """Plan and launch iteration k+1, then read back iteration k: the host's work for the next step
        runs while the GPU computes the previous one."""
        inflight: Optional[Launched] = None
        while not self._stop.is_set():
            try:
                self._drain(block=inflight is None and not (self.sched.waiting or self.sched.running or self._moving))
                self._drop_cancelled()
                t0 = time.perf_counter()
                self._landed()
                plan = self.sched.schedule(self.sessions, self._chunk_for)
                self._start(plan)
                t1 = time.perf_counter()
                launched = None
                if plan.decode or plan.prefill:
                    launched = self._launch(plan, self._lookahead(plan.decode, plan))
                t2 = time.perf_counter()
                if inflight is not None:
                    self._take(inflight)
                inflight = launched
                t3 = time.perf_counter()
                for phase, ms in (("admit_ms", t1 - t0), ("launch_ms", t2 - t1), ("wait_ms", t3 - t2)):
                    self.stats[phase] += ms * 1e3  # host time, for /metrics
                for r in [r for r in self.sched.running if r.complete]:
                    self._finish(r)
                if self._moving and launched is None:
                    time.sleep(0.0005)  # only copies in flight: poll them without spinning hot
            except Exception as exc:  # never die; fail only the request that caused it
                inflight = None  # its requests start over (or fail) below, once its launched work is done
                if self.device.type == "cuda":
                    try:
                        torch.cuda.synchronize(self.device)
                    except Exception:  # the device itself failed: nothing more to wait for
                        log.exception("device synchronize after the failed step")
                running = list(self.sched.running)
                log.exception("engine step failed (%d requests in the step)", len(running))
                if len(running) == 1:
                    running[0].session.kv_len = running[0].start[1]  # what the failed launch counted may be unwritten
                    self._abort(running[0], StepFailed(f"engine step failed: {type(exc).__name__}: {exc}"))
                else:  # which one? each runs alone until it succeeds or fails on its own
                    for r in running:
                        self._retry(r)
                    self.sched.waiting = running + self.sched.waiting
