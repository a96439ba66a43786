"""The scheduler's decisions, without a model: blocks by tokens held, parking, restores, rows, chunk sizes."""
from concurrent.futures import Future

from djinn.engine.scheduler import (MIN_PREFILL_CHUNK, Plan, Request, Scheduler, Session, blocks_for, pad_groups,
                                    park_order, prefill_budget)


class Landed:
    """A copy that has landed (the engine polls ``done``)."""

    def done(self):
        return True


def request(s: Session, new: list[int], max_new: int) -> Request:
    """What the engine queues for ``generate``: the new tokens join the history, pending from kv_len."""
    s.busy = True
    s.history += new
    return Request(s, s.history[s.kv_len:], max_new, Future())


def run_to_end(sched: Scheduler, r: Request) -> None:
    """Pretend the engine ran ``r``: everything processed but the last generated token."""
    s = r.session
    s.history += [1] * r.max_new_tokens
    s.kv_len = len(s.history) - 1
    s.busy = False
    sched.finish(r)


def land(sched: Scheduler, plan: Plan) -> None:
    for s, *_ in plan.park:
        sched.parked(s)
    for s, *_ in plan.restore:
        sched.restored(s)


def test_a_request_reserves_the_blocks_it_will_write_and_keeps_those_it_holds():
    sched = Scheduler(n_blocks=100, block_size=16, max_running=8, host_blocks=0)
    s = Session("a")
    r = request(s, list(range(40)), 10)
    sched.waiting.append(r)
    plan = sched.schedule({"a": s}, lambda n: 2048)
    assert plan.admitted == [r] and len(s.blocks) == blocks_for(40 + 9, 16) == 4
    assert plan.prefill == [(r, 40)] and plan.decode == []
    run_to_end(sched, r)  # 49 positions in the cache: 4 blocks kept, the row back
    assert len(s.blocks) == 4 and sched.device.available == 96 and sched.rows.available == 8
    r2 = request(s, [5], 30)  # 50 + 29 positions: one more block, never a whole --max-seq-len slot
    sched.waiting.append(r2)
    sched.schedule({"a": s}, lambda n: 2048)
    assert len(s.blocks) == 5 and s.blocks[:4] == [0, 1, 2, 3]


def test_short_of_blocks_idle_sessions_park_and_the_request_waits_for_them():
    sched = Scheduler(n_blocks=10, block_size=16, max_running=8, host_blocks=100)
    sessions = {k: Session(k) for k in "abcd"}
    for i, k in enumerate("abc"):  # three idle sessions of 3 blocks each (48 tokens), c used last
        r = request(sessions[k], list(range(47)), 1)
        sched.waiting.append(r)
        sched.schedule(sessions, lambda n: 2048)
        run_to_end(sched, r)
        sessions[k].last_used = i
    assert sched.device.available == 1
    r = request(sessions["d"], list(range(60)), 20)  # needs 5 blocks: two must go; no gap measured: c, b
    sched.waiting.append(r)
    plan = sched.schedule(sessions, lambda n: 2048)
    assert [p[0].id for p in plan.park] == ["c", "b"] and plan.admitted == []
    assert sessions["a"].resident and not sessions["c"].resident
    for s, *_ in plan.park:
        s.moving = object()  # copies in flight: the blocks are not free yet, and nobody parks twice
    again = sched.schedule(sessions, lambda n: 2048)
    assert again.park == [] and again.admitted == [] and sched.device.available == 1
    land(sched, plan)
    plan = sched.schedule(sessions, lambda n: 2048)
    assert plan.admitted == [r] and len(sessions["d"].blocks) == 5
    assert sessions["c"].host_blocks is not None and sessions["c"].blocks == []


def test_a_parked_session_is_restored_into_fresh_blocks_and_runs_once_the_copy_lands():
    sched = Scheduler(n_blocks=8, block_size=16, max_running=8, host_blocks=2)
    a, b = Session("a"), Session("b")
    sessions = {"a": a, "b": b}
    r = request(a, list(range(47)), 1)
    sched.waiting.append(r)
    sched.schedule(sessions, lambda n: 2048)
    run_to_end(sched, r)
    park = Plan()
    assert sched.park(a, park) and park.park[0][1] == [0, 1, 2]
    assert park.park[0][2][:2] == [0, 1] and park.park[0][2][2] >= 2  # arena full: pageable overflow, never refused
    a.moving = object()
    land(sched, park)
    rb = request(b, list(range(100)), 1)  # b takes 7 blocks, a's old ones among them
    sched.waiting.append(rb)
    sched.schedule(sessions, lambda n: 2048)
    ra = request(a, [9], 5)
    sched.waiting.append(ra)
    plan = sched.schedule(sessions, lambda n: 2048)
    assert plan.admitted == [] and plan.park == []  # b is running: never parked; a waits for blocks
    run_to_end(sched, rb)
    plan = sched.schedule(sessions, lambda n: 2048)
    assert [p[0].id for p in plan.park] == ["b"] and plan.admitted == []  # b idle now: parked for a
    b.moving = object()
    land(sched, plan)
    plan = sched.schedule(sessions, lambda n: 2048)
    assert plan.admitted == [ra] and plan.restore[0][0] is a
    assert plan.restore[0][2] == a.blocks[:3] and len(a.blocks) == blocks_for(48 + 1 + 4, 16)
    a.moving = object()
    assert not ra.ready and sched.schedule(sessions, lambda n: 2048).prefill == []  # the copy has not landed
    land(sched, plan)
    assert ra.ready and a.host_blocks is None and sched.host.available == 2
    assert sched.schedule(sessions, lambda n: 2048).prefill == [(ra, 2)]


