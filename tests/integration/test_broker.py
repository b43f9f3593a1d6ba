"""server/broker.py against a real redis-server: jobs go to one worker and stay pending until
acknowledged, one final event per job however many workers run it, a dead worker's jobs are
reclaimed after its lease, a job that outlives its deliveries is dead-lettered with a failure."""

from __future__ import annotations

import time

import pytest

from vqdiff.model.sampling.params import GenerationParams
from vqdiff.server.broker import Broker, key
from vqdiff.server.jobs import Job, decode_event, event_fields
from vqdiff.server.request import Failure, Progress, Result, Status, Timings

MODEL = "tiny"
LEASE_S = 0.3


@pytest.fixture
def broker(redis_server):
    b = Broker(redis_server.url)
    b.r.flushdb()
    return b


def job(i: int) -> Job:
    params = GenerationParams(steps=4, seed=100 + i, uncond="null")
    return Job(id=f"gen-{i:04d}", model=MODEL, prompt=f"prompt {i}", params=params, n=1 + i % 2, preview_every=2,
               deadline=time.time() + 60)


def result(seed: int) -> Result:
    return Result(images=(b"\x89PNG fake",), seeds=(seed,), params=GenerationParams(seed=seed),
                  timings=Timings(1.0, 2.0, 3.0, 6.0))


def test_a_job_and_its_events_round_trip_exactly():
    j = job(3)
    assert Job.from_fields(j.to_fields()) == j
    for event in (Progress(2, 4, 0.5, (b"\x00\x01png",)), result(7), Failure(Status.FINISHED_DEADLINE, "late")):
        assert decode_event(event_fields(event)) == event


def test_each_job_goes_to_one_worker_and_stays_pending_until_acknowledged(broker):
    ids = [broker.enqueue(job(i)) for i in range(5)]
    assert broker.depth(MODEL) == (5, 0)
    a = broker.claim(MODEL, "a", count=3, block_ms=100)
    b = broker.claim(MODEL, "b", count=10, block_ms=100)
    assert [eid for eid, _ in a + b] == ids  # FIFO, each job once
    assert [j.id for _, j in a] == ["gen-0000", "gen-0001", "gen-0002"]
    assert broker.depth(MODEL) == (0, 5)
    for eid, j in a:
        broker.ack(MODEL, eid)
    assert broker.depth(MODEL) == (0, 2)
    assert broker.claim(MODEL, "c", count=10, block_ms=50) == []


def test_one_final_event_per_job_whoever_finishes_it(broker):
    jid = "gen-once"
    broker.emit(jid, Progress(1, 4, 0.25))
    assert broker.finish(jid, result(1), worker="a") is True
    assert broker.finish(jid, result(1), worker="b") is False  # a re-run of a reclaimed job
    assert broker.finish(jid, Failure(Status.FINISHED_FAILED, "x"), worker="c") is False
    events = broker.events(jid)
    assert [type(e) for _, e in events] == [Progress, Result]
    later = broker.events(jid, after=events[0][0])  # resume after the first event's id
    assert [e for _, e in later] == [result(1)]
    assert broker.r.ttl(key("events", jid)) > 0  # finished jobs' events expire


def test_a_dead_workers_jobs_are_reclaimed_after_its_lease(broker):
    for i in range(3):
        broker.enqueue(job(i))
    broker.heartbeat("a", LEASE_S, {"model": MODEL, "free_rows": 4})
    broker.heartbeat("b", 10, {"model": MODEL, "free_rows": 8})
    taken = broker.claim(MODEL, "a", count=3, block_ms=100)
    assert len(taken) == 3 and set(broker.workers()) == {"a", "b"}
    assert broker.reclaim(MODEL, "b", min_idle_ms=0, max_deliveries=3) == []  # a is alive: nothing to take
    time.sleep(LEASE_S + 0.1)  # a stops renewing its lease: it died
    assert set(broker.workers()) == {"b"}
    got = broker.reclaim(MODEL, "b", min_idle_ms=0, max_deliveries=3)
    assert [(eid, j.id, n) for eid, j, n in got] == [(eid, j.id, 2) for eid, j in taken]
    assert broker.reclaim(MODEL, "c", min_idle_ms=0, max_deliveries=3) == []  # b holds them now
    consumers = {c["name"].decode(): c["pending"] for c in broker.r.xinfo_consumers(key("jobs", MODEL), "workers")}
    assert consumers == {"b": 3}  # the dead worker is gone from the group


def test_a_job_that_outlives_its_deliveries_is_dead_lettered_with_a_failure(broker):
    j = job(9)
    broker.enqueue(j)
    broker.claim(MODEL, "w1", count=1, block_ms=100)  # delivery 1; w1 never heartbeats: dead
    assert [n for _, _, n in broker.reclaim(MODEL, "w2", 0, max_deliveries=2)] == [2]  # w2 dies too
    assert broker.reclaim(MODEL, "w3", 0, max_deliveries=2) == []  # delivery 3 > 2: dead letter
    (dead_id, fields), = broker.r.xrange(key("dead"))
    assert b"delivered 3 times" in fields[b"reason"] and Job.from_fields(fields) == j
    (_, final), = broker.events(j.id)
    assert isinstance(final, Failure) and final.status == Status.FINISHED_FAILED and "delivered 3 times" in final.message
    assert broker.depth(MODEL) == (0, 0)  # acknowledged: nobody runs it again


def test_an_entry_that_is_not_a_job_comes_back_as_none(broker):
    broker.ensure_group(MODEL)
    broker.r.xadd(key("jobs", MODEL), {"junk": "1"})
    (eid, j), = broker.claim(MODEL, "a", count=1, block_ms=100)
    assert j is None
    broker.dead_letter(MODEL, eid, {"junk": "1"}, None, "not a job entry")
    assert broker.depth(MODEL) == (0, 0) and broker.r.xlen(key("dead")) == 1


def test_cancel_flags_and_published_models(broker):
    broker.cancel("gen-2")
    assert broker.cancelled(["gen-1", "gen-2", "gen-3"]) == {"gen-2"} and broker.cancelled([]) == set()
    broker.publish_model(MODEL, {"num_tokens": 64, "defaults": {"steps": 6}})
    assert broker.models() == {MODEL: {"num_tokens": 64, "defaults": {"steps": 6}}}
