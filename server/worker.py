"""``vqdiff serve --role worker``: the engine with its model, fed by the Redis job stream of its
model (server/broker.py) instead of HTTP and gRPC.

Threads besides the engine's own:

- the loop: renews the lease every lease / 3 with the free rows; claims new jobs while the engine has
  free rows; every lease / 2 reclaims the jobs of workers whose lease expired, and its own pending
  entries that it does not run (left by an earlier process of the same name: a worker restarted
  under its name finishes them; ``Broker.reclaim``), at most one suspect at a time; every
  ``CANCEL_POLL_S`` reads the cancel flags of the jobs it runs and cancels them in the engine.
- the sender: writes each job's events to Redis in the order the engine emitted them, from a per-job
  outbox, so the engine never waits on Redis. The final event is stored (``broker.finish``) and only
  then is the job acknowledged: a worker that dies before that leaves the job pending, and another
  worker runs it again (at-least-once; the done flag keeps it to one answer).

A Redis outage does not stop the jobs running: the loop and the sender retry with a backoff of
``BACKOFF_S`` doubling up to ``BACKOFF_MAX_S``, logging once per outage, and the outboxes keep what
could not be written yet. Every lease lapsed while Redis was away, so once it answers again the loop
reclaims nothing for a lease and ``BACKOFF_MAX_S``: by then every live worker has renewed its lease,
and no running job is taken from its worker and run twice.

SIGTERM (or ``stop``): no more claims; running jobs get ``grace_s`` to finish and their answers are
written. Past the grace period the lease is ended at once (``broker.retire``) and the unfinished
jobs are left unacknowledged, for another worker to reclaim; the process exits 0.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import redis

from vqdiff.server.broker import Broker, key, suspect
from vqdiff.server.engine import Draining, Engine, QueueFull
from vqdiff.server.jobs import Job
from vqdiff.server.main import load, model_info
from vqdiff.server.request import Event, Failure, Progress, Request, Status
from vqdiff.server.settings import Settings

log = logging.getLogger("vqdiff.worker")

BLOCK_MS = 200  # a claim waits at most this long for a job: the loop stays responsive
CANCEL_POLL_S = 0.15  # about a step of a large batch: a cancelled job leaves the batch within it
BACKOFF_S, BACKOFF_MAX_S = 0.1, 2.0
FORGET_AFTER_LEASES = 10  # a stopped worker holding nothing leaves the consumer group after this many leases
FLUSH_S = 5.0  # at exit: how long the sender may take to write the answers it holds


@dataclass(eq=False)
class _Run:
    """One job this worker runs: its entry in the job stream, its engine request, its outbox."""

    job: Job
    entry: str
    attempt: int
    req: Request | None = None
    outbox: collections.deque = field(default_factory=collections.deque)  # events not yet written
    answered: bool = False  # the engine emitted the final event (its rows are free)
    stored: bool = False  # the final event is written (or another worker's was): only the ack is left
    cancelled: bool = False

    @property
    def rows(self) -> int:
        return 2 * self.job.n


class _Outage:
    """Backoff and one log line per Redis outage, for one thread."""

    def __init__(self, what: str, worker: Worker):
        self.what, self.worker, self.delay, self.down = what, worker, 0.0, False

    def ok(self) -> None:
        if self.down:
            log.warning("%s: Redis answers again", self.what)
        self.down, self.delay = False, 0.0
        self.worker.redis_ok_at = time.monotonic()

    def failed(self, e: Exception, stop: threading.Event) -> None:
        if not self.down:
            log.warning("%s: Redis is unreachable (%s); retrying", self.what, e)
        self.down = True
        self.delay = min(BACKOFF_MAX_S, self.delay * 2 or BACKOFF_S)
        stop.wait(self.delay)


def model_record(model, folder: Path, settings: Settings) -> dict:
    """What a worker publishes for its model: all an API node needs to validate and resolve a
    request without loading the model."""
    c = model.config.transformer
    return {**model_info(model, folder), "num_tokens": c.num_tokens, "num_timesteps": c.num_timesteps,
            "has_null": model.null_cond is not None, "generation_defaults": dict(model.generation_defaults or {}),
            "max_images": settings.max_images, "max_prompt_chars": settings.max_prompt_chars,
            "max_upload_bytes": settings.max_upload_bytes,
            "max_rows": settings.max_rows, "request_timeout_s": settings.request_timeout_s}


class Worker:
    def __init__(self, settings: Settings, model=None, folder: Path | None = None, broker: Broker | None = None):
        settings.check_role()
        if model is None:
            model, folder = load(settings)
        self.settings = settings
        self.record = model_record(model, Path(folder or "model"), settings)
        self.model = self.record["id"]
        self.name = settings.worker_name or f"{socket.gethostname()}-{os.getpid()}"
        self.engine = Engine(model, settings, model_name=self.model)
        if settings.warmup:  # before the model is published: a fault stops the start
            from vqdiff.server.warmup import warm_up

            warm_up(model, self.engine.forward)
        self.broker = broker or Broker(settings.redis_url)
        self.runs: dict[str, _Run] = {}  # job id -> run, until acknowledged
        self.backlog: list[_Run] = []  # claimed, refused by a full engine queue: submitted again later
        self.lock = threading.Condition()
        self.redis_ok_at = float("-inf")
        self.claiming = True
        self.abandoned = False  # past the grace period: what the engine still emits is not written
        self.stop_event = threading.Event()  # the loop stops
        self.sender_stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.http: ThreadingHTTPServer | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> Worker:
        self.engine.start()
        outage = _Outage("publish", self)
        while not self.stop_event.is_set():
            try:
                self.broker.publish_model(self.model, self.record)
                self.broker.ensure_group(self.model)
                self._heartbeat()
                outage.ok()
                break
            except redis.RedisError as e:
                outage.failed(e, self.stop_event)
        for target, name in ((self._loop, "vqdiff-worker-loop"), (self._send, "vqdiff-worker-sender")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        if self.settings.worker_port:
            self.http = _health_server(self, self.settings.host, self.settings.worker_port)
        log.info("worker %s serving %s (Redis %s, %d rows)", self.name, self.model, self.broker.url,
                 self.settings.max_rows)
        return self

    @property
    def ready(self) -> bool:
        return (self.engine.ready and self.claiming
                and time.monotonic() - self.redis_ok_at < self.settings.lease_s)

    def stop(self, grace_s: float | None = None, hurry: threading.Event | None = None) -> bool:
        """Stop claiming; let the running jobs finish within ``grace_s`` (default: the setting) and
        write their answers; then hand the rest back. True if nothing was left unfinished."""
        grace_s = self.settings.grace_s if grace_s is None else grace_s
        self.claiming = False
        self.engine.drain()
        end = time.monotonic() + grace_s
        while not self.engine.wait_idle(min(0.1, max(0.0, end - time.monotonic()))):
            if time.monotonic() >= end or (hurry is not None and hurry.is_set()):
                break
        with self.lock:
            self.abandoned = True
            left = [r for r in self.runs.values() if not r.answered] + self.backlog
        if left:
            log.warning("grace period over: handing %d unfinished jobs back (not acknowledged)", len(left))
        self.stop_event.set()
        self._threads[0].join()  # no heartbeat after the lease is ended
        try:
            self.broker.retire(self.name)  # the unfinished jobs are reclaimable now
        except redis.RedisError as e:
            log.warning("could not end the lease (%s): the jobs move when it expires", e)
        self.engine.shutdown(0.0)  # its failures of the unfinished jobs are dropped (abandoned)
        end = time.monotonic() + FLUSH_S
        with self.lock:  # the answers of finished jobs: written and acknowledged before exit
            while any(r.outbox for r in self.runs.values()) and time.monotonic() < end:
                self.lock.wait(0.05)
        self.sender_stop.set()
        with self.lock:
            self.lock.notify_all()
        self._threads[1].join()
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
        log.info("worker %s stopped", self.name)
        return not left

    # -- the loop ------------------------------------------------------------------------------------

    def free_rows(self) -> int:
        with self.lock:
            used = sum(r.rows for r in self.runs.values() if not r.answered)
        return self.settings.max_rows - used

    def _heartbeat(self) -> None:
        self.broker.heartbeat(self.name, self.settings.lease_s,
                              {"model": self.model, "max_rows": self.settings.max_rows, "free_rows": self.free_rows()})
        self.broker.publish_model(self.model, self.record)  # every beat: a Redis that lost its data learns it again

    def _loop(self) -> None:
        lease = self.settings.lease_s
        block_ms = max(1, min(BLOCK_MS, int(lease * 1000 / 6)))
        next_beat = next_reclaim = next_cancel = 0.0
        outage = _Outage("worker loop", self)
        while not self.stop_event.is_set():
            try:
                now = time.monotonic()
                if outage.down:  # the other workers' leases lapsed too: they renew them first
                    next_reclaim = max(next_reclaim, now + lease + BACKOFF_MAX_S)
                if now >= next_beat:
                    self._heartbeat()
                    next_beat = now + lease / 3
                if now >= next_cancel:
                    self._poll_cancels()
                    next_cancel = now + CANCEL_POLL_S
                if self.claiming and now >= next_reclaim:
                    next_reclaim = now + lease / 2
                    self._reclaim()
                self._retry_backlog()
                claimed = False
                while self.claiming and not self.backlog and self.free_rows() >= 2:
                    got = self.broker.claim(self.model, self.name, count=1, block_ms=None if claimed else block_ms)
                    if not got:
                        break
                    claimed = True
                    for eid, job in got:
                        if job is None:
                            self.broker.dead_letter(self.model, eid, {}, None, "not a job entry")
                        else:
                            self._run(eid, job, 1)
                    if time.monotonic() >= min(next_beat, next_cancel):
                        break
                outage.ok()
                if not claimed:
                    self.stop_event.wait(max(0.0, min(next_beat, next_cancel) - time.monotonic())
                                         if not self.claiming or self.free_rows() < 2 or self.backlog else 0.0)
            except redis.RedisError as e:
                outage.failed(e, self.stop_event)
            except Exception:  # a bug here must not stop the heartbeat of the jobs running
                log.exception("worker loop failed")
                self.stop_event.wait(BACKOFF_MAX_S)

    def _reclaim(self) -> None:
        """Take over the pending jobs nobody runs. What this worker holds is read first: only the loop
        adds runs, so an entry missing from ``held`` is not one of them (or was acked since)."""
        with self.lock:
            held = {r.entry for r in self.runs.values()}
            suspect_ok = not any(suspect(r.attempt) and not r.answered for r in self.runs.values())
        for eid, job, deliveries in self.broker.reclaim(self.model, self.name, int(self.settings.lease_s * 1000),
                                                        self.settings.max_deliveries, held, suspect_ok):
            self._run(eid, job, deliveries)
        self.broker.forget_idle(self.model, int(FORGET_AFTER_LEASES * self.settings.lease_s * 1000))

    def _run(self, entry: str, job: Job, attempt: int) -> None:
        if job.id in self.runs:  # already running here under another entry (a job enqueued twice)
            if self.runs[job.id].entry != entry:
                self.broker.ack(self.model, entry)  # the run holds its own entry: that one stays pending
            return
        if attempt > 1 and self.broker.r.exists(key("done", job.id)):  # another worker answered it
            self.broker.ack(self.model, entry)
            return
        run = _Run(job, entry, attempt)
        with self.lock:
            self.runs[job.id] = run
        self._submit(run)

    def _submit(self, run: _Run) -> None:
        run.req = run.job.request(lambda ev, run=run: self._emit(run, ev))
        try:
            self.engine.submit(run.req)
        except ValueError as e:  # a bad job: its answer is the reason
            self._emit(run, Failure(Status.FINISHED_FAILED, str(e)))
        except QueueFull:
            with self.lock:
                self.backlog.append(run)
        except Draining:  # stopping: left pending, another worker reclaims it
            with self.lock:
                self.runs.pop(run.job.id, None)

    def _retry_backlog(self) -> None:
        with self.lock:
            backlog, self.backlog = self.backlog, []
        for run in backlog:
            self._submit(run)

    def _poll_cancels(self) -> None:
        with self.lock:
            live = [r for r in self.runs.values() if not r.answered and not r.cancelled and r.req is not None]
        if not live:
            return
        flagged = self.broker.cancelled([r.job.id for r in live])
        for r in live:
            if r.job.id in flagged:
                r.cancelled = True
                self.engine.cancel(r.req)

    # -- events (engine and decode threads) and the sender -------------------------------------------

    def _emit(self, run: _Run, event: Event) -> None:
        with self.lock:
            if self.abandoned:
                return
            if not isinstance(event, Progress):
                run.answered = True
            run.outbox.append(event)
            self.lock.notify_all()

    def _send(self) -> None:
        outage = _Outage("event sender", self)
        while True:
            with self.lock:
                while not self.sender_stop.is_set() and not any(r.outbox for r in self.runs.values()):
                    self.lock.wait(0.5)
                if self.sender_stop.is_set():
                    return
                busy = [r for r in self.runs.values() if r.outbox]
            try:
                for run in busy:
                    self._flush(run)
                outage.ok()
            except redis.RedisError as e:
                outage.failed(e, self.sender_stop)

    def _flush(self, run: _Run) -> None:
        """Write ``run``'s outbox in order; the final event, then the ack, then the run is gone."""
        while run.outbox:
            event = run.outbox[0]
            if isinstance(event, Progress):
                self.broker.emit(run.job.id, event, run.attempt)
            else:
                if not run.stored:
                    if not self.broker.finish(run.job.id, event, self.name):
                        log.info("%s: already answered by another worker", run.job.id)
                    run.stored = True
                self.broker.ack(self.model, run.entry)
            with self.lock:
                run.outbox.popleft()
                if run.stored:
                    self.runs.pop(run.job.id, None)
                self.lock.notify_all()


