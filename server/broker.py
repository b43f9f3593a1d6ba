"""Redis Streams between API nodes and GPU workers: the job queue, each job's events, worker leases,
reclaiming a dead worker's jobs, dead letters. Redis >= 6.2 (XAUTOCLAIM-era stream commands).

Keys (``vqdiff:`` prefix):

- ``jobs:{model}``: the stream of jobs; consumer group ``workers`` gives each job to one worker,
  and it stays in that worker's pending list until the worker acknowledges it, which it does only
  after the job's final event is stored (at-least-once execution).
- ``events:{job}``: the job's events (progress, then one result or failure), capped at
  ``EVENTS_MAX`` entries and expiring ``EVENTS_TTL_S`` after the last write, ``FINISHED_TTL_S``
  once the final event is stored (``known:`` with them). Entry ids are the SSE event ids: a client
  resumes after the last id it saw.
- ``done:{job}``: set, in one script with the final event, by the first worker to finish the job.
  A re-run of a reclaimed job finds it set and writes nothing: exactly one answer.
- ``cancel:{job}``: set by an API node whose client went away; workers poll it between steps.
- ``alive:{worker}``: the worker's lease (its capacity as JSON), refreshed every lease / 3. A worker
  whose lease expired is dead: another worker claims its pending jobs. A worker restarted under the
  same name claims its predecessor's pending jobs itself (those it does not run are stale).
- ``dead``: jobs delivered ``max_deliveries`` times without finishing, with the reason.
- ``stats``: hash of Redis-wide counters per model: ``reclaimed:{model}`` (jobs claimed from a dead
  worker), ``dead_lettered:{model}`` (jobs moved to ``dead``).
- ``models``: hash, model name -> what its workers publish (config, defaults).
- ``known:{job}``: set by the API node that enqueued the job (its model), so that any API node can
  tell a job whose events have not begun from one that never existed.
- ``resumes:{job}``: how many times a client resumed the job's events; an API node whose client went
  away cancels the job only if nobody resumed it in the meantime.
"""

from __future__ import annotations

import json
import logging
import time

import redis

from vqdiff.server.jobs import Job, decode_event, event_fields
from vqdiff.server.request import Event, Failure, Status

log = logging.getLogger("vqdiff.broker")

PREFIX = "vqdiff:"
GROUP = "workers"
EVENTS_MAX = 2000  # entries kept per job: previews of a 1000-step request at most every step
EVENTS_TTL_S = 3600  # a job's keys expire this long after its last write (a job cannot run longer)
# a finished job's events (previews included) stay this long for clients that resume: they are most
# of what Redis holds (a streamed ITHQ image writes ~1.5 MB of previews: docs/BENCHMARKS.md)
FINISHED_TTL_S = 300
# deliveries: a pending job delivered this many times already, each time to a worker that died or gave
# it back, is a suspect; a worker holds at most one suspect at a time (``reclaim``)
ISOLATE_AFTER = 2

# SET done NX and XADD the final event as one step: a worker dying between the two would otherwise
# leave a job marked done that no client ever hears of
# KEYS: done, events, known; ARGV: worker, done TTL, EVENTS_MAX, kind, data, finished TTL
_FINISH = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'kind', ARGV[4], 'data', ARGV[5])
  redis.call('EXPIRE', KEYS[2], ARGV[6])
  redis.call('EXPIRE', KEYS[3], ARGV[6])
  return id
end
return false
"""

# XCLAIM the given entries of a dead (or earlier same-name) consumer and count them, as one step; then,
# if that consumer is not our own name, holds nothing more and has no lease, drop it from the group.
# Checked here, not by the caller: a same-name worker restarting in between would otherwise have the
# entries it just read deleted with the consumer (lost: past last-delivered-id, never delivered again)
# KEYS: stream, stats, alive:{consumer}; ARGV: group, claimer, min_idle_ms, stats field, consumer, ids...
_RECLAIM = """
local got = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], unpack(ARGV, 6))
if #got > 0 then
  redis.call('HINCRBY', KEYS[2], ARGV[4], #got)
end
if ARGV[5] ~= ARGV[2] and redis.call('EXISTS', KEYS[3]) == 0
   and #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[5]) == 0 then
  redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[5])
