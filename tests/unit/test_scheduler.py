"""The batching scheduler on its own: plain Python, fabricated model outputs, no torch."""

from __future__ import annotations

import random

import pytest

from vqdiff.model.sampling.params import GenerationParams
from vqdiff.server.request import Request, Status
from vqdiff.server.scheduler import Draining, QueueFull, Scheduler


def req(n: int = 1, deadline: float = float("inf")) -> Request:
    r = Request(prompt="p", params=GenerationParams(steps=4, seed=0), n=n)
    r.deadline = deadline
    return r


def test_admits_fifo_while_rows_fit_and_never_lets_small_requests_overtake():
    s = Scheduler(max_rows=8, max_waiting=10)
    a, big, small = req(n=2), req(n=3), req(n=1)  # 4, 6 and 2 rows
    for r in (a, big, small):
        s.add(r)
    out = s.schedule(now=0.0)
    assert out.admitted == [a] and out.running == [a] and out.rows == 4
    # `small` would fit beside `a`, but `big` is first in line: nobody overtakes it
    assert list(s.waiting) == [big, small]
    s.update({a: Status.FINISHED_OK})
    out = s.schedule(now=1.0)
    assert out.admitted == [big, small] and out.rows == 8
    assert a.status == Status.FINISHED_OK and big.status == small.status == Status.RUNNING
    assert big.admitted_at == 1.0


def test_queue_full_and_oversized_requests_are_refused_and_nothing_is_queued():
    s = Scheduler(max_rows=4, max_waiting=1)
    s.add(req())
    s.add(req())  # both join at the next step: neither counts as waiting
    s.add(req())  # waits for a slot: 1 of max_waiting=1
    with pytest.raises(QueueFull):
        s.add(req())
    with pytest.raises(ValueError, match="n: 3"):
        s.add(req(n=3))
    assert len(s.waiting) == 3
    s.schedule(0.0)
    assert len(s.running) == 2 and len(s.waiting) == 1


def test_max_waiting_zero_still_serves_requests_that_fit_the_batch():
    s = Scheduler(max_rows=4, max_waiting=0)
    s.add(req(n=2))
    with pytest.raises(QueueFull):
        s.add(req())
    s.schedule(0.0)
    with pytest.raises(QueueFull):
        s.add(req())


def test_cancelled_and_expired_requests_leave_at_the_next_step_boundary():
    s = Scheduler(max_rows=4, max_waiting=10)
    running, waiting_cancelled, expiring = req(n=2), req(), req(deadline=5.0)
    for r in (running, waiting_cancelled, expiring):
        s.add(r)
    s.schedule(now=0.0)
    assert s.running == [running]
    s.cancel(running)
    s.cancel(waiting_cancelled)
    assert running.status == Status.RUNNING  # nothing happens until the boundary
    out = s.schedule(now=6.0)
    assert out.finished == [running, waiting_cancelled, expiring]
    assert running.status == waiting_cancelled.status == Status.FINISHED_CANCELLED
    assert expiring.status == Status.FINISHED_DEADLINE
    assert s.idle and out.running == []


def test_cancel_after_finish_changes_nothing():
    s = Scheduler(max_rows=4, max_waiting=10)
    r = req()
    s.add(r)
    s.schedule(0.0)
    s.update({r: Status.FINISHED_OK})
    s.cancel(r)
    assert r.status == Status.FINISHED_OK and not r.cancel_requested


def test_update_needs_a_finished_status():
    s = Scheduler(max_rows=4, max_waiting=10)
    r = req()
    s.add(r)
    s.schedule(0.0)
    with pytest.raises(ValueError, match="not a finished status"):
        s.update({r: Status.RUNNING})


def test_draining_refuses_new_requests_but_finishes_accepted_ones():
    s = Scheduler(max_rows=2, max_waiting=10)
    a, b = req(), req()
    s.add(a)
    s.add(b)
    s.drain()
    with pytest.raises(Draining):
        s.add(req())
    assert s.schedule(0.0).running == [a]
    s.update({a: Status.FINISHED_OK})
    assert s.schedule(1.0).running == [b]
    gone = s.abort_all()
    assert gone == [b] and b.status == Status.FINISHED_UNAVAILABLE and s.idle


def test_simulated_load_respects_the_row_budget_and_finishes_everything():
    """A fake engine: each running request needs `steps` steps; arrivals are random. Invariants: the
    row budget holds at every step, admission order is arrival order, every request finishes."""
    rng = random.Random(0)
    s = Scheduler(max_rows=16, max_waiting=1000)
    left: dict[Request, int] = {}
    admitted_order, arrivals = [], []
    for step in range(5000):
        for _ in range(rng.choice([0, 0, 1, 2])):
            if len(arrivals) < 200:
                r = req(n=rng.randint(1, 4))
                left[r] = rng.randint(1, 12)
                s.add(r)
                arrivals.append(r)
        out = s.schedule(now=float(step))
        admitted_order += out.admitted
        assert out.rows <= 16
        if s.waiting:  # work conserving: the head did not fit
            assert out.rows + s.waiting[0].rows > 16
        done = {}
        for r in out.running:
            left[r] -= 1
            if left[r] == 0:
                done[r] = Status.FINISHED_OK
        s.update(done)
        if len(arrivals) == 200 and s.idle:
            break
    assert s.idle
    assert admitted_order == arrivals
    assert all(r.status == Status.FINISHED_OK for r in arrivals)