def _health_server(worker: Worker, host: str, port: int) -> ThreadingHTTPServer:
    """``/healthz`` (the process answers), ``/readyz`` (the engine runs, the worker claims and Redis
    answered within a lease), ``/metrics`` (the engine's registry)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                self._send(200, b"ok\n", "text/plain")
            elif path == "/readyz":
                ok = worker.ready
                self._send(200 if ok else 503, b"ready\n" if ok else b"not ready\n", "text/plain")
            elif path == "/metrics":
                self._send(200, worker.engine.metrics.exposition(), "text/plain; version=0.0.4; charset=utf-8")
            else:
                self._send(404, b"not found\n", "text/plain")

        def _send(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # probes every few seconds: not worth a log line each
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="vqdiff-worker-http", daemon=True).start()
    return server


def serve_worker(settings: Settings) -> None:
    """The worker process: serve until SIGTERM / SIGINT, then drain (a second signal ends the grace
    period at once)."""
    worker = Worker(settings).start()
    stop, hurry = threading.Event(), threading.Event()

    def on_signal(signum, frame) -> None:
        if stop.is_set():
            log.warning("second signal: ending the grace period now")
            hurry.set()
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    while not stop.wait(0.5):
        pass
    log.info("draining: up to %g s for the running jobs", settings.grace_s)
    worker.stop(hurry=hurry)
