"""The API role (server/remote.py) against a real redis-server and a fake worker thread that claims
jobs and answers with fake PNG bytes: validation happens before anything is enqueued, requests round
trip to a result, a client that goes away cancels its job, a full queue is 429, a Redis outage is
503 until Redis is back, and a stream cut on one API node resumes on another."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import redis
from vqdiff.model.sampling.params import image_seed
from vqdiff.server.broker import Broker, key
from vqdiff.server.jobs import Job
from vqdiff.server.metrics import Metrics
from vqdiff.server.remote import ApiServer, RemoteEngine, RemoteModel, api_info
from vqdiff.server.request import Failure, Progress, Result, Status, Timings
from vqdiff.server.served import Catalog, Served
from vqdiff.server.settings import Settings

from tests.serving import RedisServer, ServerThread, free_port, sse_events

MODEL = "tiny"
PNG = b"\x89PNG\r\n\x1a\nfake image"
STEPS = 3
INFO = {  # what a worker publishes: server.main.model_info fields, the model's sizes, its limits
    "id": MODEL, "path": "/models/tiny", "image_size": 32, "tokens": [4, 4], "codebook_size": 64,
    "num_timesteps": 16, "learnable_null": True, "parameters": 1000, "dtype": "float32", "device": "cuda:0",
    "num_tokens": 16, "has_null": True, "generation_defaults": {"steps": STEPS}, "max_images": 2,
    "max_prompt_chars": 40, "max_rows": 4, "request_timeout_s": 30.0,
}


class FakeWorker:
    """Claims jobs of MODEL one at a time and answers each with STEPS progress events and a result;
    after the first progress event it waits for ``release`` (polling the job's cancel flag)."""

    def __init__(self, url: str, name: str = "w1", model: str = MODEL):
        self.broker, self.name, self.model = Broker(url), name, model
        self.claiming, self.release, self.stop = threading.Event(), threading.Event(), threading.Event()
        self.paused = threading.Event()
        self.claiming.set()
        self.release.set()
        self.jobs, self.outcomes = [], {}
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FakeWorker:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.release.set()
        self.thread.join(10)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.broker.heartbeat(self.name, 2.0, {"model": self.model, "max_rows": 4, "free_rows": 4})
                self.broker.publish_model(self.model, INFO if self.model == MODEL else INFO_B)  # as a worker does
                if not self.claiming.is_set():
                    self.paused.set()
                    time.sleep(0.05)
                    continue
                for eid, job in self.broker.claim(self.model, self.name, 1, 100):
                    self.jobs.append(job)
                    self.outcomes[job.id] = self._serve(job)
                    self.broker.ack(self.model, eid)
            except redis.RedisError:
                time.sleep(0.1)

    def pause(self) -> None:
        """Stop claiming; returns once no claim is in progress any more."""
        self.paused.clear()
        self.claiming.clear()
        assert self.paused.wait(10)

    def _serve(self, job) -> str:
        for step in range(1, STEPS + 1):
            self.broker.emit(job.id, Progress(step, STEPS, step / STEPS, (PNG,) * job.n))
            while step == 1 and not self.release.wait(0.05):
                if self.broker.cancelled([job.id]):
                    self.broker.finish(job.id, Failure(Status.FINISHED_CANCELLED, "cancelled"), self.name)
                    return "cancelled"
        seeds = tuple(image_seed(job.params.seed, i) for i in range(job.n))
        self.broker.finish(job.id, Result(images=(PNG,) * job.n, seeds=seeds, params=job.params,
                                          timings=Timings(1.0, 2.0, 3.0, 6.0)), self.name)
        return "success"


class ApiThread(ServerThread):
    """An API node (``ApiServer``: ``Server.run`` with a ``RemoteEngine``) on loopback."""

    def __init__(self, url: str, cancel_delay_s: float = 0.3, **overrides):
        self.settings = Settings(host="127.0.0.1", http_port=free_port(), grpc_port=0, grace_s=1.0, heartbeat_s=0.2,
                                 role="api", redis_url=url, **overrides)
        self.engine = RemoteEngine(self.settings, Broker(url), cancel_delay_s=cancel_delay_s)
        self.server = ApiServer(self.settings, self.engine)
        self.loop, self.started, self.stop_event = asyncio.new_event_loop(), asyncio.Event(), asyncio.Event()
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)


