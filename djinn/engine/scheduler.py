"""The engine's scheduler: queues, admission, block allocation, parking decisions. Pure Python (no torch),
so every decision is unit-tested without a model; the engine carries the decisions out (copies, steps).

A session's KV lives in fixed-size device blocks (``block_size`` tokens each) listed in its block table;
memory is counted by the tokens it holds. A request reserves, when admitted, every block it will write
(prompt and generated tokens), so a running request never waits for memory. When the free blocks do not
cover a waiting request, idle sessions are parked (the one expected back last first): their blocks are copied to
host blocks and freed once the copy has landed; a parked session's next request restores them. The host holds
at most ``host_capacity`` blocks: when neither memory has room and nothing runs that could free some, the
waiting requests are refused (the engine answers them out of memory) instead of waiting forever.
"""
from __future__ import annotations

import heapq
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

MIN_PREFILL_CHUNK = 64   # tokens: a latency bound never starves prefill below this per step
MIN_SPLIT = 256          # a prompt is cut to fill a step's budget only if at least this much of it fits
PAD_SLACK = 1.25         # prefill rows of unequal length share one padded call while padding adds at most 25%
GAP_EMA = 0.5            # weight of the newest idle gap in a session's (and the server's) usual gap
OVERDUE = 2.0            # a session idle this many times its usual gap is taken as gone: it parks first


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


class BlockAllocator:
    """Block ids ``0..n-1``, lowest first (a heap), so a fresh session's blocks tend to be contiguous."""

    def __init__(self, n: int):
        self.n = n
        self._free = list(range(n))

    @property
    def available(self) -> int:
        return len(self._free)

    def take(self, k: int) -> list[int]:
        if k > len(self._free):
            raise RuntimeError(f"{k} blocks asked, {len(self._free)} free")
        return [heapq.heappop(self._free) for _ in range(k)]

    def give(self, blocks: list[int]) -> None:
        for b in blocks:
            heapq.heappush(self._free, b)


@dataclass(eq=False)  # identity: queues are searched by object, never by value
class Session:
    id: str
    mode: str = "full_djinn"
    history: list[int] = field(default_factory=list)
    kv_len: int = 0                    # positions of history whose K/V are in the cache
    blocks: list[int] = field(default_factory=list)       # device block table
    host_blocks: Optional[list[int]] = None               # parked: the host blocks holding its KV
    moving: Any = None                 # a copy in flight (park or restore): ``.done()`` says when it landed
    busy: bool = False
    park_when_idle: bool = False       # asked to park (its client left) while a request ran on it
    last_used: float = field(default_factory=time.monotonic)
    gap: Optional[float] = None        # its usual idle time between requests (an agent's Act), measured
    temporary: bool = False            # a stateless forward's session, gone after its request

    @property
    def resident(self) -> bool:
        return self.host_blocks is None and self.moving is None


@dataclass(eq=False)
class Request:
    session: Session
    pending: list[int]
    max_new_tokens: int
    future: Future
    past_kv: Any = None
    return_kv: bool = False
    out: list[int] = field(default_factory=list)      # tokens read back (an iteration behind the device)
    launched: int = 0                  # tokens generated or on their way: what the next step plans with
    prefilled: bool = False            # its last prompt chunk has been read back
    logits: Any = None
    submitted: float = field(default_factory=time.perf_counter)
    admitted: Optional[float] = None
    row: Optional[int] = None          # this request's row of the device block-table tensor while it runs
    base_len: int = 0                  # the session's history before this request: restored if it fails
    start: tuple[int, int] = (0, 0)    # (history length, kv_len) once queued: where a retry starts over
    suspect: bool = False              # was in a step that failed: runs alone until it succeeds or fails alone

    @property
    def tokens_needed(self) -> int:
        """Positions whose K/V this request leaves written: its history and every generated token but the last."""
        return len(self.session.history) + max(0, self.max_new_tokens - len(self.out) - 1)

    @property
    def decoding(self) -> bool:
        return not self.pending and self.max_new_tokens > self.launched > 0

    @property
    def complete(self) -> bool:
        """Every token it asked for has been read back (the logits, for a stateless forward)."""
        return self.prefilled and len(self.out) >= self.max_new_tokens

    @property
    def ready(self) -> bool:
        return self.session.moving is None


