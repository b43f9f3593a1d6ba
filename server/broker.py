"""Redis Streams between API nodes and GPU workers: the job queue, each job's events, worker leases,
reclaiming a dead worker's jobs, dead letters. Redis >= 6.2 (XAUTOCLAIM-era stream commands).

Keys (``vqdiff:`` prefix):

- ``jobs:{model}``: the stream of jobs; consumer group ``workers`` gives each job to one worker,
  and it stays in that worker's pending list until the worker acknowledges it, which it does only
  after the job's final event is stored (at-least-once execution).
- ``events:{job}``: the job's events (progress, then one result or failure), capped at
  ``EVENTS_MAX`` entries and expiring ``EVENTS_TTL_S`` after the last write. Entry ids are the SSE
  event ids: a client resumes after the last id it saw.
- ``done:{job}``: set, in one script with the final event, by the first worker to finish the job.
  A re-run of a reclaimed job finds it set and writes nothing: exactly one answer.
- ``cancel:{job}``: set by an API node whose client went away; workers poll it between steps.
- ``alive:{worker}``: the worker's lease (its capacity as JSON), refreshed every lease / 3. A worker
  whose lease expired is dead: another worker claims its pending jobs.
- ``dead``: jobs delivered ``max_deliveries`` times without finishing, with the reason.
- ``models``: hash, model name -> what its workers publish (config, defaults).
- ``known:{job}``: set by the API node that enqueued the job (its model), so that any API node can
  tell a job whose events have not begun from one that never existed.
- ``resumes:{job}``: how many times a client resumed the job's events; an API node whose client went
  away cancels the job only if nobody resumed it in the meantime.
"""

from __future__ import annotations

import json
import logging

import redis

from vqdiff.server.jobs import Job, decode_event, event_fields
from vqdiff.server.request import Event, Failure, Status

log = logging.getLogger("vqdiff.broker")

PREFIX = "vqdiff:"
GROUP = "workers"
EVENTS_MAX = 2000  # entries kept per job: previews of a 1000-step request at most every step
EVENTS_TTL_S = 3600  # a finished job's events stay this long for clients that resume

# SET done NX and XADD the final event as one step: a worker dying between the two would otherwise
# leave a job marked done that no client ever hears of
_FINISH = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'kind', ARGV[4], 'data', ARGV[5])
  redis.call('EXPIRE', KEYS[2], ARGV[2])
  return id