end
return got
"""

# Drop a consumer that holds nothing, has no lease and has been idle for ARGV[3] ms, as one step: a
# worker starting under that name in between would have its first claims deleted with it
# KEYS: stream, alive:{consumer}; ARGV: group, consumer, min_idle_ms
_FORGET = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return 0 end
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local name, idle
  for i = 1, #c, 2 do
    if c[i] == 'name' then name = c[i + 1] elseif c[i] == 'idle' then idle = c[i + 1] end
  end
  if name == ARGV[2] then
    if idle < tonumber(ARGV[3]) then return 0 end
    return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2]) + 1
  end
end
return 0
"""


def key(*parts: str) -> str:
    return PREFIX + ":".join(parts)


def suspect(deliveries: int) -> bool:
    """Whether a job on its ``deliveries``-th delivery is a suspect (see ``ISOLATE_AFTER``)."""
    return deliveries > ISOLATE_AFTER


class Broker:
    def __init__(self, url: str, client: redis.Redis | None = None):
        self.url = url
        self.r = client or redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
        self._finish = self.r.register_script(_FINISH)
        self._reclaim = self.r.register_script(_RECLAIM)
        self._forget = self.r.register_script(_FORGET)
        self._grouped: set[str] = set()  # models whose job stream and group this process created or found

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
        """Create the model's job stream and group unless they exist. Once per model and process
        (``_grouped``); a Redis that lost them answers a claim NOGROUP, and ``claim`` creates them
        again (from id 0: the jobs enqueued meanwhile are delivered)."""
        try:
            self.r.xgroup_create(key("jobs", model), GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._grouped.add(model)

    def enqueue(self, job: Job) -> str:
        if job.model not in self._grouped:
            self.ensure_group(job.model)
        return self.r.xadd(key("jobs", job.model), job.to_fields()).decode()

    def claim(self, model: str, worker: str, count: int, block_ms: int) -> list[tuple[str, Job | None]]:
        """Up to ``count`` new jobs for ``worker`` (waits up to ``block_ms`` for the first). An entry
        that is not a job comes back as (id, None): the caller dead-letters it."""
        if model not in self._grouped:
            self.ensure_group(model)
        try:
            got = self.r.xreadgroup(GROUP, worker, {key("jobs", model): ">"}, count=count, block=block_ms)
        except redis.ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            self.ensure_group(model)  # Redis lost the stream or its group
            got = self.r.xreadgroup(GROUP, worker, {key("jobs", model): ">"}, count=count, block=block_ms)
        return [(eid.decode(), _job(fields)) for _, entries in got for eid, fields in entries]

    def ack(self, model: str, entry_id: str) -> None:
        """The job's final event is stored: drop it from the pending list and the stream (one round
        trip; no MULTI: an XACK whose XDEL was lost leaves an entry nobody is given again)."""
        p = self.r.pipeline(transaction=False)
        _ack(p, model, entry_id)
        p.execute()

    def reclaim(self, model: str, worker: str, min_idle_ms: int, max_deliveries: int,
                held: frozenset[str] | set[str] = frozenset(), suspect_ok: bool = True) -> list[tuple[str, Job, int]]:
        """Claim for ``worker`` the pending jobs nobody runs: (id, job, deliveries). Those are the
        entries of workers whose lease expired, and ``worker``'s own entries not in ``held`` (the
        entry ids it runs): an earlier process of the same name died holding them, or a claim's reply
        was lost. A job delivered more than ``max_deliveries`` times goes to the dead-letter stream
        and its client gets a failure.

        Suspects (``suspect``: delivered ``ISOLATE_AFTER`` times already) are claimed one per call,
        and none unless ``suspect_ok`` (``worker`` runs no suspect now): a job that kills every
        worker that runs it then takes no other suspect down with it, and with ``max_deliveries`` >=
        ISOLATE_AFTER + 1 a job that only shared a worker with it is never dead-lettered. The other
        reclaimed jobs are claimed together: recovering from one lost worker stays one round trip.

        ``min_idle_ms`` keeps two reclaiming workers from taking the same job in turn (a claim resets
        the entry's idle time). Every job claimed counts in ``stats(model)["reclaimed"]``."""
        stream = key("jobs", model)
        try:
            summary = self.r.xpending(stream, GROUP)
        except redis.ResponseError:  # no stream or group yet
            return []
        out = []
        for consumer in summary.get("consumers") or []:
            name = _str(consumer["name"])
            if name == worker:
                if int(consumer["pending"]) <= len(held):
                    continue  # all of its own entries are runs (an entry acked since is gone)
            elif self.r.exists(key("alive", name)):
                continue
            entries = [e for e in self.r.xpending_range(stream, GROUP, min="-", max="+", count=1000,
                                                        consumername=name)
                       if _str(e["message_id"]) not in held and e["time_since_delivered"] >= min_idle_ms]
            take = []
            for e in entries:  # oldest first
                runs_again = e["times_delivered"] + 1 <= max_deliveries
                if runs_again and suspect(e["times_delivered"] + 1):
                    if not suspect_ok:
                        continue
                    suspect_ok = False
                take.append(e)
            if not take:
                continue
            delivered = {_str(e["message_id"]): e["times_delivered"] for e in take}
            claimed = self._reclaim(keys=[stream, key("stats"), key("alive", name)],
                                    args=[GROUP, worker, min_idle_ms, f"reclaimed:{model}", name, *delivered])
            for entry in claimed:
                if not entry:  # Redis < 7 answers a deleted entry with nil
                    continue
                eid, flat = _str(entry[0]), entry[1]
                fields = dict(zip(flat[::2], flat[1::2])) if flat else {}
                deliveries = delivered[eid] + 1
                job = _job(fields) if fields else None
                if job is None or deliveries > max_deliveries:
                    why = ("not a job entry" if job is None else
                           f"delivered {deliveries} times without finishing (every worker that ran it died)")
                    self.dead_letter(model, eid, fields, job, why)
                else:
                    out.append((eid, job, deliveries))
            if claimed:
                log.warning("reclaimed %d jobs of %s (%s)", len(claimed), name,
                            "left by an earlier process of this name" if name == worker else "its lease ended")
        return out

    def forget_idle(self, model: str, min_idle_ms: int) -> list[str]:
        """Remove from the group the consumers that hold no job, have no lease and were idle for
        ``min_idle_ms``: workers that stopped (each restart under a new name, e.g. a pod's, leaves one
        behind). Returns their names."""
        stream = key("jobs", model)
        try:
            consumers = self.r.xinfo_consumers(stream, GROUP)
        except redis.ResponseError:  # no stream or group
            return []
        gone = []
        for c in consumers:
            name = _str(c["name"])
            if int(c["pending"]) == 0 and int(c["idle"]) >= min_idle_ms and not self.r.exists(key("alive", name)):
                if self._forget(keys=[stream, key("alive", name)], args=[GROUP, name, min_idle_ms]):
                    gone.append(name)
        return gone

    def dead_letter(self, model: str, entry_id: str, fields: dict, job: Job | None, why: str) -> None:
        """Move the entry to the dead-letter stream, count it, answer its client with a failure (unless
        the job has an answer already) and acknowledge it: one transaction."""
        p = self.r.pipeline(transaction=True)
        p.xadd(key("dead"), {**{k: v for k, v in fields.items()}, "reason": why, "entry": entry_id, "model": model},
               maxlen=10000, approximate=True)
        p.hincrby(key("stats"), f"dead_lettered:{model}", 1)
        if job is not None:
            self._store_final(job.id, Failure(Status.FINISHED_FAILED, f"this request could not be served: {why}"),
                              "-", client=p)
        _ack(p, model, entry_id)
        p.execute()

    def stats(self, model: str) -> dict[str, int]:
        """Redis-wide counts for ``model`` (every API node reads the same): jobs claimed from dead
        workers (``reclaimed``; a job that then went to the dead letters counts here too) and jobs
        dead-lettered (``dead_lettered``). 0 for a count never incremented."""
        reclaimed, dead = self.r.hmget(key("stats"), [f"reclaimed:{model}", f"dead_lettered:{model}"])
        return {"reclaimed": int(reclaimed or 0), "dead_lettered": int(dead or 0)}

    def oldest_queued_s(self, model: str, now: float | None = None) -> float:
        """Seconds since the oldest job of ``model`` not yet delivered to any worker was enqueued (its
        entry id's milliseconds, Redis's clock), at ``now`` (wall-clock seconds, default time.time());
        0.0 when none is queued. Jobs delivered and pending do not count."""
        stream = key("jobs", model)
        group = self._group(model)
        if group is None:  # no stream; or no group, so nothing was delivered: every entry is queued
            start = "-"
        else:
            start = "(" + _str(group["last-delivered-id"])
        try:
            got = self.r.xrange(stream, min=start, max="+", count=1)
        except redis.ResponseError:
            return 0.0
        if not got:
            return 0.0
        enqueued_s = int(_str(got[0][0]).partition("-")[0]) / 1000
        return max(0.0, (time.time() if now is None else now) - enqueued_s)

    def _group(self, model: str) -> dict | None:
        """XINFO GROUPS' entry of ``GROUP`` on the model's stream; None without stream or group."""
        try:
            return next((g for g in self.r.xinfo_groups(key("jobs", model)) if _str(g["name"]) == GROUP), None)
        except redis.ResponseError:  # no such key
            return None

    def depth(self, model: str) -> tuple[int, int]:
        """(jobs not yet delivered to a worker, jobs delivered and not yet acknowledged), in one round
        trip. An acknowledged job is deleted from the stream (``ack``), so the undelivered ones are the
        stream's length less the pending ones: exact on Redis 6.2, whose XINFO GROUPS has no ``lag``,
        and on 7.x after deletions, where ``lag`` can be null."""
        p = self.r.pipeline(transaction=False)
        p.xlen(key("jobs", model))
        p.xinfo_groups(key("jobs", model))
        length, groups = p.execute(raise_on_error=False)
        if isinstance(length, Exception) or isinstance(groups, Exception):  # no stream yet
            return 0, 0
        group = next((g for g in groups if _str(g["name"]) == GROUP), None)
        pending = int(group.get("pending") or 0) if group is not None else 0
        return max(0, int(length) - pending), pending

    # -- events ---------------------------------------------------------------------------------------

    def emit(self, job_id: str, event: Event, attempt: int = 1) -> str:
        """A progress event (a final one goes through ``finish``)."""
        p = self.r.pipeline(transaction=False)
        p.xadd(key("events", job_id), event_fields(event, attempt), maxlen=EVENTS_MAX, approximate=True)
        p.expire(key("events", job_id), EVENTS_TTL_S)
        return p.execute()[0].decode()

    def finish(self, job_id: str, event: Event, worker: str = "") -> bool:
        """Store the job's final event unless one is stored already; True if this call stored it."""
        return self._store_final(job_id, event, worker or "-") is not None

    def _store_final(self, job_id: str, event: Event, worker: str, client=None):
        f = event_fields(event)
        return self._finish(keys=[key("done", job_id), key("events", job_id), key("known", job_id)],
                            args=[worker, EVENTS_TTL_S, EVENTS_MAX, f["kind"], f["data"], FINISHED_TTL_S],
                            client=client)

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

    def lost(self, job_ids: list[str]) -> set[str]:
        """The jobs of ``job_ids`` Redis no longer knows (neither the flag set at enqueue nor any
        event): a Redis that restarted without their data. One round trip."""
        if not job_ids:
            return set()
        p = self.r.pipeline(transaction=False)
        for j in job_ids:
            p.exists(key("known", j), key("events", j))
        return {j for j, n in zip(job_ids, p.execute()) if not n}

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


def _ack(p, model: str, entry_id: str) -> None:
    p.xack(key("jobs", model), GROUP, entry_id)
    p.xdel(key("jobs", model), entry_id)


def _str(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _job(fields: dict) -> Job | None:
    try:
        return Job.from_fields(fields)
    except ValueError:
        return None