@dataclass
class Plan:
    """What the engine does this iteration: start these copies, then one decode step and these prefill chunks."""
    park: list[tuple[Session, list[int], list[int]]] = field(default_factory=list)     # (session, device, host)
    restore: list[tuple[Session, list[int], list[int]]] = field(default_factory=list)  # (session, host, device)
    admitted: list[Request] = field(default_factory=list)
    decode: list[Request] = field(default_factory=list)
    prefill: list[tuple[Request, int]] = field(default_factory=list)                   # (request, chunk tokens)
    refused: list[Request] = field(default_factory=list)  # no room on the device nor the host, nothing to wait for


def prefill_budget(cap: int, decoding: int, max_step_ms: float, decode_ms: float, prefill_ms_per_token: float) -> int:
    """Prefill tokens for one step: ``cap`` when nothing decodes (throughput), else as many as keep the step
    (a decode plus this chunk) within ``max_step_ms`` by the measured costs, never below MIN_PREFILL_CHUNK."""
    if decoding == 0 or prefill_ms_per_token <= 0:
        return cap
    return max(min(cap, MIN_PREFILL_CHUNK), min(cap, int((max_step_ms - decode_ms) / prefill_ms_per_token)))


def pad_groups(lengths: list[int], slack: float = PAD_SLACK) -> list[list[int]]:
    """Indices of ``lengths`` grouped for padded prefill calls: sorted by length, a group grows while its
    padded size (rows x longest) stays within ``slack`` times its real tokens. Every call reads all the
    weights once, so fewer calls win until padding costs more than a call."""
    groups: list[list[int]] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if groups and (len(groups[-1]) + 1) * lengths[i] <= slack * (real + lengths[i]):
            groups[-1].append(i)
            real += lengths[i]
        else:
            groups.append([i])
            real = lengths[i]
    return groups


def park_order(idle: list[Session], now: float, typical_gap: Optional[float]) -> list[Session]:
    """Idle sessions in the order to park them: the one whose next request is expected last first
    (Belady's choice, with the next request expected one usual gap after its last; agents that share an
    Act length make this most recently used first, where least recently used would park exactly the
    agent that comes back next), except that sessions overdue by OVERDUE usual gaps (likely gone) go
    before all. Without any measured gap, most recently used first."""
    def key(x: Session) -> tuple[int, float]:
        gap = x.gap if x.gap is not None else typical_gap
        if gap is None:
            return (0, x.last_used)
        expected = x.last_used + gap
        return (1, now - expected) if now - x.last_used > OVERDUE * gap else (0, expected)
    return sorted(idle, key=key, reverse=True)