def metric(exposition: str, series: str) -> float:
    """The value of one series in a Prometheus text exposition."""
    line = next(line for line in exposition.splitlines() if line.startswith(series + " "))
    return float(line.rsplit(" ", 1)[1])


def wait_for(check, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


@pytest.fixture
def broker(redis_server):
    b = Broker(redis_server.url)
    b.r.flushdb()
    b.publish_model(MODEL, INFO)
    return b


@pytest.fixture
def worker(redis_server, broker):
    with FakeWorker(redis_server.url) as w:
        yield w


@pytest.fixture
def api(redis_server, broker):
    with ApiThread(redis_server.url) as a:
        yield a


def test_the_model_stand_in_gives_what_the_front_ends_read():
    from vqdiff.model.sampling.sampler import default_params, request_params

    m = RemoteModel(INFO)
    assert (m.config.transformer.num_tokens, m.config.transformer.num_timesteps, m.config.image_size) == (16, 16, 32)
    assert m.null_cond is not None and RemoteModel({**INFO, "has_null": False}).null_cond is None
    assert default_params(m).steps == STEPS
    assert request_params(m, {"sampler": "posterior"}).steps == 16  # the model's T, from what was published


def test_invalid_requests_are_422_and_nothing_is_enqueued(api, broker):
    with httpx.Client(base_url=api.url, timeout=10) as c:
        for body, param in (({"prompt": "a cat", "n": 3}, "n"),  # the workers' max_images is 2
                            ({"prompt": "x" * 41}, "prompt"),  # their max_prompt_chars is 40
                            ({"prompt": "a cat", "steps": 17}, "steps"),  # more than num_tokens
                            ({"prompt": "a cat", "sampler": "posterior", "steps": 4}, "steps"),
                            # an edit is checked against the published geometry: 32x32 images, 4x4 tokens
                            ({"prompt": "a cat", "image": _png_b64(16), "strength": 0.5}, "image"),
                            ({"prompt": "a cat", "image": _png_b64(32), "mask": _png_b64(32, clear=True)}, "mask")):
            r = c.post("/v1/generate", json=body)
            assert r.status_code == 422, r.text
            assert r.json()["error"]["param"] == param
    assert not broker.r.exists(key("jobs", MODEL))
    assert broker.depth(MODEL) == (0, 0)
    assert 'vqdiff_requests_total{model_name="tiny",outcome="invalid"} 6.0' in httpx.get(f"{api.url}/metrics").text


def _png_b64(size: int, clear: bool = False) -> str:
    """A size x size RGBA PNG, base64: opaque, or (``clear``) all transparent, a full mask."""
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGBA", (size, size), (10, 20, 30, 0 if clear else 255)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_a_node_stays_ready_with_no_live_worker_and_queues_for_the_next(api, broker):
    """A published model and no worker (all died, or scaled to zero): the node stays ready and the
    job waits in Redis; a worker that starts later answers it."""
    with httpx.Client(base_url=api.url, timeout=10) as c:
        wait_for(lambda: c.get("/readyz").status_code == 200)
        assert broker.workers() == {}
        answer = {}
        t = threading.Thread(target=lambda: answer.update(r=c.post("/v1/generate", json={"prompt": "a cat"})))
        t.start()
        wait_for(lambda: broker.depth(MODEL) == (1, 0))
        assert metric(c.get("/metrics").text, f'vqdiff_workers{{model_name="{MODEL}"}}') == 0  # what to alert on
        with FakeWorker(api.settings.redis_url):
            t.join(10)
    assert answer["r"].status_code == 200, answer["r"].text


def test_a_request_round_trips_through_a_worker(api, worker, broker):
    with httpx.Client(base_url=api.url, timeout=10) as c:
        wait_for(lambda: c.get("/readyz").status_code == 200)  # once the worker's first heartbeat is in
        r = c.post("/v1/generate", json={"prompt": "a cat", "n": 2})
        assert r.status_code == 200, r.text
        body = r.json()
        job = worker.jobs[-1]
        assert (job.id, job.prompt, job.n) == (body["id"], "a cat", 2)
        assert job.params.seed is not None and job.params.uncond == "null"  # resolved on the API node
        assert [base64.b64decode(i["b64_json"]) for i in body["images"]] == [PNG, PNG]
        assert body["seed"] == job.params.seed

        with c.stream("POST", "/v1/generate", json={"prompt": "a dog", "stream": True}) as s:
            events = sse_events(s.iter_lines())
        assert [e["event"] for e in events] == ["queued"] + ["progress"] * STEPS + ["result"]
        ids = [e["id"] for e in events[1:]]
        assert all(ids) and ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
        assert ids == [eid for eid, _ in broker.events(events[0]["data"]["id"])]  # the Redis entry ids
        assert base64.b64decode(events[-1]["data"]["images"][0]["b64_json"]) == PNG
        metrics = c.get("/metrics").text
    assert 'vqdiff_requests_total{model_name="tiny",outcome="success"} 2.0' in metrics
    assert 'vqdiff_jobs_enqueued_total{model_name="tiny"} 2.0' in metrics
    assert 'vqdiff_queue_depth{model_name="tiny"} 0.0' in metrics


def test_a_client_that_goes_away_cancels_its_job(api, worker, broker):
    worker.release.clear()  # the job waits after its first progress event
    with httpx.Client(base_url=api.url, timeout=10) as c:
        with c.stream("POST", "/v1/generate", json={"prompt": "a cat", "stream": True}) as s:
            lines = s.iter_lines()
            queued = json.loads(next(line for line in lines if line.startswith("data: "))[6:])
            assert next(line for line in lines if line.startswith("event: ")) == "event: progress"
        wait_for(lambda: broker.cancelled([queued["id"]]))
        wait_for(lambda: worker.outcomes.get(queued["id"]) == "cancelled")
        wait_for(lambda: not api.engine.scheduler.running)


def test_a_plain_client_that_goes_away_cancels_its_job_at_once(redis_server, broker, worker):
    """No resume is possible without the stream's ids: the cancel does not wait for one."""
    worker.release.clear()  # the job waits after its first progress event
    with ApiThread(redis_server.url, cancel_delay_s=60) as a:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{a.url}/v1/generate", json={"prompt": "a cat"}, timeout=0.5)
        t0 = time.monotonic()
        wait_for(lambda: bool(broker.r.keys("vqdiff:cancel:*")), timeout=5)
        assert time.monotonic() - t0 < 2  # within a poll of the handler, not after the 60 s resume window
        worker.release.set()


def test_a_full_queue_is_429_with_retry_after(redis_server, broker, worker):
    worker.pause()  # nothing leaves the queue
    with ApiThread(redis_server.url, max_waiting=1) as api, httpx.Client(base_url=api.url, timeout=10) as c:
        with c.stream("POST", "/v1/generate", json={"prompt": "first", "stream": True}) as first:
            assert first.status_code == 200
            assert broker.depth(MODEL)[0] == 1
            r = c.post("/v1/generate", json={"prompt": "second"})
            assert r.status_code == 429, r.text
            assert r.headers["retry-after"] and r.json()["error"]["code"] == "queue_full"
            assert broker.depth(MODEL)[0] == 1  # the refused one was not enqueued
            time.sleep(0.2)
            oldest = metric(c.get("/metrics").text, f'vqdiff_oldest_queued_seconds{{model_name="{MODEL}"}}')
            assert 0.2 <= oldest < 10
            worker.claiming.set()
            events = sse_events(first.iter_lines())
        assert events[-1]["event"] == "result"
        assert c.post("/v1/generate", json={"prompt": "third"}).status_code == 200


def test_the_api_exports_the_redis_wide_job_counts(api, broker):
    """Reclaims and dead letters happen on workers; every API node reports the totals Redis keeps."""
    worker_dead = Broker(broker.url)
    for i in range(3):
        api.engine.broker.enqueue(Job(id=f"gen-{i}", model=MODEL, prompt="a cat",
                                      params=api.engine.catalog.resolve(MODEL).defaults))
    assert len(worker_dead.claim(MODEL, "gone", 3, 100)) == 3  # a worker takes them and dies (no lease)
    taken = broker.reclaim(MODEL, "w2", min_idle_ms=0, max_deliveries=1)  # each past its one delivery
    assert taken == []
    text = httpx.get(f"{api.url}/metrics").text
    assert metric(text, f'vqdiff_jobs_reclaimed_total{{model_name="{MODEL}"}}') == 3
    assert metric(text, f'vqdiff_jobs_dead_lettered_total{{model_name="{MODEL}"}}') == 3
    assert metric(text, f'vqdiff_jobs_pending{{model_name="{MODEL}"}}') == 0


def test_redis_down_is_503_and_not_ready_until_it_is_back(tmp_path):
    own = RedisServer(tmp_path).start()
    try:
        Broker(own.url).publish_model(MODEL, INFO)
        with FakeWorker(own.url), ApiThread(own.url) as api, httpx.Client(base_url=api.url, timeout=10) as c:
            wait_for(lambda: c.get("/readyz").status_code == 200)
            own.stop()
            r = c.post("/v1/generate", json={"prompt": "a cat"})
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] and r.json()["error"]["code"] == "unavailable"
            time.sleep(1.1)  # past the readiness cache
            assert c.get("/readyz").status_code == 503
            assert c.get("/healthz").status_code == 200
            own.start()  # the same port, empty: the worker re-registers, the queue is made again
            wait_for(lambda: c.get("/readyz").status_code == 200)
            r = c.post("/v1/generate", json={"prompt": "a cat"})
            assert r.status_code == 200, r.text
            assert base64.b64decode(r.json()["images"][0]["b64_json"]) == PNG
    finally:
        own.stop()


