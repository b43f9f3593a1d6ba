"""The API role: the HTTP and gRPC front ends with no model, relaying requests to GPU workers
through Redis (server/broker.py).

``RemoteEngine`` has the interface the front ends use of ``Engine`` (``submit`` / ``cancel`` /
``ready`` / ``drain`` / ``wait_idle`` / ``shutdown`` / ``metrics`` / ``model`` / ``scheduler``), so
server/http_app.py, server/grpc_app.py and server/aio.py serve either. ``submit`` validates exactly
as the engine does (``engine.validate``, against the model and limits the workers published),
resolves the parameters with a fresh seed (so whichever worker runs the job, however many times,
draws the same image), and enqueues a ``Job``. One relay thread follows the event streams of every
request this node serves with one blocking XREAD and hands each event, with its Redis entry id, to
the request's ``emit``; the SSE stream sends that id so that a client can resume on any API node
(``follow``, ``GET /v1/generate/{id}/events``).

Refusals:

- invalid input: ValueError (422), before anything is enqueued;
- backpressure: ``QueueFull`` (429 + Retry-After) when ``max_waiting`` jobs of the model are already
  queued and not yet claimed by any worker. Workers claim only what fits their free rows, so those
  are exactly the requests "queued beyond the running batch": the same meaning ``max_waiting`` has
  in a single process, now summed over every worker of the model;
- Redis unreachable: ``Unavailable`` (503 + Retry-After); ``ready`` is False meanwhile.

A plain or gRPC client that goes away cancels its job at once (its worker frees the rows within a
step); an SSE client's job is cancelled only after ``cancel_delay_s`` and only if nobody resumed the
job's events in between (``Broker.resumed``): a stream cut by the network can be picked up again.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from types import SimpleNamespace

import redis
from prometheus_client import Counter, Gauge
from vqdiff.server.broker import Broker
from vqdiff.server.engine import timeout_s, validate
from vqdiff.server.jobs import Job
from vqdiff.server.main import Server
from vqdiff.server.metrics import Metrics
from vqdiff.server.request import Event, Failure, Request, Result, Status
from vqdiff.server.scheduler import Draining, QueueFull, Unavailable, UnknownRequest
from vqdiff.server.settings import Settings

log = logging.getLogger("vqdiff.remote")

BLOCK_MS = 100  # one XREAD waits this long: a request submitted meanwhile is read after it at the latest
READY_CACHE_S = 1.0  # readiness probes and gRPC health checks share one Redis round trip per second
DEADLINE_SLACK_S = 5.0  # past a job's deadline with no final event (no worker took it): fail it here
CANCEL_DELAY_S = 10.0  # a client that went away has this long to resume before its job is cancelled
RETRY_S = 0.5  # the relay's pause after a Redis error
# what server.main.model_info gives and GET /v1/models shows; the rest of what workers publish is limits
MODEL_FIELDS = ("id", "path", "image_size", "tokens", "codebook_size", "num_timesteps", "learnable_null",
                "parameters", "dtype", "device")


class RemoteModel:
    """What the front ends and ``default_params`` / ``request_params`` / ``validate`` read of a
    model, from what its workers published: ``config.transformer.{num_tokens, num_timesteps,
    mask_id, height, width, num_embed}``, ``config.image_size``, ``config.learnable_null``,
    ``generation_defaults``, ``null_cond`` (a truthy placeholder where the model has a learnable
    null condition, else None) and ``device`` ("remote")."""

    NULL = object()  # stands for the null condition's tensor: only ``is not None`` is asked of it

    def __init__(self, info: dict):
        tokens = info.get("tokens") or [None, None]
        transformer = SimpleNamespace(num_tokens=int(info["num_tokens"]), num_timesteps=int(info["num_timesteps"]),
                                      mask_id=info.get("mask_id"), height=tokens[0], width=tokens[1],
                                      num_embed=info.get("codebook_size"))
        has_null = bool(info.get("has_null", info.get("learnable_null", False)))
        self.config = SimpleNamespace(transformer=transformer, image_size=info.get("image_size"),
                                      learnable_null=info.get("learnable_null", has_null))
        self.generation_defaults: dict = dict(info.get("generation_defaults") or {})
        self.null_cond = self.NULL if has_null else None
        self.device = "remote"
        self.info = info


class RemoteMetrics(Metrics):
    """``Metrics`` plus what only the API sees: the model's queue in Redis and its workers, read at
    every scrape (``vqdiff_queue_depth``, ``vqdiff_jobs_pending``, ``vqdiff_workers``), and what this
    node did (``vqdiff_jobs_enqueued_total``, ``vqdiff_redis_errors_total``)."""

    def __init__(self, model_name: str, broker: Broker):
        super().__init__(model_name, "cpu")
        r, m = self.registry, ("model_name",)
        self.broker = broker
        self.queue_depth = Gauge("vqdiff_queue_depth", "Jobs in Redis not yet claimed by a worker", m, registry=r)
        self.jobs_pending = Gauge("vqdiff_jobs_pending", "Jobs claimed by a worker and not yet acknowledged", m,
                                  registry=r)
        self.workers = Gauge("vqdiff_workers", "Live workers serving the model", m, registry=r)
        self.enqueued = Counter("vqdiff_jobs_enqueued", "Jobs this API node enqueued", m, registry=r)
        self.redis_errors = Counter("vqdiff_redis_errors", "Redis calls of this API node that failed", m, registry=r)

    def exposition(self) -> bytes:
        try:
            queued, pending = self.broker.depth(self.model_name)
            workers = sum(1 for w in self.broker.workers().values() if w.get("model") == self.model_name)
            self.label(self.queue_depth).set(queued)
            self.label(self.jobs_pending).set(pending)
            self.label(self.workers).set(workers)
        except redis.RedisError:
            self.label(self.redis_errors).inc()
        return super().exposition()


@dataclass(eq=False)
class _Follower:
    req: Request
    after: str  # the last entry id delivered
    deadline: float  # monotonic
    resumes: int = 0  # the job's resume count when this follower started: a later resume keeps the job


def _after(a: str, b: str) -> bool:
    """Whether Redis entry id ``a`` comes after ``b`` ("0" is before every id)."""
    def parts(x: str) -> tuple[int, int]:
        ms, _, seq = x.partition("-")
        return int(ms), int(seq or 0)

    return parts(a) > parts(b)


class _Relays:
    """What main.py logs of ``engine.scheduler`` while draining: the requests this node still relays
    (all ``running``: their queue lives in Redis) and none ``waiting``."""

    def __init__(self, engine: RemoteEngine):
        self._engine = engine
        self.waiting: list[Request] = []

    @property
    def running(self) -> list[Request]:
        with self._engine._cond:
            return [f.req for f in self._engine._followers]

    @property
    def draining(self) -> bool:
        return self._engine._draining


class RemoteEngine:
    def __init__(self, settings: Settings, broker: Broker, model_name: str, info: dict | None = None,
                 cancel_delay_s: float = CANCEL_DELAY_S, block_ms: int = BLOCK_MS):
        self.settings, self.broker, self.model_name = settings, broker, model_name
        self.info = info if info is not None else broker.models()[model_name]
        self.model = RemoteModel(self.info)
        # the workers' limits (what they will accept), else this node's settings
        self.limits = SimpleNamespace(
            max_images=int(self.info.get("max_images") or settings.max_images),
            max_prompt_chars=int(self.info.get("max_prompt_chars") or settings.max_prompt_chars),
            request_timeout_s=min(float(self.info.get("request_timeout_s") or settings.request_timeout_s),
                                  settings.request_timeout_s))
        self.metrics = RemoteMetrics(model_name, broker)
        self.scheduler = _Relays(self)
        self.cancel_delay_s, self.block_ms = cancel_delay_s, block_ms
        self._cond = threading.Condition()
        self._followers: list[_Follower] = []
        self._cancels: list[tuple[float, str, int | None]] = []  # (due, job id, resumes when the client left)
        self._draining = False
        self._stop = False
        self._thread: threading.Thread | None = None
        self._ready_at, self._ready = 0.0, False

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> RemoteEngine:
        self._thread = threading.Thread(target=self._loop, name="vqdiff-relay", daemon=True)
        self._thread.start()
        return self

    @property
    def ready(self) -> bool:
        """Not draining, Redis answers, and at least one live worker serves the model."""
        if self._draining or self._thread is None or not self._thread.is_alive():
            return False
        now = time.monotonic()
        if now - self._ready_at >= READY_CACHE_S:
            try:
                self.broker.ping()
                self._ready = any(w.get("model") == self.model_name for w in self.broker.workers().values())
            except redis.RedisError:
                self._ready = False
            self._ready_at = now
        return self._ready

    def drain(self) -> None:
        with self._cond:
            self._draining = True

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until this node relays no request any more; False on timeout."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._followers:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def shutdown(self, grace_s: float = 0.0) -> None:
        """Refuse new requests, let relayed ones finish for up to ``grace_s``, answer the rest
        unavailable (their jobs go on: a client can resume them on another API node), and stop."""
        self.drain()
        self.wait_idle(grace_s)
        with self._cond:
            self._stop = True
            gone, self._followers = self._followers, []
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        for f in gone:
            self._deliver(f, Failure(Status.FINISHED_UNAVAILABLE,
                                     f"this API node shut down before the request finished; it still runs: "
                                     f"resume it with GET /v1/generate/{f.req.id}/events"), None)

    # -- API side ----------------------------------------------------------------------------------

    def submit(self, req: Request) -> Request:
        """Validate, enqueue, follow. Raises ValueError (bad input), QueueFull, Draining or
        Unavailable (Redis is down); in every case nothing is enqueued."""
        if self._draining:
            self.metrics.count("rejected")
            raise Draining("the server is shutting down")
        try:
            validate(req, self.limits, self.model)
        except ValueError:
            self.metrics.count("invalid")
            raise
        timeout = timeout_s(req, self.limits)
        req.deadline = req.arrival + timeout
        try:
            queued, _ = self.broker.depth(self.model_name)
            if queued >= self.settings.max_waiting:
                self.metrics.count("rejected")
                raise QueueFull(f"{queued} requests are waiting for a worker (max_waiting={self.settings.max_waiting})")
            job = Job.of(req, self.model_name, timeout)
            self.broker.remember(job)
            self.broker.enqueue(job)
        except redis.RedisError as e:
            self._redis_error(e)
            self.metrics.count("unavailable")
            raise Unavailable(f"the job queue cannot be reached ({type(e).__name__})") from None
        self.metrics.label(self.metrics.enqueued).inc()
        self._add(_Follower(req, "0", time.monotonic() + timeout + DEADLINE_SLACK_S))
        return req

    def follow(self, req: Request, after: str = "0") -> Request:
        """Relay the events of the existing request ``req.id`` after entry id ``after``. A finished
        request whose events the client has all seen gets its final event again. Raises
        UnknownRequest, ValueError (a malformed id), Draining or Unavailable."""
        if self._draining:
            raise Draining("the server is shutting down")
        try:
            _after(after, "0")
        except ValueError:
            raise ValueError(f"Last-Event-ID: {after!r} is not an event id of this server") from None
        try:
            if not self.broker.known(req.id):
                raise UnknownRequest(f"no request {req.id!r} is known (its events expire an hour after it finished)")
            resumes = self.broker.resumed(req.id)
            last = self.broker.last_event(req.id) if self.broker.done(req.id) else None
        except redis.RedisError as e:
            self._redis_error(e)
            raise Unavailable(f"the job queue cannot be reached ({type(e).__name__})") from None
        if last is not None and not _after(last[0], after):  # finished, and the client saw everything
            req.emit(last[1], last[0])
            return req
        self._add(_Follower(req, after, time.monotonic() + self.limits.request_timeout_s + DEADLINE_SLACK_S, resumes))
        return req

    def cancel(self, req: Request) -> None:
        """The client went away: stop relaying now and cancel the job, at once when its client cannot
        come back (a plain request, gRPC), else (an SSE stream) after ``cancel_delay_s`` unless a
        client resumed it meanwhile."""
        with self._cond:
            mine = [f for f in self._followers if f.req is req]
            if not mine:
                return  # finished already
            self._followers = [f for f in self._followers if f.req is not req]
            self._publish()
            delay = self.cancel_delay_s if req.resumable else 0.0
            self._cancels.append((time.monotonic() + delay, req.id, mine[0].resumes))
            self._cond.notify_all()

    # -- the relay (its own thread) ----------------------------------------------------------------

    def _add(self, f: _Follower) -> None:
        with self._cond:
            self._followers.append(f)
            self._publish()
            self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._followers and not self._cancels:
                    self._cond.wait(1.0)
                if self._stop:
                    return
                after: dict[str, str] = {}
                for f in self._followers:
                    a = after.get(f.req.id)
                    after[f.req.id] = f.after if a is None or _after(a, f.after) else a
            try:
                self._due_cancels()
                got = self.broker.follow(after, self.block_ms) if after else []
            except redis.RedisError as e:
                self._redis_error(e)
                time.sleep(RETRY_S)
                got = []
            if not after:
                time.sleep(self.block_ms / 1000)
            for job_id, eid, event in got:
                with self._cond:
                    due = [f for f in self._followers if f.req.id == job_id and _after(eid, f.after)]
                    for f in due:
                        f.after = eid
                for f in due:
                    self._deliver(f, event, eid)
            self._expire()

    def _deliver(self, f: _Follower, event: Event, eid: str | None) -> None:
        final = isinstance(event, (Result, Failure))
        if final:
            with self._cond:
                if f in self._followers:
                    self._followers.remove(f)
                self._publish()
                self._cond.notify_all()
            if isinstance(event, Result):
                self.metrics.count("success")
                self.metrics.label(self.metrics.images).inc(len(event.images))
                self.metrics.label(self.metrics.latency).observe(time.monotonic() - f.req.arrival)
            else:
                self.metrics.count(event.status.outcome)
        try:
            f.req.emit(event, eid)
        except Exception:  # a client's sink must never take the relay down
            log.exception("%s: emit failed", f.req.id)

    def _expire(self) -> None:
        """Fail the requests past their deadline with no final event (no worker took the job)."""
        now = time.monotonic()
        with self._cond:
            late = [f for f in self._followers if now >= f.deadline]
        for f in late:
            try:
                self.broker.cancel(f.req.id)  # a worker that claims it late drops it
            except redis.RedisError as e:
                self._redis_error(e)
            self._deliver(f, Failure(Status.FINISHED_DEADLINE, "the request's deadline passed before a worker "
                                                               "finished it"), None)

    def _due_cancels(self) -> None:
        now = time.monotonic()
        with self._cond:
            due = [c for c in self._cancels if c[0] <= now]
            self._cancels = [c for c in self._cancels if c[0] > now]
        for i, (_, job_id, resumes) in enumerate(due):
            try:
                if resumes is None or self.broker.resumes(job_id) == resumes:
                    self.broker.cancel(job_id)
                    self.metrics.count("cancelled")
            except redis.RedisError:
                with self._cond:  # try again after the outage
                    self._cancels += due[i:]
                raise

    def _publish(self) -> None:  # under the lock
        self.metrics.label(self.metrics.running).set(len(self._followers))
        self.metrics.label(self.metrics.waiting).set(0)

    def _redis_error(self, e: Exception) -> None:
        self.metrics.label(self.metrics.redis_errors).inc()
        self._ready_at, self._ready = time.monotonic(), False
        log.warning("redis: %s", e)


# -- the API role's process ------------------------------------------------------------------------------


def api_info(model_name: str, published: dict) -> dict:
    """What GET /v1/models shows of the model: the ``server.main.model_info`` fields workers published."""
    return {"id": model_name, **{k: published[k] for k in MODEL_FIELDS if k in published}}


def wait_for_model(broker: Broker, wanted: str | None, poll_s: float = 1.0, stop: threading.Event | None = None):
    """(name, published info) of the model ``wanted`` (any published model when None), once a worker
    has published it; logs while waiting, Redis outages included."""
    said = 0.0
    while stop is None or not stop.is_set():
        try:
            models = broker.models()
            name = wanted if wanted in models else (next(iter(sorted(models))) if wanted is None and models else None)
            if name is not None:
                return name, models[name]
            why = f"no worker has published {wanted or 'a model'} yet"
        except redis.RedisError as e:
            why = f"redis at {broker.url} does not answer ({e})"
        if time.monotonic() - said > 10:
            log.info("waiting for a model: %s", why)
            said = time.monotonic()
        time.sleep(poll_s)
    return None


async def serve_api_async(settings: Settings, started: asyncio.Event | None = None,
                          stop: asyncio.Event | None = None) -> None:
    broker = Broker(settings.redis_url)
    wanted = settings.model.name if settings.model is not None else None
    name, published = await asyncio.to_thread(wait_for_model, broker, wanted)
    engine = RemoteEngine(settings, broker, name, published)
    await ApiServer(settings, engine, api_info(name, published)).run(started, stop)


def serve_api(settings: Settings) -> None:
    """``vqdiff serve --role api``: serve HTTP and gRPC, relaying every request to the workers."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve_api_async(settings))


class ApiServer(Server):
    """``Server`` with a ``RemoteEngine`` and no model to load; ``run`` is the same."""

    def __init__(self, settings: Settings, engine: RemoteEngine, info: dict):
        self.settings, self.engine, self.info = settings, engine, info
