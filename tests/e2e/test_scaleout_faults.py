"""Faults of the scale-out roles, each through real processes (an API node, two workers, a real
redis-server):

- a poison job, one that kills every worker that runs it, goes to the dead-letter stream after
  ``--max-deliveries`` deliveries and its client gets one clear error, while the jobs sent with it are
  all served and the workers, restarted under their own names as a supervisor would, serve on;
- Redis stopped for 5 s mid-run: new requests get 503 (Retry-After, the JSON error envelope) and the
  API's /readyz is 503 meanwhile; every request accepted before is answered, byte-equal to the single
  process, and no worker exits;
- SIGTERM to a worker whose jobs outlast ``--grace-s``: it exits 0 within the grace period and a few
  seconds, and its unfinished jobs are answered by the other worker, each exactly once.
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time

import httpx
import pytest
import redis

from tests.e2e.poison_worker import POISON
from tests.e2e.scaleout_procs import (
    MODEL, Role, api, finals, held, images, reference, tiny_folder, wait_ready, worker,
)
from tests.serving import RedisServer
from vqdiff.server.broker import Broker, key

PROMPTS = ("a red circle", "a blue square above a green triangle")


@pytest.fixture(scope="module")
def folder(tokenizer, tiny_config, tmp_path_factory):
    return tiny_folder(tokenizer, tiny_config, tmp_path_factory.mktemp("model"))


class Cluster:
    """A redis-server, two workers ``w0``/``w1`` (``module``: the command they run) and an API node."""

    def __init__(self, tmp, folder, *worker_flags: str, persist: bool = False, module: str = "vqdiff.cli"):
        self.redis = RedisServer(tmp, persist=persist).start()
        self.workers: list[tuple[Role, str]] = [
            worker(tmp, f"w{i}", self.redis.url, folder, *worker_flags, module=module) for i in range(2)]
        self.api, self.base = api(tmp, self.redis.url)
        self.r = redis.Redis.from_url(self.redis.url)
        self.broker = Broker(self.redis.url)

    @property
    def roles(self) -> list[Role]:
        return [w for w, _ in self.workers] + [self.api]

    def wait_ready(self) -> None:
        for w, ready in self.workers:
            wait_ready(ready, self.roles, w.log.name)
        wait_ready(f"{self.base}/readyz", self.roles, "the API node")

    def close(self) -> None:
        for role in self.roles:
            role.kill()
        self.redis.stop()


def send(base: str, bodies: list[dict], answers: dict, timeout: float = 120, only=None) -> list[threading.Thread]:
    """One client thread per body (those of the indices ``only``: all by default), started;
    ``answers[i]``: the response to ``bodies[i]`` (or the transport error)."""

    def client(i: int) -> None:
        try:
            answers[i] = httpx.post(f"{base}/v1/generate", json=bodies[i], timeout=timeout)
        except httpx.HTTPError as e:  # recorded: the assertions name it
            answers[i] = e

    threads = [threading.Thread(target=client, args=(i,)) for i in (range(len(bodies)) if only is None else only)]
    for t in threads:
        t.start()
    return threads


def failed(answers: dict, ok=lambda i: True) -> dict:
    return {i: a if isinstance(a, Exception) else (a.status_code, a.text[:300]) for i, a in answers.items()
            if ok(i) and (isinstance(a, Exception) or a.status_code != 200)}


def error_body(answer: httpx.Response) -> dict:
    """The JSON error envelope ``{"error": {message, type, param, code}}``, checked."""
    body = answer.json()
    assert set(body) == {"error"} and {"message", "type", "code"} <= set(body["error"]), body
    return body["error"]


def test_a_job_that_kills_every_worker_is_dead_lettered_and_the_rest_are_served(folder, tmp_path):
    deliveries = 3
    c = Cluster(tmp_path, folder, "--lease-s", "1", "--max-rows", "8", "--max-deliveries", str(deliveries),
                module="tests.e2e.poison_worker")
    deaths: list[tuple[str, int]] = []
    stop = threading.Event()

    def supervise() -> None:  # what Kubernetes does: a worker that exits is started again, same name
        while not stop.wait(0.05):
            for w, _ in c.workers:
                if not w.alive():
                    deaths.append((w.log.name, w.proc.returncode))
                    w.restart()

    supervisor = threading.Thread(target=supervise)
    try:
        c.wait_ready()
        supervisor.start()
        bodies = [{"prompt": PROMPTS[i % 2], "seed": 100 + i, "steps": 64, "n": 1 + i % 2} for i in range(20)]
        answers: dict = {}
        threads = send(c.base, bodies[:12], answers, timeout=150)
        end = time.monotonic() + 30
        while held(c.r, "w0") == 0 or held(c.r, "w1") == 0:  # both run jobs: the poison shares a worker
            assert time.monotonic() < end, "the workers never both held jobs"
            time.sleep(0.01)
        bodies[12] = {"prompt": POISON, "seed": 7, "steps": 64}
        threads += send(c.base, bodies, answers, timeout=150, only=range(12, 20))
        for t in threads:
            t.join(160)

        assert not failed(answers, ok=lambda i: i != 12), failed(answers)  # every other job: served
        poison = answers[12]
        assert not isinstance(poison, Exception) and poison.status_code == 500, poison
        error = error_body(poison)
        assert error["code"] == "generation_failed", error
        assert error["message"].startswith("this request could not be served: "), error
        assert f"delivered {deliveries + 1} times" in error["message"], error
        assert len(deaths) == deliveries and {code for _, code in deaths} == {137}, deaths  # one per delivery
        (_, dead), = c.r.xrange(key("dead"))
        job = json.loads(dead[b"job"])
        assert job["prompt"] == POISON and f"delivered {deliveries + 1} times".encode() in dead[b"reason"]
        stats = c.broker.stats(MODEL)
        assert stats["dead_lettered"] == 1 and stats["reclaimed"] >= deliveries, stats
        ids = [job["id"]] + [answers[i].json()["id"] for i in range(len(bodies)) if i != 12]
        assert {i: finals(c.r, j) for i, j in enumerate(ids) if finals(c.r, j) != 1} == {}

        for w, ready in c.workers:  # the workers serve on
            wait_ready(ready, [c.api], w.log.name)
        more: dict = {}
        for t in send(c.base, [{"prompt": PROMPTS[i % 2], "seed": 500 + i, "steps": 8} for i in range(8)], more):
            t.join(60)
        assert not failed(more), failed(more)
        assert len(deaths) == deliveries, deaths
    finally:
        stop.set()
        if supervisor.is_alive():
            supervisor.join()
        c.close()


def test_a_redis_outage_refuses_new_requests_and_loses_none_it_accepted(folder, tmp_path):
    c = Cluster(tmp_path, folder, "--lease-s", "1", "--max-rows", "8", persist=True)
    outage_s = 5.0
    try:
        c.wait_ready()
        # one job of 4 images fills a worker (8 rows): 6 jobs each, one after the other, about 4 s
        bodies = [{"prompt": PROMPTS[i % 2], "seed": 300 + i, "steps": 64, "n": 4} for i in range(12)]
        answers: dict = {}
        threads = send(c.base, bodies, answers)
        end = time.monotonic() + 30
        while len(list(c.r.scan_iter(key("known", "*")))) < len(bodies):  # every one past submit: accepted
            assert time.monotonic() < end, "the requests were never enqueued"
            time.sleep(0.01)
        assert len(answers) <= len(bodies) // 2, "the jobs finished before the outage: make them longer"

        c.redis.stop()
        t0 = time.monotonic()
        refused, probes = [], []
        while time.monotonic() - t0 < outage_s:
            r = httpx.post(f"{c.base}/v1/generate", json={"prompt": PROMPTS[0], "steps": 4}, timeout=10)
            refused.append(r)
            probes.append((time.monotonic() - t0, httpx.get(f"{c.base}/readyz", timeout=10).status_code))
            for w, _ in c.workers:
                assert w.alive(), f"{w.log.name} exited during the outage:\n{w.tail()}"
            time.sleep(0.25)
        c.redis.start()

        assert refused and {r.status_code for r in refused} == {503}, [(r.status_code, r.text) for r in refused]
        for r in refused:
            assert r.headers.get("retry-after", "").isdigit(), r.headers
            assert error_body(r)["code"] == "unavailable"
        late = [status for at, status in probes if at >= 1.5]  # /readyz is cached for a second
        assert late and set(late) == {503}, probes
        for t in threads:
            t.join(120)
        assert not failed(answers), failed(answers)
        for w, _ in c.workers:
            assert w.alive(), f"{w.log.name} exited:\n{w.tail()}"
        counts = {i: finals(c.r, answers[i].json()["id"]) for i in answers}
        assert set(counts.values()) == {1}, counts
        assert c.broker.stats(MODEL)["reclaimed"] == 0  # every lease lapsed, yet no live worker lost a job
        wait_ready(f"{c.base}/readyz", c.roles, "the API node after the outage", timeout=10)
        after = httpx.post(f"{c.base}/v1/generate", json={"prompt": PROMPTS[1], "steps": 4}, timeout=30)
        assert after.status_code == 200, after.text
    finally:
        c.close()
    want = reference(folder, bodies)
    wrong = [i for i in range(len(bodies)) if images(answers[i]) != want[i]]
    assert not wrong, f"requests {wrong} differ from the single process"


def test_a_worker_stopped_with_sigterm_hands_its_unfinished_jobs_over(folder, tmp_path):
    grace_s = 0.5
    c = Cluster(tmp_path, folder, "--lease-s", "1", "--max-rows", "64", "--grace-s", str(grace_s))
    try:
        c.wait_ready()
        # 4 jobs of 8 images a worker: 100 forwards of 64 rows, about 2 s, well past the grace period
        bodies = [{"prompt": PROMPTS[i % 2], "seed": 700 + i, "steps": 100, "sampler": "posterior", "n": 8}
                  for i in range(8)]
        answers: dict = {}
        threads = send(c.base, bodies, answers)
        w0 = c.workers[0][0]
        end = time.monotonic() + 30
        while held(c.r, "w0") == 0:
            assert time.monotonic() < end, "w0 never held a job"
            time.sleep(0.01)
        time.sleep(0.2)  # its jobs run
        t0 = time.monotonic()
        w0.proc.send_signal(signal.SIGTERM)
        code = w0.proc.wait(grace_s + 10)
        took = time.monotonic() - t0
        assert code == 0, w0.tail()
        assert took < grace_s + 5, took
        handed = re.search(r"handing (\d+) unfinished jobs back", w0.tail(100_000))
        assert handed, f"w0 finished everything within the grace period: make the jobs longer\n{w0.tail()}"
        assert not answers or len(answers) < len(bodies)
        for t in threads:
            t.join(120)
        assert not failed(answers), failed(answers)
        counts = {i: finals(c.r, answers[i].json()["id"]) for i in answers}
        assert set(counts.values()) == {1}, counts
        assert c.broker.stats(MODEL)["reclaimed"] >= int(handed.group(1)) >= 1  # w1 took them over
        assert c.workers[1][0].alive()
    finally:
        c.close()
    want = reference(folder, bodies)
    wrong = [i for i in range(len(bodies)) if images(answers[i]) != want[i]]
    assert not wrong, f"requests {wrong} differ from the single process"