def test_rows_bound_the_running_requests_and_a_waiting_request_waits_in_order():
    sched = Scheduler(n_blocks=100, block_size=16, max_running=2, host_blocks=0)
    sessions = {k: Session(k) for k in "abc"}
    rs = [request(sessions[k], [1, 2, 3], 4) for k in "abc"]
    sched.waiting += rs
    plan = sched.schedule(sessions, lambda n: 2048)
    assert plan.admitted == rs[:2] and sched.waiting == rs[2:]
    run_to_end(sched, rs[0])
    assert sched.schedule(sessions, lambda n: 2048).admitted == rs[2:]


def test_prefill_chunks_follow_the_budget_and_the_step_bound():
    sched = Scheduler(n_blocks=100, block_size=16, max_running=8, host_blocks=0)
    sessions = {k: Session(k) for k in "ab"}
    ra, rb = request(sessions["a"], list(range(300)), 2), request(sessions["b"], list(range(100)), 2)
    sched.waiting += [ra, rb]
    assert sched.schedule(sessions, lambda n: 256).prefill == [(ra, 256)]
    assert prefill_budget(2048, 0, 100, 30, 0.01) == 2048  # nothing decodes: throughput
    assert prefill_budget(2048, 64, 100, 30, 0.05) == 1400  # (100 - 30) ms at 0.05 ms a token
    assert prefill_budget(2048, 64, 100, 120, 0.05) == MIN_PREFILL_CHUNK  # decode alone is over: never starve
    assert prefill_budget(2048, 64, 100, 30, 0.0) == 2048  # not measured yet


def test_whole_prompts_fill_a_step_before_one_is_cut():
    sched = Scheduler(n_blocks=100, block_size=16, max_running=8, host_blocks=0)
    sessions = {k: Session(k) for k in "abc"}
    rs = [request(sessions[k], list(range(72)), 2) for k in "abc"]
    sched.waiting += rs
    assert sched.schedule(sessions, lambda n: 200).prefill == [(rs[0], 72), (rs[1], 72)]  # not 72 + 72 + 56
    assert sched.schedule(sessions, lambda n: 100).prefill == [(rs[0], 72)]
    assert sched.schedule(sessions, lambda n: 50).prefill == [(rs[0], 50)]  # alone, a prompt is cut to fit


def test_padded_prefill_groups_bound_the_padding():
    assert pad_groups([72, 72, 72]) == [[0, 1, 2]]
    assert pad_groups([18, 20, 72, 70]) == [[0, 1], [3, 2]]  # 18 + 20 padded to 40 <= 1.25 x 38
    assert pad_groups([3, 100]) == [[0], [1]]
    assert sorted(i for g in pad_groups([5, 9, 1, 300, 7, 8]) for i in g) == list(range(6))


def test_queued_sessions_are_not_parked_while_others_run_and_cheaper_requests_go_ahead():
    """The thrash a wave of parked sessions caused: parking sessions whose requests wait only to restore
    them next. Now idle sessions park first, a request that does not fit lets cheaper ones pass, and
    queued sessions park only when nothing else can move."""
    sched = Scheduler(n_blocks=15, block_size=16, max_running=8, host_blocks=100)
    sessions = {k: Session(k) for k in "abcd"}
    for k in "abc":  # three sessions of 3 blocks, then c parked
        r = request(sessions[k], list(range(47)), 1)
        sched.waiting.append(r)
        sched.schedule(sessions, lambda n: 2048)
        run_to_end(sched, r)
    plan = Plan()
    sched.park(sessions["c"], plan)
    land(sched, plan)
    rd = request(sessions["d"], list(range(100)), 20)  # 8 blocks: runs, 1 left free
    sched.waiting.append(rd)
    sched.schedule(sessions, lambda n: 2048)
    rc = request(sessions["c"], [1], 10)  # parked, needs 4 blocks: does not fit
    ra = request(sessions["a"], [1], 10)  # resident, needs 1 more block: fits
    rb = request(sessions["b"], [1], 10)
    sched.waiting += [rc, ra, rb]
    plan = sched.schedule(sessions, lambda n: 2048)
    assert plan.park == [] and plan.admitted == [ra]  # a and b are queued: not parked for c
    run_to_end(sched, rd)
    run_to_end(sched, ra)
    sessions["d"].last_used = 1e12
    plan = sched.schedule(sessions, lambda n: 2048)
    assert [p[0].id for p in plan.park] == ["d"]  # d went idle: it parks (used last), c waits for it
    land(sched, plan)
    assert sched.schedule(sessions, lambda n: 2048).admitted == [rc, rb]


