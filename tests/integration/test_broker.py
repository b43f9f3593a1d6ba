"""server/broker.py against a real redis-server: jobs go to one worker and stay pending until
acknowledged, one final event per job however many workers run it, a dead worker's jobs are
reclaimed after its lease (by a worker restarted under its name too), suspects one at a time, a job
that outlives its deliveries is dead-lettered with a failure, and the Redis-wide counters and the
age of the oldest queued job say so."""

from __future__ import annotations

import time

import pytest

from vqdiff.model.sampling.params import GenerationParams
from vqdiff.server.broker import FINISHED_TTL_S, GROUP, ISOLATE_AFTER, Broker, key
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


def test_a_redis_that_lost_the_group_gets_it_again_at_the_next_claim(broker):
    broker.enqueue(job(0))  # the group is created once per process, not at every call
    broker.r.flushdb()  # a Redis restarted without its data
    eid = broker.enqueue(job(1))  # XADD makes a stream with no group
    assert broker.depth(MODEL) == (1, 0)  # it waits for a worker: queued, though no group exists yet
    (got, j), = broker.claim(MODEL, "a", count=10, block_ms=100)  # NOGROUP: created again, from id 0
    assert (got, j.id) == (eid, "gen-0001")


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
    broker.remember(job(7))
    broker.emit("gen-0007", Progress(1, 4, 0.25))
    assert broker.r.ttl(key("events", "gen-0007")) > FINISHED_TTL_S  # running: kept while it may run
    broker.finish("gen-0007", result(1))
    for k in ("events", "known"):  # finished: kept for resumes only, a few minutes
        assert 0 < broker.r.ttl(key(k, "gen-0007")) <= FINISHED_TTL_S
    assert broker.r.ttl(key("done", "gen-0007")) > FINISHED_TTL_S  # the exactly-once flag outlives them


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
    assert broker.stats(MODEL) == {"reclaimed": 3, "dead_lettered": 0}


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
    assert broker.stats(MODEL) == {"reclaimed": 2, "dead_lettered": 1}  # claimed from w1, then from w2


def test_a_worker_restarted_under_its_name_reclaims_what_its_predecessor_held(broker):
    ids = [broker.enqueue(job(i)) for i in range(3)]
    taken = broker.claim(MODEL, "a", count=2, block_ms=100)  # the first process of "a"; then it dies
    broker.heartbeat("a", 10, {"model": MODEL})  # the restarted "a": alive, running nothing yet
    assert broker.reclaim(MODEL, "b", min_idle_ms=0, max_deliveries=3) == []  # "a" has a lease
    assert broker.reclaim(MODEL, "a", 0, 3, held={eid for eid, _ in taken}) == []  # it runs them: not stale
    got = broker.reclaim(MODEL, "a", min_idle_ms=0, max_deliveries=3)
    assert [(eid, j.id, n) for eid, j, n in got] == [(eid, j.id, 2) for eid, j in taken]
    (third,) = broker.claim(MODEL, "a", count=1, block_ms=100)
    assert third[0] == ids[2]
    assert broker.reclaim(MODEL, "a", 0, 3, held={eid for eid, _ in taken} | {ids[2]}) == []
    consumers = {c["name"].decode(): c["pending"] for c in broker.r.xinfo_consumers(key("jobs", MODEL), "workers")}
    assert consumers == {"a": 3}  # its own consumer is never dropped
    assert broker.stats(MODEL) == {"reclaimed": 2, "dead_lettered": 0}


def test_suspects_are_reclaimed_one_at_a_time(broker):
    assert ISOLATE_AFTER == 2
    ids = [broker.enqueue(job(i)) for i in range(3)]
    broker.claim(MODEL, "w1", count=3, block_ms=100)  # delivery 1; w1 dies
    assert len(broker.reclaim(MODEL, "w2", 0, max_deliveries=3)) == 3  # delivery 2, together; w2 dies
    for w in ("w3", "w4", "w6"):
        broker.heartbeat(w, 10, {"model": MODEL})
    assert broker.reclaim(MODEL, "w3", 0, 3, suspect_ok=False) == []  # w3 runs a suspect already
    (eid, _, n), = broker.reclaim(MODEL, "w3", 0, max_deliveries=3)  # delivery 3: suspects, the oldest
    assert (eid, n) == (ids[0], 3)
    (eid, _, n), = broker.reclaim(MODEL, "w4", 0, max_deliveries=3)  # one per call, whoever asks
    assert (eid, n) == (ids[1], 3)
    fresh = broker.enqueue(job(7))
    broker.claim(MODEL, "w5", count=1, block_ms=100)  # w5 dies holding a fresh job
    got = broker.reclaim(MODEL, "w6", 0, 3)  # not a suspect: taken besides the suspect
    assert sorted((eid, n) for eid, _, n in got) == sorted([(ids[2], 3), (fresh, 2)])
    assert broker.stats(MODEL) == {"reclaimed": 7, "dead_lettered": 0}