def test_a_job_that_redis_lost_is_answered_503_at_once(tmp_path):
    """Redis restarts without its data while a job runs: the client hears of it within about a
    second, not at the request's deadline (30 s here)."""
    own = RedisServer(tmp_path).start()
    try:
        Broker(own.url).publish_model(MODEL, INFO)
        with FakeWorker(own.url) as w, ApiThread(own.url) as api, httpx.Client(base_url=api.url, timeout=40) as c:
            wait_for(lambda: c.get("/readyz").status_code == 200)
            w.release.clear()  # the job waits after its first progress event
            answer = {}
            t = threading.Thread(target=lambda: answer.update(r=c.post("/v1/generate", json={"prompt": "a cat"})))
            t.start()
            wait_for(lambda: w.jobs)
            own.stop()
            own.start()  # the same port, empty
            t0 = time.monotonic()
            t.join(20)
            assert time.monotonic() - t0 < 5
            r = answer["r"]
            assert r.status_code == 503 and r.headers["retry-after"], r.text
            assert "lost this request" in r.json()["error"]["message"]
    finally:
        own.stop()


def test_a_stream_cut_on_one_api_node_resumes_on_another(redis_server, broker, worker):
    worker.release.clear()
    with ApiThread(redis_server.url, cancel_delay_s=1.0) as a, ApiThread(redis_server.url) as b, \
            httpx.Client(timeout=10) as c:
        with c.stream("POST", f"{a.url}/v1/generate", json={"prompt": "a cat", "stream": True}) as s:
            lines = s.iter_lines()
            seen = []
            for line in lines:
                if line.startswith(("id: ", "data: ")):
                    seen.append(line)
                if line.startswith("id: "):
                    break
        job_id = json.loads(seen[0][6:])["id"]
        last_id = seen[-1][4:]
        worker.release.set()
        with c.stream("GET", f"{b.url}/v1/generate/{job_id}/events", headers={"Last-Event-ID": last_id}) as s:
            assert s.status_code == 200
            events = sse_events(s.iter_lines())
        assert [e["event"] for e in events] == ["progress"] * (STEPS - 1) + ["result"]  # after the first one
        assert [e["data"]["step"] for e in events[:-1]] == list(range(2, STEPS + 1))
        assert events[-1]["data"]["id"] == job_id
        assert base64.b64decode(events[-1]["data"]["images"][0]["b64_json"]) == PNG
        time.sleep(1.3)  # past node a's cancel delay: the resume kept the job from being cancelled
        assert not broker.cancelled([job_id])
        assert worker.outcomes[job_id] == "success"

        # a finished job whose events the client has all seen: the final event again
        with c.stream("GET", f"{a.url}/v1/generate/{job_id}/events", params={"after": events[-1]["id"]}) as s:
            again = sse_events(s.iter_lines())
        assert [e["event"] for e in again] == ["result"]
        r = c.get(f"{b.url}/v1/generate/gen-0000000000000000/events")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_an_api_node_that_stops_mid_stream_loses_no_job(redis_server, broker, worker):
    """Node a drains with a stream open: its client gets an error event that says how to resume, the
    job goes on on its worker, and node b serves the rest of its events and the result."""
    worker.release.clear()
    a, b = ApiThread(redis_server.url, cancel_delay_s=60).start(), ApiThread(redis_server.url).start()
    try:
        with httpx.Client(timeout=10) as c:
            with c.stream("POST", f"{a.url}/v1/generate", json={"prompt": "a cat", "stream": True}) as s:
                lines = s.iter_lines()
                job_id = json.loads(next(line for line in lines if line.startswith("data: "))[6:])["id"]
                last_id = next(line for line in lines if line.startswith("id: "))[4:]
                a.begin_stop()  # SIGTERM: grace 1 s, then what is left is answered unavailable
                rest = sse_events(lines)
            assert rest[-1]["event"] == "error" and f"/v1/generate/{job_id}/events" in rest[-1]["data"]["error"]["message"]
            a.stop()
            assert not broker.cancelled([job_id])  # the job was not cancelled with the node
            worker.release.set()
            with c.stream("GET", f"{b.url}/v1/generate/{job_id}/events", headers={"Last-Event-ID": last_id}) as s:
                events = sse_events(s.iter_lines())
        assert events[-1]["event"] == "result" and events[-1]["data"]["id"] == job_id
        assert worker.outcomes[job_id] == "success"
    finally:
        worker.release.set()
        b.stop()