def test_with_nothing_running_queued_sessions_park_from_the_back_so_the_head_gets_in():
    sched = Scheduler(n_blocks=6, block_size=16, max_running=8, host_blocks=100)
    sessions = {k: Session(k) for k in "abc"}
    for k in "bc":
        r = request(sessions[k], list(range(47)), 1)
        sched.waiting.append(r)
        sched.schedule(sessions, lambda n: 2048)
        run_to_end(sched, r)
    ra = request(sessions["a"], list(range(60)), 10)  # 5 blocks, 0 free; b and c queued behind it
    rb, rc = request(sessions["b"], [1], 2), request(sessions["c"], [1], 2)
    sched.waiting += [ra, rb, rc]
    plan = sched.schedule(sessions, lambda n: 2048)
    assert [p[0].id for p in plan.park] == ["c", "b"] and plan.admitted == []
    land(sched, plan)
    assert sched.schedule(sessions, lambda n: 2048).admitted == [ra]


def test_one_pass_parks_for_every_waiting_request_so_one_landing_admits_them_all():
    sched = Scheduler(n_blocks=12, block_size=16, max_running=8, host_blocks=100)
    sessions = {k: Session(k) for k in "abcdef"}
    for i, k in enumerate("abcd"):  # four idle sessions of 3 blocks: the cache is full
        r = request(sessions[k], list(range(47)), 1)
        sched.waiting.append(r)
        sched.schedule(sessions, lambda n: 2048)
        run_to_end(sched, r)
        sessions[k].last_used = i
    re_, rf = request(sessions["e"], list(range(40)), 9), request(sessions["f"], list(range(40)), 9)  # 3 blocks each
    sched.waiting += [re_, rf]
    plan = sched.schedule(sessions, lambda n: 2048)
    assert [p[0].id for p in plan.park] == ["d", "c"]  # not only d (for e), waiting a step to park c (for f)
    land(sched, plan)
    assert sched.schedule(sessions, lambda n: 2048).admitted == [re_, rf]


def test_the_session_expected_back_last_parks_first_and_a_gone_one_before_all():
    """Agents sharing an Act length: least recently used would park the agent that returns next."""
    sessions = [Session(k, last_used=t) for k, t in zip("abcd", (0.0, 1.0, 2.0, 3.0))]
    assert [x.id for x in park_order(sessions, 5.0, None)] == ["d", "c", "b", "a"]  # nothing measured: MRU
    sched = Scheduler(n_blocks=10, block_size=16, max_running=8, host_blocks=0)
    for x, gap in zip(sessions, (10.0, 10.0, 10.0, 1.0)):  # d comes back every second
        x.history = [1]
        sched.arrived(x, x.last_used + gap)
    assert sessions[0].gap == 10.0 and sched.typical_gap is not None
    assert [x.id for x in park_order(sessions, 3.5, sched.typical_gap)] == ["c", "b", "a", "d"]
    late = Session("e", last_used=-40.0)  # its usual gap passed twice over: taken as gone
    assert park_order(sessions + [late], 3.5, 10.0)[0] is late


def test_when_host_and_device_are_full_the_waiting_requests_are_refused_not_kept_waiting():
    sched = Scheduler(n_blocks=6, block_size=16, max_running=8, host_blocks=1, host_capacity=3)
    sessions = {k: Session(k) for k in "abcd"}
    for i, k in enumerate("ab"):  # two idle sessions of 3 blocks each fill the device
        r = request(sessions[k], list(range(47)), 1)
        sched.waiting.append(r)
        sched.schedule(sessions, lambda n: 2048)
        run_to_end(sched, r)
        sessions[k].last_used = i
    c = request(sessions["c"], list(range(40)), 8)  # 3 blocks: b parks (1 pinned + 2 pageable host blocks)
    sched.waiting.append(c)
    plan = sched.schedule(sessions, lambda n: 2048)
    assert [p[0].id for p in plan.park] == ["b"] and sched.host_held == 3 and plan.refused == []
    land(sched, plan)
    assert sched.schedule(sessions, lambda n: 2048).admitted == [c]
    run_to_end(sched, c)
    d = request(sessions["d"], list(range(40)), 8)  # 3 more: a and c are idle, but the host is full
    sched.waiting.append(d)
    plan = sched.schedule(sessions, lambda n: 2048)
    assert plan.park == [] and plan.admitted == [] and plan.refused == [d]
    assert sessions["a"].resident and sessions["c"].resident and sched.host_held == 3
    # while something runs (it could free blocks when it ends), a request that does not fit waits
    sched.waiting.remove(d)
    e = request(sessions["a"], [1], 20)  # a's own growth: 2 more blocks than it holds; none free
    sched.waiting += [e, d]
    sched.running.append(Request(sessions["c"], [], 1, Future()))
    assert sched.schedule(sessions, lambda n: 2048).refused == []