def test_jobs_past_their_deliveries_are_dead_lettered_together_and_counted(broker):
    for i in range(3):
        broker.enqueue(job(i))
    broker.claim(MODEL, "w1", count=3, block_ms=100)
    assert broker.reclaim(MODEL, "w2", 0, max_deliveries=1) == []  # delivery 2 > 1: all three, in one call
    assert broker.r.xlen(key("dead")) == 3 and broker.depth(MODEL) == (0, 0)
    assert broker.stats(MODEL) == {"reclaimed": 3, "dead_lettered": 3}
    assert broker.stats("other") == {"reclaimed": 0, "dead_lettered": 0}  # per model; 0 when never counted
    for i in range(3):
        (_, final), = broker.events(job(i).id)
        assert isinstance(final, Failure) and "could not be served" in final.message


def test_a_dead_letter_keeps_an_answer_already_stored(broker):
    j = job(5)
    eid = broker.enqueue(j)
    broker.claim(MODEL, "w1", count=1, block_ms=100)
    assert broker.finish(j.id, result(5), worker="w1")  # w1 stored the answer, died before its ack
    broker.dead_letter(MODEL, eid, j.to_fields(), j, "test")
    assert [type(e) for _, e in broker.events(j.id)] == [Result]
    assert broker.depth(MODEL) == (0, 0) and broker.stats(MODEL)["dead_lettered"] == 1


def test_the_oldest_queued_job_s_age_counts_only_jobs_not_yet_delivered(broker):
    assert broker.oldest_queued_s(MODEL) == 0.0  # no stream
    broker.r.xadd(key("jobs", MODEL), job(0).to_fields(), id="1000-0")  # a stream with no group yet
    assert broker.oldest_queued_s(MODEL, now=3.5) == 2.5
    broker.r.delete(key("jobs", MODEL))
    broker.ensure_group(MODEL)
    assert broker.oldest_queued_s(MODEL) == 0.0  # an empty stream
    for i, ms in enumerate((10_000, 12_500, 13_000)):
        broker.r.xadd(key("jobs", MODEL), job(i).to_fields(), id=f"{ms}-0")
    assert broker.oldest_queued_s(MODEL, now=20.0) == 10.0
    (first,) = broker.claim(MODEL, "a", count=1, block_ms=100)  # delivered, pending: no longer queued
    assert broker.oldest_queued_s(MODEL, now=20.0) == 7.5
    broker.ack(MODEL, first[0])
    broker.claim(MODEL, "a", count=2, block_ms=100)
    assert broker.oldest_queued_s(MODEL, now=20.0) == 0.0  # all delivered
    eid = broker.enqueue(job(9))  # Redis's clock
    age = broker.oldest_queued_s(MODEL)
    assert 0.0 <= age < 1.0 and broker.oldest_queued_s(MODEL, now=int(eid.split("-")[0]) / 1000 + 4) == 4.0
    assert broker.oldest_queued_s(MODEL, now=0.0) == 0.0  # never negative


def test_an_entry_that_is_not_a_job_comes_back_as_none(broker):
    broker.ensure_group(MODEL)
    broker.r.xadd(key("jobs", MODEL), {"junk": "1"})
    (eid, j), = broker.claim(MODEL, "a", count=1, block_ms=100)
    assert j is None
    broker.dead_letter(MODEL, eid, {"junk": "1"}, None, "not a job entry")
    assert broker.depth(MODEL) == (0, 0) and broker.r.xlen(key("dead")) == 1
    assert broker.stats(MODEL) == {"reclaimed": 0, "dead_lettered": 1}


def test_cancel_flags_and_published_models(broker):
    broker.cancel("gen-2")
    assert broker.cancelled(["gen-1", "gen-2", "gen-3"]) == {"gen-2"} and broker.cancelled([]) == set()
    broker.publish_model(MODEL, {"num_tokens": 64, "defaults": {"steps": 6}})
    assert broker.models() == {MODEL: {"num_tokens": 64, "defaults": {"steps": 6}}}


def test_stopped_workers_that_hold_nothing_leave_the_group(broker):
    for i in range(3):
        broker.enqueue(job(i))
    broker.claim(MODEL, "holder", count=1, block_ms=50)  # holds a job, no lease: reclaim's business
    (eid, _), = broker.claim(MODEL, "stopped", count=1, block_ms=50)
    broker.ack(MODEL, eid)  # it finished its job and stopped: holds nothing, no lease
    broker.heartbeat("live", 30.0, {"model": MODEL})
    (eid, _), = broker.claim(MODEL, "live", count=1, block_ms=50)
    broker.ack(MODEL, eid)  # holds nothing but lives
    names = lambda: sorted(c["name"].decode() for c in broker.r.xinfo_consumers(key("jobs", MODEL), GROUP))  # noqa: E731
    assert broker.forget_idle(MODEL, min_idle_ms=60_000) == []  # none idle that long yet
    assert broker.forget_idle(MODEL, min_idle_ms=0) == ["stopped"]
    assert names() == ["holder", "live"]