def test_a_single_process_server_has_no_events_to_resume():
    from vqdiff.server.http_app import create_app

    engine = SimpleNamespace(catalog=Catalog.of(Served(MODEL, RemoteModel(INFO), api_info(MODEL, INFO))),
                             metrics=Metrics(MODEL, "cpu"), ready=True, blocking_submit=False)
    app = create_app(engine, Settings())

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.get("/v1/generate/gen-1/events")

    r = asyncio.run(go())
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"


def test_published_limits_bound_the_api_node(redis_server, broker):
    settings = Settings(redis_url=redis_server.url, request_timeout_s=10.0)
    engine = RemoteEngine(settings, broker)
    engine.refresh()  # reads what the worker published
    limits = engine.limits(MODEL)
    assert (limits.max_images, limits.max_prompt_chars, limits.request_timeout_s) == (2, 40, 10.0)
    engine = RemoteEngine(replace(settings, request_timeout_s=60.0), broker)
    engine.refresh()
    assert engine.limits(MODEL).request_timeout_s == 30.0


def test_serve_api_answers_at_once_and_serves_once_a_model_is_published(redis_server):
    """The port opens before any worker has published a model (probes get an answer, not a refused
    connection): not ready and 503 + Retry-After until one has."""
    from vqdiff.server.remote import serve_api_async

    Broker(redis_server.url).r.flushdb()  # no model published yet
    settings = Settings(host="127.0.0.1", http_port=free_port(), grpc_port=0, grace_s=1.0, role="api",
                        redis_url=redis_server.url)
    loop, started, stop = asyncio.new_event_loop(), asyncio.Event(), asyncio.Event()
    thread = threading.Thread(target=lambda: loop.run_until_complete(serve_api_async(settings, started, stop)),
                              daemon=True)
    thread.start()
    try:
        wait_for(started.is_set)
        url = f"http://127.0.0.1:{settings.http_port}"
        assert httpx.get(f"{url}/healthz").status_code == 200
        assert httpx.get(f"{url}/readyz").status_code == 503
        assert httpx.get(f"{url}/v1/models").json()["data"] == []
        r = httpx.post(f"{url}/v1/generate", json={"prompt": "a cat"}, timeout=10)
        assert r.status_code == 503 and r.headers["retry-after"], r.text
        assert "no worker has published" in r.json()["error"]["message"]
        assert not Broker(redis_server.url).r.exists(key("jobs", MODEL))  # nothing enqueued
        with FakeWorker(redis_server.url):  # publishes the model with its first heartbeat
            wait_for(lambda: httpx.get(f"{url}/readyz").status_code == 200)
            assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == MODEL
            r = httpx.post(f"{url}/v1/generate", json={"prompt": "a cat"}, timeout=10)
            assert r.status_code == 200, r.text
        metrics = httpx.get(f"{url}/metrics").text
        assert 'vqdiff_requests_total{model_name="tiny",outcome="success"} 1.0' in metrics
        assert 'vqdiff_requests_total{model_name="",outcome="unavailable"} 1.0' in metrics
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
    assert not thread.is_alive()