end
return false
"""


def key(*parts: str) -> str:
    return PREFIX + ":".join(parts)


class Broker:
    def __init__(self, url: str, client: redis.Redis | None = None):
        self.url = url
        self.r = client or redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
        self._finish = self.r.register_script(_FINISH)

    # -- models and workers ---------------------------------------------------------------------------

    def publish_model(self, name: str, info: dict) -> None:
        self.r.hset(key("models"), name, json.dumps(info))

    def models(self) -> dict[str, dict]:
        return {k.decode(): json.loads(v) for k, v in self.r.hgetall(key("models")).items()}

    def heartbeat(self, worker: str, lease_s: float, state: dict) -> None:
        """Renew ``worker``'s lease; ``state`` (its model and free rows) is what the API reads."""
        self.r.set(key("alive", worker), json.dumps(state), px=max(1, int(lease_s * 1000)))

    def retire(self, worker: str) -> None:
        """End the lease now (a draining worker hands its unfinished jobs back at once)."""
        self.r.delete(key("alive", worker))

    def workers(self) -> dict[str, dict]:
        """Live workers and their last published state."""
        names = [k.decode().removeprefix(key("alive", "")) for k in self.r.scan_iter(key("alive", "*"), count=500)]
        states = self.r.mget([key("alive", n) for n in names]) if names else []
        return {n: json.loads(s) for n, s in zip(names, states) if s is not None}

    # -- jobs -----------------------------------------------------------------------------------------

    def ensure_group(self, model: str) -> None:
        try:
            self.r.xgroup_create(key("jobs", model), GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def enqueue(self, job: Job) -> str:
        self.ensure_group(job.model)
        return self.r.xadd(key("jobs", job.model), job.to_fields()).decode()

    def claim(self, model: str, worker: str, count: int, block_ms: int) -> list[tuple[str, Job | None]]:
        """Up to ``count`` new jobs for ``worker`` (waits up to ``block_ms`` for the first). An entry
        that is not a job comes back as (id, None): the caller dead-letters it."""
        self.ensure_group(model)
        got = self.r.xreadgroup(GROUP, worker, {key("jobs", model): ">"}, count=count, block=block_ms)
        return [(eid.decode(), _job(fields)) for _, entries in got for eid, fields in entries]

    def ack(self, model: str, entry_id: str) -> None:
        """The job's final event is stored: drop it from the pending list and the stream."""
        p = self.r.pipeline()
        p.xack(key("jobs", model), GROUP, entry_id)
        p.xdel(key("jobs", model), entry_id)
        p.execute()

    def reclaim(self, model: str, worker: str, min_idle_ms: int, max_deliveries: int) -> list[tuple[str, Job, int]]:
        """Claim for ``worker`` the pending jobs of workers whose lease expired: (id, job, deliveries).
        A job delivered more than ``max_deliveries`` times goes to the dead-letter stream and its
        client gets a failure. ``min_idle_ms`` keeps two reclaiming workers from taking the same job
        in turn (a claim resets the entry's idle time)."""
        stream = key("jobs", model)
        try:
            summary = self.r.xpending(stream, GROUP)
        except redis.ResponseError:  # no stream or group yet
            return []
        out = []
        for consumer in summary.get("consumers") or []:
            name = consumer["name"].decode() if isinstance(consumer["name"], bytes) else consumer["name"]
            if name == worker or self.r.exists(key("alive", name)):
                continue
            entries = self.r.xpending_range(stream, GROUP, min="-", max="+", count=1000, consumername=name)
            if not entries:
                continue
            delivered = {e["message_id"].decode(): e["times_delivered"] for e in entries}
            claimed = self.r.xclaim(stream, GROUP, worker, min_idle_ms, [e["message_id"] for e in entries])
            for eid, fields in claimed:
                eid = eid.decode()
                deliveries = delivered[eid] + 1
                job = _job(fields) if fields else None
                if job is None or deliveries > max_deliveries:
                    why = ("not a job entry" if job is None else
                           f"delivered {deliveries} times without finishing (every worker that ran it died)")
                    self.dead_letter(model, eid, fields or {}, job, why)
                else:
                    out.append((eid, job, deliveries))
            if len(claimed) == len(entries):
                self.r.xgroup_delconsumer(stream, GROUP, name)  # nothing of it is left pending
            log.warning("reclaimed %d jobs of %s (lease expired)", len(claimed), name)
        return out

    def dead_letter(self, model: str, entry_id: str, fields: dict, job: Job | None, why: str) -> None:
        self.r.xadd(key("dead"), {**{k: v for k, v in fields.items()}, "reason": why, "entry": entry_id,
                                  "model": model}, maxlen=10000, approximate=True)
        if job is not None:
            self.finish(job.id, Failure(Status.FINISHED_FAILED, f"this request could not be served: {why}"))
        self.ack(model, entry_id)

    def depth(self, model: str) -> tuple[int, int]:
        """(jobs not yet delivered to a worker, jobs delivered and not yet acknowledged)."""
        try:
            group = next(g for g in self.r.xinfo_groups(key("jobs", model)) if g["name"] in (GROUP, GROUP.encode()))
        except (redis.ResponseError, StopIteration):
            return 0, 0
        return int(group.get("lag") or 0), int(group.get("pending") or 0)

    # -- events ---------------------------------------------------------------------------------------

    def emit(self, job_id: str, event: Event, attempt: int = 1) -> str:
        """A progress event (a final one goes through ``finish``)."""
        p = self.r.pipeline()
        p.xadd(key("events", job_id), event_fields(event, attempt), maxlen=EVENTS_MAX, approximate=True)
        p.expire(key("events", job_id), EVENTS_TTL_S)
        return p.execute()[0].decode()

    def finish(self, job_id: str, event: Event, worker: str = "") -> bool:
        """Store the job's final event unless one is stored already; True if this call stored it."""
        f = event_fields(event)
        done = self._finish(keys=[key("done", job_id), key("events", job_id)],
                            args=[worker or "-", EVENTS_TTL_S, EVENTS_MAX, f["kind"], f["data"]])
        return done is not None

    def events(self, job_id: str, after: str = "0", block_ms: int | None = None) -> list[tuple[str, Event]]:
        """The job's events after entry id ``after`` (waits up to ``block_ms`` when there are none)."""
        got = self.r.xread({key("events", job_id): after}, block=block_ms, count=100)
        return [(eid.decode(), decode_event(fields)) for _, entries in got for eid, fields in entries]

    def follow(self, after: dict[str, str], block_ms: int | None = None) -> list[tuple[str, str, Event]]:
        """The events of several jobs at once, each after its own entry id: (job, entry id, event).
        Waits up to ``block_ms`` when there are none."""
        if not after:
            return []
        got = self.r.xread({key("events", j): a for j, a in after.items()}, block=block_ms, count=100)
        prefix = key("events", "")
        return [(stream.decode().removeprefix(prefix), eid.decode(), decode_event(fields))
                for stream, entries in got for eid, fields in entries]

    def last_event(self, job_id: str) -> tuple[str, Event] | None:
        got = self.r.xrevrange(key("events", job_id), count=1)
        return (got[0][0].decode(), decode_event(got[0][1])) if got else None

    def remember(self, job: Job) -> None:
        self.r.set(key("known", job.id), job.model, ex=EVENTS_TTL_S)

    def known(self, job_id: str) -> bool:
        return bool(self.r.exists(key("known", job_id), key("events", job_id)))

    def done(self, job_id: str) -> bool:
        return bool(self.r.exists(key("done", job_id)))

    def resumed(self, job_id: str) -> int:
        """Count one more resume of the job's events; the count after it."""
        p = self.r.pipeline()
        p.incr(key("resumes", job_id))
        p.expire(key("resumes", job_id), EVENTS_TTL_S)
        return int(p.execute()[0])

    def resumes(self, job_id: str) -> int:
        return int(self.r.get(key("resumes", job_id)) or 0)

    def ping(self) -> bool:
        return bool(self.r.ping())

    # -- cancellation ---------------------------------------------------------------------------------

    def cancel(self, job_id: str) -> None:
        self.r.set(key("cancel", job_id), 1, ex=EVENTS_TTL_S)

    def cancelled(self, job_ids: list[str]) -> set[str]:
        if not job_ids:
            return set()
        flags = self.r.mget([key("cancel", j) for j in job_ids])
        return {j for j, f in zip(job_ids, flags) if f is not None}


def _job(fields: dict) -> Job | None:
    try:
        return Job.from_fields(fields)
    except ValueError:
        return None
