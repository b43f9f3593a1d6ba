"""The API role: the HTTP and gRPC front ends with no model, relaying requests to GPU workers
through Redis (server/broker.py).

``RemoteEngine`` has the interface the front ends use of ``Engine`` (``submit`` / ``cancel`` /
``ready`` / ``drain`` / ``wait_idle`` / ``shutdown`` / ``metrics`` / ``catalog`` / ``scheduler``),
so server/http_app.py, server/grpc_app.py and server/aio.py serve either. Its catalog holds every
model workers published in Redis (``Broker.publish_model``: config, default parameters, limits),
re-read every ``READY_CACHE_S`` by the relay thread; a request is routed by the model it names.
``submit`` validates exactly as the engine does (``engine.validate``, against the model and limits
its workers published), resolves the parameters with a fresh seed (so whichever worker runs the
job, however many times, draws the same image), and enqueues a ``Job`` on the model's stream. It
makes Redis round trips, so the front ends call it in a worker thread (``blocking_submit``). One
relay thread follows the event streams of every request this node serves with one blocking XREAD
and hands each event, with its Redis entry id, to the request's ``emit``; the SSE stream sends that
id so that a client can resume on any API node (``follow``, ``GET /v1/generate/{id}/events``).

Refusals:

- invalid input: ValueError (422), before anything is enqueued;
- backpressure: ``QueueFull`` (429 + Retry-After) when ``max_waiting`` jobs of the model are already
  queued and not yet claimed by any worker. Workers claim only what fits their free rows, so those
  are exactly the requests "queued beyond the running batch": the same meaning ``max_waiting`` has
  in a single process, now summed over every worker of the model;
- Redis unreachable, or no model published yet: ``Unavailable`` (503 + Retry-After); ``ready`` is
  False meanwhile. A model whose workers are all gone still takes jobs up to ``max_waiting``: they
  wait in Redis for a worker (an autoscaler starts one on the queue depth).

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
from prometheus_client.core import CounterMetricFamily
from vqdiff.server.broker import Broker
from vqdiff.server.engine import timeout_s, validate
from vqdiff.server.jobs import Job
from vqdiff.server.main import Server
from vqdiff.server.metrics import Metrics
from vqdiff.server.request import Event, Failure, Request, Result, Status
from vqdiff.server.scheduler import Draining, QueueFull, Unavailable, UnknownRequest
from vqdiff.server.served import Catalog, Served
from vqdiff.server.settings import Settings

log = logging.getLogger("vqdiff.remote")

BLOCK_MS = 100  # one XREAD waits this long: a request submitted meanwhile is read after it at the latest
READY_CACHE_S = 1.0  # how often the relay re-reads the published models and the live workers
READY_STALE_S = 3.0  # not ready when Redis has not answered for this long
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
    """``Metrics`` for every model the node serves, plus what only the API sees, read from Redis at
    every scrape: per model the jobs not yet claimed (``vqdiff_queue_depth``), the age of the oldest
    of them (``vqdiff_oldest_queued_seconds``), the claimed and unacknowledged ones
    (``vqdiff_jobs_pending``), the live workers (``vqdiff_workers``), and the Redis-wide counts of jobs
    reclaimed from dead workers and dead-lettered (``vqdiff_jobs_reclaimed_total``,
    ``vqdiff_jobs_dead_lettered_total``: every API node reports the same totals, so aggregate them
    with max, not sum); and what this node did (``vqdiff_jobs_enqueued_total``,
    ``vqdiff_redis_errors_total``)."""

    def __init__(self, broker: Broker, catalog: Catalog):
        self.broker, self.catalog = broker, catalog
        self._models: set[str] = set()
        super().__init__(catalog.default or "", "cpu")
        r, m = self.registry, ("model_name",)
        self.queue_depth = Gauge("vqdiff_queue_depth", "Jobs in Redis not yet claimed by a worker", m, registry=r)
        self.oldest_queued = Gauge("vqdiff_oldest_queued_seconds", "Age of the oldest job not yet claimed by a "
                                   "worker (0: none queued)", m, registry=r)
        self.jobs_pending = Gauge("vqdiff_jobs_pending", "Jobs claimed by a worker and not yet acknowledged", m,
                                  registry=r)
        self.workers = Gauge("vqdiff_workers", "Live workers serving the model", m, registry=r)
        self.enqueued = Counter("vqdiff_jobs_enqueued", "Jobs this API node enqueued", m, registry=r)
        self.redis_errors = Counter("vqdiff_redis_errors", "Redis calls of this API node that failed", m, registry=r)
        self._totals = _RedisTotals()
        r.register(self._totals)
        for name in self._models:
            self.enqueued.labels(name)
            self.redis_errors.labels(name)

    @property
    def model_name(self) -> str:
        """The label of what names no model: the default model, else the only one served, else ""."""
        if self.catalog.default:
            return self.catalog.default
        names = self.catalog.names()
        return names[0] if len(names) == 1 else ""

    def add_model(self, model_name: str) -> None:
        if model_name and model_name not in self._models:  # "" (no model named) gets no series of its own
            self._models.add(model_name)
            super().add_model(model_name)
            for counter in (getattr(self, "enqueued", None), getattr(self, "redis_errors", None)):
                if counter is not None:  # (not yet made while Metrics.__init__ runs: done below)
                    counter.labels(model_name)  # at 0 from the start: a panel of its rate is not empty

    def exposition(self) -> bytes:
        """Blocks on Redis: the HTTP handler calls it in a worker thread."""
        names = self.catalog.names()
        for name in names:
            self.add_model(name)
        try:
            live = [w.get("model") for w in self.broker.workers().values()]
            totals = {}
            for name in names:
                queued, pending = self.broker.depth(name)
                self.label(self.queue_depth, name).set(queued)
                self.label(self.jobs_pending, name).set(pending)
                self.label(self.oldest_queued, name).set(self.broker.oldest_queued_s(name))
                self.label(self.workers, name).set(live.count(name))
                totals[name] = self.broker.stats(name)
            self._totals.last = totals
        except redis.RedisError:
            self.label(self.redis_errors).inc()  # the gauges keep their last values
        return super().exposition()


class _RedisTotals:
    """A Prometheus collector of the Redis-wide counters (``Broker.stats``) as of the last scrape."""

    def __init__(self):
        self.last: dict[str, dict[str, int]] = {}

    def collect(self):
        reclaimed = CounterMetricFamily("vqdiff_jobs_reclaimed", "Jobs claimed from workers whose lease expired "
                                        "(Redis-wide: aggregate with max over API nodes)", labels=["model_name"])
        dead = CounterMetricFamily("vqdiff_jobs_dead_lettered", "Jobs moved to the dead-letter stream after "
                                   "max_deliveries (Redis-wide: aggregate with max)", labels=["model_name"])
        for name, stats in sorted(self.last.items()):
            reclaimed.add_metric([name], stats.get("reclaimed", 0))
            dead.add_metric([name], stats.get("dead_lettered", 0))
        yield reclaimed
        yield dead


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
    blocking_submit = True  # submit / follow make Redis round trips: the front ends call them in a thread

    def __init__(self, settings: Settings, broker: Broker, cancel_delay_s: float = CANCEL_DELAY_S,
                 block_ms: int = BLOCK_MS):
        self.settings, self.broker = settings, broker
        # the published models (the relay thread refreshes them); ``--model`` names the default
        self.catalog = Catalog(default=settings.model.name if settings.model is not None else None)
        self.metrics = RemoteMetrics(broker, self.catalog)
        self.scheduler = _Relays(self)
        self.cancel_delay_s, self.block_ms = cancel_delay_s, block_ms
        self._cond = threading.Condition()
        self._followers: list[_Follower] = []
        # (due, job id, the job's resume count when its client left, model)
        self._cancels: list[tuple[float, str, int | None, str | None]] = []
        self._draining = False
        self._stop = False
        self._thread: threading.Thread | None = None
        self._published: dict[str, dict] = {}  # model -> what its workers published
        self._redis_ok_at = float("-inf")  # monotonic time of the last Redis call that succeeded
        self._refreshed_at = float("-inf")

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> RemoteEngine:
        try:
            self.refresh()
        except redis.RedisError as e:  # served once Redis answers: the relay keeps trying
            self._redis_error(e)
        self._thread = threading.Thread(target=self._loop, name="vqdiff-relay", daemon=True)
        self._thread.start()
        return self

    def refresh(self) -> None:
        """Read the published models (the relay thread does, every ``READY_CACHE_S``): the catalog and
        ``ready`` follow Redis without a round trip of their own."""
        published = self.broker.models()
        served = {}
        for name, info in published.items():
            if name in self.catalog and self._published.get(name) == info:
                served[name] = self.catalog.resolve(name)
                continue
            served[name] = Served(name, RemoteModel(info), api_info(name, info))
            self.metrics.add_model(name)
            log.info("serving %s (%s its workers published)", name, "as" if name not in self.catalog else "now as")
        self._published = published
        self.catalog.replace(served)
        self._redis_ok_at = self._refreshed_at = time.monotonic()

    @property
    def ready(self) -> bool:
        """Not draining, the relay runs, Redis answered within ``READY_STALE_S``, and a worker has
        published a model. Live workers are not required: with none (all died, or an autoscaler at
        zero) jobs wait in Redis for the next one, and a node that turned unready would leave clients
        with refused connections instead of answers (``vqdiff_workers`` is what to alert on). Reads
        what the relay thread last saw: no Redis call."""
        if self._draining or self._thread is None or not self._thread.is_alive():
            return False
        return time.monotonic() - self._redis_ok_at < READY_STALE_S and bool(self.catalog.names())

    def limits(self, name: str) -> SimpleNamespace:
        """What ``name``'s workers accept (they published it), else this node's settings."""
        info, s = self._published.get(name, {}), self.settings
        return SimpleNamespace(
            max_images=int(info.get("max_images") or s.max_images),
            max_prompt_chars=int(info.get("max_prompt_chars") or s.max_prompt_chars),
            max_upload_bytes=min(int(info.get("max_upload_bytes") or s.max_upload_bytes), s.max_upload_bytes),
            request_timeout_s=min(float(info.get("request_timeout_s") or s.request_timeout_s), s.request_timeout_s))

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
        """Validate, enqueue, follow. Raises ValueError (bad input, a model not served), QueueFull,
        Draining or Unavailable (Redis is down, no model published yet); in every case nothing is
        enqueued."""
        if self._draining:
            self.metrics.count("rejected", req.model)
            raise Draining("the server is shutting down")
        try:
            served = self.catalog.resolve(req.model)
        except Unavailable:
            self.metrics.count("unavailable", req.model)
            raise
        except ValueError:
            self.metrics.count("invalid", req.model)
            raise
        name, limits = served.name, self.limits(served.name)
        req.model = name
        try:
            validate(req, limits, served.model)
        except ValueError:
            self.metrics.count("invalid", name)
            raise
        timeout = timeout_s(req, limits)
        req.deadline = req.arrival + timeout
        try:
            queued, _ = self.broker.depth(name)
            if queued >= self.settings.max_waiting:
                self.metrics.count("rejected", name)
                raise QueueFull(f"{queued} requests are waiting for a worker (max_waiting={self.settings.max_waiting})")
            job = Job.of(req, name, timeout)
            self.broker.remember(job)
            self.broker.enqueue(job)
        except redis.RedisError as e:
            self._redis_error(e)
            self.metrics.count("unavailable", name)
            raise Unavailable(f"the job queue cannot be reached ({type(e).__name__})") from None
        self._redis_ok_at = time.monotonic()
        self.metrics.label(self.metrics.enqueued, name).inc()
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
                raise UnknownRequest(f"no request {req.id!r} is known (its events expire five minutes after it finished)")
            resumes = self.broker.resumed(req.id)
            last = self.broker.last_event(req.id) if self.broker.done(req.id) else None
        except redis.RedisError as e:
            self._redis_error(e)
            raise Unavailable(f"the job queue cannot be reached ({type(e).__name__})") from None
        if last is not None and not _after(last[0], after):  # finished, and the client saw everything
            req.emit(last[1], last[0])
            return req
        self._add(_Follower(req, after, time.monotonic() + self.settings.request_timeout_s + DEADLINE_SLACK_S, resumes))
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
            self._cancels.append((time.monotonic() + delay, req.id, mine[0].resumes, req.model))
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
                    left = self._refreshed_at + READY_CACHE_S - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if self._stop:
                    return
                after: dict[str, str] = {}
                for f in self._followers:
                    a = after.get(f.req.id)
                    after[f.req.id] = f.after if a is None or _after(a, f.after) else a
            try:
                if time.monotonic() - self._refreshed_at >= READY_CACHE_S:
                    self._refreshed_at = time.monotonic()  # after a failure too: retried in a second
                    self.refresh()
                    self._fail_lost(list(after))
                self._due_cancels()
                got = self.broker.follow(after, self.block_ms) if after else []
                if after:
                    self._redis_ok_at = time.monotonic()
            except redis.RedisError as e:
                self._redis_error(e)
                time.sleep(RETRY_S)
                got = []
            if not after and self._cancels:
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
            name = f.req.model
            if isinstance(event, Result):
                self.metrics.count("success", name)
                self.metrics.label(self.metrics.images, name).inc(len(event.images))
                self.metrics.label(self.metrics.latency, name).observe(time.monotonic() - f.req.arrival)
            else:
                self.metrics.count(event.status.outcome, name)
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

    def _fail_lost(self, job_ids: list[str]) -> None:
        """Answer 503 at once for the jobs Redis lost (it restarted without their data): their
        events would never come, and the client would otherwise wait for the deadline."""
        lost = self.broker.lost(job_ids)
        if not lost:
            return
        with self._cond:
            gone = [f for f in self._followers if f.req.id in lost]
        log.warning("redis lost %d jobs this node relays (it restarted without their data)", len(lost))
        for f in gone:
            self._deliver(f, Failure(Status.FINISHED_UNAVAILABLE, "the job queue lost this request (Redis restarted "
                                     "without its data); send it again"), None)

    def _due_cancels(self) -> None:
        now = time.monotonic()
        with self._cond:
            due = [c for c in self._cancels if c[0] <= now]
            self._cancels = [c for c in self._cancels if c[0] > now]
        for i, (_, job_id, resumes, name) in enumerate(due):
            try:
                if resumes is None or self.broker.resumes(job_id) == resumes:
                    self.broker.cancel(job_id)
                    self.metrics.count("cancelled", name)
            except redis.RedisError:
                with self._cond:  # try again after the outage
                    self._cancels += due[i:]
                raise

    def _publish(self) -> None:  # under the lock
        """``vqdiff_requests_running``: the requests this node relays, per model (their queue is in
        Redis: ``vqdiff_queue_depth``; ``vqdiff_requests_waiting`` stays 0 here)."""
        names = {f.req.model for f in self._followers} | set(self.catalog.names())
        for name in names - {None}:
            self.metrics.label(self.metrics.running, name).set(sum(f.req.model == name for f in self._followers))
            self.metrics.label(self.metrics.waiting, name).set(0)

    def _redis_error(self, e: Exception) -> None:
        self.metrics.label(self.metrics.redis_errors).inc()
        self._redis_ok_at = float("-inf")
        log.warning("redis: %s", e)


# -- the API role's process ------------------------------------------------------------------------------


def api_info(model_name: str, published: dict) -> dict:
    """What GET /v1/models shows of the model: the ``server.main.model_info`` fields workers published."""
    return {"id": model_name, **{k: published[k] for k in MODEL_FIELDS if k in published}}


async def serve_api_async(settings: Settings, started: asyncio.Event | None = None,
                          stop: asyncio.Event | None = None) -> None:
    """Serve at once: until a worker publishes a model, ``/readyz`` and gRPC health say not ready
    and requests get 503 + Retry-After."""
    engine = RemoteEngine(settings, Broker(settings.redis_url))
    await ApiServer(settings, engine).run(started, stop)


def serve_api(settings: Settings) -> None:
    """``vqdiff serve --role api``: serve HTTP and gRPC, relaying every request to the workers."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve_api_async(settings))


class ApiServer(Server):
    """``Server`` with a ``RemoteEngine`` and no model to load; ``run`` is the same."""

    def __init__(self, settings: Settings, engine: RemoteEngine):
        self.settings, self.engine = settings, engine