OTHER = "tiny-b"
INFO_B = {**INFO, "id": OTHER, "path": "/models/tiny-b", "image_size": 64, "generation_defaults": {"steps": 2}}


def test_requests_are_routed_by_the_model_they_name(redis_server, broker):
    broker.publish_model(OTHER, INFO_B)
    with FakeWorker(redis_server.url, "wa") as wa, FakeWorker(redis_server.url, "wb", OTHER) as wb, \
            ApiThread(redis_server.url) as api, httpx.Client(base_url=api.url, timeout=10) as c:
        listed = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
        assert sorted(listed) == [MODEL, OTHER]
        assert (listed[MODEL]["default_params"]["steps"], listed[OTHER]["default_params"]["steps"]) == (STEPS, 2)
        assert c.post("/v1/generate", json={"prompt": "a cat", "model": OTHER}).status_code == 200
        assert c.post("/v1/generate", json={"prompt": "a dog", "model": MODEL}).status_code == 200
        assert [j.prompt for j in wa.jobs] == ["a dog"] and [j.prompt for j in wb.jobs] == ["a cat"]
        assert wb.jobs[0].params.steps == 2  # the named model's defaults
        for body in ({"prompt": "a cat"}, {"prompt": "a cat", "model": "nope"}):  # several served, no default
            r = c.post("/v1/generate", json=body)
            assert r.status_code == 422 and r.json()["error"]["param"] == "model", r.text
        r = c.post("/v1/images/generations", json={"prompt": "a cat", "model": OTHER, "size": "64x64"})
        assert r.status_code == 200, r.text
        r = c.post("/v1/images/generations", json={"prompt": "a cat", "model": OTHER, "size": "32x32"})
        assert r.status_code == 422 and r.json()["error"]["param"] == "size"
        metrics = c.get("/metrics").text
    assert f'vqdiff_jobs_enqueued_total{{model_name="{OTHER}"}} 2.0' in metrics
    assert f'vqdiff_requests_total{{model_name="{MODEL}",outcome="success"}} 1.0' in metrics
    with FakeWorker(redis_server.url, "wb", OTHER) as wb, ApiThread(redis_server.url, model=Path(OTHER)) as api:
        r = httpx.post(f"{api.url}/v1/generate", json={"prompt": "a cow"}, timeout=10)  # --model names the default
        assert r.status_code == 200 and [j.prompt for j in wb.jobs] == ["a cow"], r.text


