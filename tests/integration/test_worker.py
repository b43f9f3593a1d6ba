"""server/worker.py against a real redis-server with the tiny random model: jobs from the stream come
back as the same images a single-process engine draws, a killed worker's jobs are finished by another
(each answered exactly once) or by its restart under the same name, a cancel flag frees a running
job, past the grace period a stopping worker hands its unfinished jobs back unacknowledged."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest
import torch

from vqdiff.model.io.folder import load_model, random_model, save_model
from vqdiff.model.sampling.params import GenerationParams
from vqdiff.server.broker import GROUP, Broker, key
from vqdiff.server.engine import Engine
from vqdiff.server.jobs import Job
from vqdiff.server.request import Failure, Progress, Request, Result, Status
from vqdiff.server.settings import Settings
from vqdiff.server.worker import Worker
from tests.serving import ROOT, free_port

MAX_ROWS = 8


@pytest.fixture
def broker(redis_server):
    b = Broker(redis_server.url)
    b.r.flushdb()
    return b


@pytest.fixture(scope="module")
def folder(tokenizer, tiny_config, tmp_path_factory):
    m = random_model(tiny_config, tokenizer, seed=3).eval()
    with torch.no_grad():  # confident, varied predictions (as in test_engine)
        m.transformer.out.weight.mul_(40.0)
        m.null_cond.embeddings.normal_()
    return save_model(m, tmp_path_factory.mktemp("m") / "tiny")


@pytest.fixture(scope="module")
def model(folder):
    return load_model(folder, device="cpu", dtype=torch.float32).eval()


@pytest.fixture
def make_worker(model, folder, redis_server):
    workers = []

    def make(**kw) -> Worker:
        s = Settings(role="worker", redis_url=redis_server.url, max_rows=MAX_ROWS, lease_s=1.0, grace_s=5.0,
                     **{"worker_port": 0, **kw})
        w = Worker(s, model, folder).start()
        workers.append(w)
        return w

    yield make
    for w in workers:
        if not w.stop_event.is_set():
            w.stop(0)


def job(i: int, steps: int = 3, n: int = 1, preview_every: int = 0) -> Job:
    return Job(id=f"gen-{i:04d}", model="tiny", prompt=["a red circle", "a blue square", "the triangle"][i % 3],
               params=GenerationParams(steps=steps, seed=500 + i, uncond="null"), n=n,
               preview_every=preview_every, deadline=time.time() + 120)


def answers(broker: Broker, job_id: str, timeout: float = 60) -> list:
    """The job's events up to and including its final one."""
    out, after, end = [], "0", time.monotonic() + timeout
    while not out or isinstance(out[-1], Progress):
        assert time.monotonic() < end, f"{job_id}: no final event in {timeout} s ({len(out)} events)"
        for eid, ev in broker.events(job_id, after=after, block_ms=200):
            out.append(ev)
            after = eid
    return out


def single_process(model, jobs: list[Job]) -> dict[str, tuple[bytes, ...]]:
    """The images of each job served by a single-process engine."""
    engine = Engine(model, Settings(max_rows=MAX_ROWS)).start()
    try:
        got: dict[str, list] = {j.id: [] for j in jobs}
        for j in jobs:
            engine.submit(Request(prompt=j.prompt, params=j.params, n=j.n, emit=got[j.id].append, id=j.id))
        assert engine.wait_idle(60)
    finally:
        engine.shutdown(0)
    assert all(isinstance(evs[-1], Result) for evs in got.values())
    return {k: evs[-1].images for k, evs in got.items()}


def final_events(broker: Broker, job_id: str) -> list:
    entries = broker.r.xrange(key("events", job_id))
    return [f for _, f in entries if f[b"kind"] != b"progress"]


def test_jobs_come_back_as_the_images_a_single_process_draws(make_worker, broker, model, redis_server):
    port = free_port()
    worker = make_worker(worker_port=port)
    assert broker.models()["tiny"]["num_timesteps"] == model.config.transformer.num_timesteps
    info = broker.models()["tiny"]
    assert (info["max_rows"], info["has_null"], info["max_images"]) == (MAX_ROWS, True, 4)
    jobs = [job(i, n=1 + i % 2, preview_every=1 if i == 0 else 0) for i in range(5)]
    for j in jobs:
        broker.enqueue(j)
    want = single_process(model, jobs)
    for j in jobs:
        evs = answers(broker, j.id)
        assert isinstance(evs[-1], Result), evs[-1]
        assert evs[-1].images == want[j.id]
        assert evs[-1].seeds == tuple(500 + int(j.id[-4:]) + k for k in range(j.n))
        if j.preview_every:
            assert [e.step for e in evs[:-1]] == [1, 2]
    end = time.monotonic() + 5
    while broker.depth("tiny") != (0, 0):  # acknowledged once the final event is stored
        assert time.monotonic() < end, broker.depth("tiny")
        time.sleep(0.02)
    assert broker.r.xlen(key("jobs", "tiny")) == 0
    end = time.monotonic() + 5  # the next heartbeat publishes the rows freed
    while broker.workers()[worker.name] != {"model": "tiny", "max_rows": MAX_ROWS, "free_rows": MAX_ROWS}:
        assert time.monotonic() < end, broker.workers()
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    assert httpx.get(f"{url}/healthz").status_code == 200
    assert httpx.get(f"{url}/readyz").status_code == 200
    assert 'vqdiff_requests_total{model_name="tiny",outcome="success"} 5.0' in httpx.get(f"{url}/metrics").text
    assert worker.stop() is True  # nothing left unfinished
    assert worker.name not in broker.workers()  # the lease ends with the worker