class Scheduler:
    def __init__(self, n_blocks: int, block_size: int, max_running: int, host_blocks: int,
                 host_capacity: Optional[int] = None):
        """``host_blocks`` pinned host blocks, ``host_capacity`` host blocks in all (pinned first, then
        pageable ones allocated as sessions park; None: no bound)."""
        self.block_size = block_size
        self.device = BlockAllocator(n_blocks)
        self.rows = BlockAllocator(max_running)
        self.host_pinned = host_blocks      # host ids below this are pinned arena blocks; above, pageable overflow
        self.host_capacity = host_capacity
        self.host = BlockAllocator(host_blocks)
        self._overflow_next = host_blocks
        self._overflow_free: list[int] = []
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.freeing = 0                    # device blocks of parks in flight
        self.typical_gap: Optional[float] = None  # the usual idle gap over all sessions

    # -- capacity --------------------------------------------------------------------------
    def fits_ever(self, tokens: int) -> bool:
        return blocks_for(tokens, self.block_size) <= self.device.n

    @property
    def host_held(self) -> int:
        """Host blocks holding parked KV, pinned and pageable."""
        pinned = self.host_pinned - self.host.available
        pageable = self._overflow_next - self.host_pinned - len(self._overflow_free)
        return pinned + pageable

    def take_host(self, k: int) -> Optional[list[int]]:
        """Host blocks for a park: pinned first, then pageable overflow (never pinned on demand); None when
        ``k`` more would pass the host capacity."""
        if self.host_capacity is not None and self.host_held + k > self.host_capacity:
            return None
        pinned = self.host.take(min(k, self.host.available))
        extra = [self._overflow_free.pop() if self._overflow_free else self._next_overflow() for _ in range(k - len(pinned))]
        return pinned + extra

    def _next_overflow(self) -> int:
        self._overflow_next += 1
        return self._overflow_next - 1

    def give_host(self, ids: list[int]) -> None:
        self.host.give([i for i in ids if i < self.host_pinned])
        self._overflow_free += [i for i in ids if i >= self.host_pinned]

    def trim(self, s: Session) -> None:
        """Give back the blocks past what ``s`` holds (a finished or failed request's unused reservation)."""
        keep = blocks_for(s.kv_len, self.block_size)
        if s.resident and len(s.blocks) > keep:
            self.device.give(s.blocks[keep:])
            del s.blocks[keep:]

    def free(self, s: Session) -> None:
        """Everything ``s`` holds (its session closed); a copy in flight must have landed (the engine waits)."""
        self.device.give(s.blocks)
        s.blocks = []
        if s.host_blocks is not None:
            self.give_host(s.host_blocks)
            s.host_blocks = None

    def arrived(self, s: Session, now: float) -> None:
        """A request for ``s`` came in: learn its idle gap (for the park order)."""
        if not s.history:
            return
        gap = now - s.last_used
        s.gap = gap if s.gap is None else (1 - GAP_EMA) * s.gap + GAP_EMA * gap
        self.typical_gap = gap if self.typical_gap is None else (1 - GAP_EMA) * self.typical_gap + GAP_EMA * gap

    # -- parking -----------------------------------------------------------------------------
    def park(self, s: Session, plan: Plan) -> bool:
        """Start parking ``s`` (resident, no request running): its device blocks free when the copy lands.
        False when it cannot park: not resident, nothing to park, or no room left on the host."""
        if not s.resident or s.temporary:
            return False
        self.trim(s)
        if not s.blocks:
            return False
        host = self.take_host(len(s.blocks))
        if host is None:
            return False
        plan.park.append((s, list(s.blocks), host))
        s.host_blocks = host
        self.freeing += len(s.blocks)
        return True

    def parked(self, s: Session) -> None:
        """The park copy of ``s`` landed: its device blocks are free."""
        s.moving = None
        self.freeing -= len(s.blocks)
        self.device.give(s.blocks)
        s.blocks = []

    def restored(self, s: Session) -> None:
        """The restore copy of ``s`` landed: its host blocks are free."""
        s.moving = None
        self.give_host(s.host_blocks or [])
        s.host_blocks = None

    def _need(self, r: Request) -> tuple[int, int]:
        """(blocks ``r`` will hold, blocks it must still get): a parked session gets all of them afresh."""
        s = r.session
        need = blocks_for(r.tokens_needed, self.block_size)
        return need, need - (len(s.blocks) if s.host_blocks is None else 0)

    # -- one iteration -------------------------------------------------------------------------
    def schedule(self, sessions: dict[str, Session], chunk_for: Callable[[int], int],
                 now: Optional[float] = None) -> Plan:
        """Admit what fits (parking idle sessions for room), then pick the decode batch and the prefill
        chunks (``chunk_for(decode batch size)`` tokens in all)."""
        plan = Plan()
        self._admit(sessions, plan, time.monotonic() if now is None else now)
        ready = [r for r in self.running if r.ready]
        plan.decode = [r for r in ready if r.decoding]
        budget = chunk_for(len(plan.decode))
        for r in ready:  # whole prompts first: a cut prompt costs another call with its own weight read
            if budget <= 0:
                break
            if r.pending:
                n = min(budget, len(r.pending))
                if n < len(r.pending) and plan.prefill and n < MIN_SPLIT:
                    break
                plan.prefill.append((r, n))
                budget -= n
        return plan

    def _admit(self, sessions: dict[str, Session], plan: Plan, now: float) -> None:
        """First fit in arrival order. Short of blocks, idle sessions (no request queued or running) park
        in ``park_order``; a request that still does not fit waits while later, cheaper ones (a
        resident session's few new blocks) go ahead. Only when nothing runs and nothing is in flight do
        queued sessions park, from the back of the queue, so the head always gets in."""
        if any(r.suspect for r in self.running):
            return  # a suspect of a failed step runs alone
        suspect = next((r for r in self.waiting if r.suspect), None)
        if suspect is not None and self.running:
            return  # let the running requests finish first
        idle: Optional[list[Session]] = None  # built at the first shortfall: sorting every session costs
        pledged = 0  # blocks in flight already counted on by earlier requests of this pass
        admitted: list[Request] = []
        for r in [suspect] if suspect is not None else self.waiting:
            if self.rows.available == 0:
                break
            s = r.session
            if s.moving is not None:
                continue  # its park is in flight: admitted (and restored) once it lands
            need, extra = self._need(r)
            if self.device.available < extra:  # park for every waiting request at once: one landing admits all
                if idle is None:
                    queued = {id(x.session) for x in self.waiting + self.running}
                    idle = park_order([x for x in sessions.values() if id(x) not in queued and x.resident and x.blocks],
                                      now, self.typical_gap)[::-1]  # pop() gives the next to park
                while self.device.available + self.freeing - pledged < extra and idle:
                    self.park(idle.pop(), plan)
                if self.device.available + self.freeing - pledged >= extra:
                    pledged += extra
                elif self.device.available == 0 and not idle:
                    break  # nothing more frees before a copy lands or a request ends
                continue
            if s.host_blocks is not None:  # parked: restore into fresh blocks, runnable once the copy lands
                s.blocks = self.device.take(need)
                plan.restore.append((s, list(s.host_blocks), s.blocks[:len(s.host_blocks)]))
            elif extra > 0:
                s.blocks += self.device.take(extra)
            r.row = self.rows.take(1)[0]
            admitted.append(r)
        if admitted:
            taken = {id(r) for r in admitted}
            self.waiting = [r for r in self.waiting if id(r) not in taken]
            self.running += admitted
            plan.admitted = admitted
        elif self.waiting and not self.running and not self.freeing:
            self._unblock(plan)

    def _unblock(self, plan: Plan) -> None:
        """Nothing runs and nothing lands, yet the head request does not fit: its queue-mates' sessions
        park, from the back of the queue, until it will. When none can park (the host is full too), no
        waiting request can ever get in until sessions close: they are all refused."""
        head = next((r for r in self.waiting if r.session.moving is None), None)
        if head is None:
            return
        s = head.session
        extra = self._need(head)[1]
        for r in reversed(self.waiting):
            if self.device.available + self.freeing >= extra:
                break
            if r.session is not s:
                self.park(r.session, plan)
        if not plan.park:
            plan.refused = [r for r in self.waiting if r.session.moving is None]

    def finish(self, r: Request) -> None:
        """``r`` left the running set (done, failed or cancelled): its row and unused blocks go back."""
        if r in self.running:
            self.running.remove(r)
        if r.row is not None:
            self.rows.give([r.row])
            r.row = None
        self.trim(r.session)