def test_a_stalled_redis_never_stalls_the_event_loop(tmp_path):
    """Redis frozen (SIGSTOP) mid-request: the probes still answer at once, readiness turns 503,
    and the request completes once Redis runs again."""
    own = RedisServer(tmp_path).start()
    try:
        Broker(own.url).publish_model(MODEL, INFO)
        with FakeWorker(own.url), ApiThread(own.url) as api, httpx.Client(base_url=api.url, timeout=30) as c:
            wait_for(lambda: c.get("/readyz").status_code == 200)
            own.proc.send_signal(signal.SIGSTOP)
            try:
                answer = {}
                t = threading.Thread(target=lambda: answer.update(r=c.post("/v1/generate", json={"prompt": "a cat"})))
                t.start()
                time.sleep(0.3)  # the request is waiting on Redis
                t0 = time.monotonic()
                assert c.get("/healthz").status_code == 200
                assert time.monotonic() - t0 < 0.5
                wait_for(lambda: c.get("/readyz").status_code == 503, timeout=6)  # Redis silent for READY_STALE_S
            finally:
                own.proc.send_signal(signal.SIGCONT)
            t.join(30)
            assert answer["r"].status_code == 200, answer["r"].text
            wait_for(lambda: c.get("/readyz").status_code == 200)
    finally:
        own.stop()