def test_edit_jobs_carry_their_pngs_and_come_back_as_the_single_process_draws(make_worker, broker, model):
    """An inpainting and a variation travel through Redis (their PNGs in the job, base64) and come
    back byte-equal to a single-process engine's; a job round-trips through its stream fields."""
    import io

    import numpy as np
    from PIL import Image

    from vqdiff.server.request import EditInput

    def png(a) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        return buf.getvalue()

    size = model.config.image_size
    image = png(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
    alpha = np.full((size, size, 4), 255, np.uint8)
    alpha[: size // 2, :, 3] = 0
    edits = [EditInput(image=image, mask=png(alpha)), EditInput(image=image, strength=0.4)]
    jobs = [Job(id=f"gen-edit{i}", model="tiny", prompt="a red circle", params=GenerationParams(steps=3, seed=70 + i,
                uncond="null"), n=2, deadline=time.time() + 120, edit=e) for i, e in enumerate(edits)]
    assert Job.from_fields(jobs[0].to_fields()) == jobs[0] and Job.from_fields(jobs[1].to_fields()) == jobs[1]
    make_worker()
    for j in jobs:
        broker.enqueue(j)
    want = {}
    engine = Engine(model, Settings(max_rows=MAX_ROWS)).start()
    try:
        got: dict[str, list] = {j.id: [] for j in jobs}
        for j in jobs:
            engine.submit(Request(prompt=j.prompt, params=j.params, n=j.n, emit=got[j.id].append, id=j.id, edit=j.edit))
        assert engine.wait_idle(60)
        want = {k: evs[-1].images for k, evs in got.items()}
    finally:
        engine.shutdown(0)
    for j in jobs:
        evs = answers(broker, j.id)
        assert isinstance(evs[-1], Result), evs[-1]
        assert evs[-1].images == want[j.id] and len(set(want[j.id])) == 2  # two seeds, two images


def test_a_bad_job_is_answered_with_a_failure_and_acknowledged(make_worker, broker):
    make_worker()
    bad = Job(id="gen-bad", model="tiny", prompt="a circle", params=GenerationParams(steps=3, seed=1, uncond="null"),
              n=99, deadline=time.time() + 60)
    broker.enqueue(bad)
    (ev,) = answers(broker, "gen-bad", timeout=10)
    assert isinstance(ev, Failure) and ev.status == Status.FINISHED_FAILED and "n: 99" in ev.message
    end = time.monotonic() + 5
    while broker.depth("tiny") != (0, 0):
        assert time.monotonic() < end
        time.sleep(0.02)


def test_a_cancel_flag_frees_the_running_job_within_about_a_step(make_worker, broker, model):
    worker = make_worker()
    j = job(7, steps=64, n=4, preview_every=1)  # the most steps the default sampler allows
    broker.enqueue(j)
    after, end = "0", time.monotonic() + 30
    while after == "0":  # the job runs: its first preview is out
        assert time.monotonic() < end
        got = broker.events(j.id, block_ms=100)
        after = got[0][0] if got else "0"
    t0 = time.monotonic()
    broker.cancel(j.id)
    evs = answers(broker, j.id, timeout=10)
    took = time.monotonic() - t0
    assert isinstance(evs[-1], Failure) and evs[-1].status == Status.FINISHED_CANCELLED
    assert evs[-2].step < j.params.steps - 1  # it stopped early
    assert took < 2.0, took
    end = time.monotonic() + 5
    while broker.depth("tiny") != (0, 0) or worker.free_rows() != MAX_ROWS:
        assert time.monotonic() < end
        time.sleep(0.02)


def test_past_the_grace_period_unfinished_jobs_go_back_and_another_worker_finishes_them(make_worker, broker, model):
    first = make_worker(worker_name="first")
    jobs = [job(20 + i, steps=60) for i in range(6)]  # more rows than one worker has: some wait
    for j in jobs:
        broker.enqueue(j)
    end = time.monotonic() + 30
    while not broker.events(jobs[0].id) and len(first.runs) < 2:
        assert time.monotonic() < end
        time.sleep(0.01)
    end = time.monotonic() + 30
    while len(first.runs) < 2:
        assert time.monotonic() < end
        time.sleep(0.01)
    assert first.stop(grace_s=0) is False  # something was left unfinished
    left = broker.r.xpending(key("jobs", "tiny"), GROUP)["pending"]
    assert left >= 1  # not acknowledged
    t0 = time.monotonic()
    make_worker(worker_name="second")
    want = single_process(model, jobs)
    for j in jobs:
        evs = answers(broker, j.id)
        assert isinstance(evs[-1], Result) and evs[-1].images == want[j.id]
        assert len(final_events(broker, j.id)) == 1
    assert time.monotonic() - t0 < 20


def test_a_killed_worker_s_jobs_are_finished_by_another_exactly_once(make_worker, broker, folder, model, redis_server):
    proc = subprocess.Popen(
        [sys.executable, "-m", "vqdiff.cli", "serve", "--role", "worker", "--redis-url", redis_server.url,
         "--model", str(folder), "--lease-s", "1", "--worker-name", "doomed", "--worker-port", "0",
         "--max-rows", str(MAX_ROWS), "--dtype", "fp32", "--intra-op-threads", "1", "--decode-workers", "1"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        end = time.monotonic() + 60
        while "doomed" not in broker.workers():
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < end, "the worker never took its lease"
            time.sleep(0.05)
        jobs = [job(40 + i, steps=20, preview_every=5) for i in range(12)]
        for j in jobs:
            broker.enqueue(j)
        end = time.monotonic() + 30
        while not any(broker.events(j.id) for j in jobs):  # it runs the first jobs
            assert time.monotonic() < end
            time.sleep(0.005)
        proc.kill()
        proc.wait(10)
        pending = broker.r.xpending_range(key("jobs", "tiny"), GROUP, "-", "+", 100, consumername="doomed")
        assert pending, "the kill came after the worker had finished its jobs"
    finally:
        if proc.poll() is None:
            proc.kill()
    t0 = time.monotonic()
    make_worker(worker_name="survivor")
    want = single_process(model, jobs)
    for j in jobs:
        evs = answers(broker, j.id)
        assert isinstance(evs[-1], Result) and evs[-1].images == want[j.id], j.id
        assert len(final_events(broker, j.id)) == 1, j.id
    end = time.monotonic() + 5
    while broker.depth("tiny") != (0, 0):
        assert time.monotonic() < end, broker.depth("tiny")
        time.sleep(0.02)
    assert time.monotonic() - t0 < 30


def test_a_worker_restarted_under_its_name_finishes_what_its_predecessor_held(make_worker, broker, model):
    jobs = [job(80 + i, steps=4) for i in range(3)]
    for j in jobs:
        broker.enqueue(j)
    broker.heartbeat("same", 1.0, {"model": "tiny"})  # the first process of "same" claims them, then dies
    assert len(broker.claim("tiny", "same", count=3, block_ms=100)) == 3
    t0 = time.monotonic()
    make_worker(worker_name="same")  # its lease keeps any other worker off those jobs
    want = single_process(model, jobs)
    for j in jobs:
        evs = answers(broker, j.id, timeout=20)
        assert isinstance(evs[-1], Result) and evs[-1].images == want[j.id], j.id
        assert len(final_events(broker, j.id)) == 1, j.id
    assert time.monotonic() - t0 < 10
    end = time.monotonic() + 5
    while broker.depth("tiny") != (0, 0):
        assert time.monotonic() < end, broker.depth("tiny")
        time.sleep(0.02)
    assert broker.stats("tiny")["reclaimed"] == 3


def test_a_redis_outage_does_not_lose_the_running_job(make_worker, broker, model, redis_server):
    make_worker()
    j = job(60, steps=64, n=4, preview_every=4)
    broker.enqueue(j)
    end = time.monotonic() + 30
    while not broker.events(j.id):
        assert time.monotonic() < end
        time.sleep(0.01)
    redis_server.stop()  # in memory only: the restarted server has lost every key
    time.sleep(0.5)
    redis_server.start()
    (final,) = [ev for _, ev in _until_final(broker, j.id)]
    assert isinstance(final, Result) and final.images == single_process(model, [j])[j.id]


def _until_final(broker: Broker, job_id: str, timeout: float = 30) -> list:
    end = time.monotonic() + timeout
    while True:
        finals = [(eid, ev) for eid, ev in broker.events(job_id) if not isinstance(ev, Progress)]
        if finals:
            return finals
        assert time.monotonic() < end, "no final event after the outage"
        time.sleep(0.05)


def test_the_worker_role_needs_a_redis_url(capsys):
    from tests.serving import cli

    code, err = cli(capsys, "serve", "--role", "worker")
    assert code == 2
    assert err.strip() == ("vqdiff serve: error: --redis-url ($VQDIFF_REDIS_URL): None is not allowed; "
                           "expected a redis:// URL: --role worker needs one")
