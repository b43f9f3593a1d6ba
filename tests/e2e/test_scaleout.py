"""The scale-out roles as separate processes over a real redis-server: one API node, two workers, 200
requests from 32 concurrent clients, one worker killed with SIGKILL mid-run while it holds jobs. Every
request gets exactly one answer (one final event in Redis), and every image is byte-equal to the same
request served by the single process."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest
import redis

from tests.e2e.scaleout_procs import api, finals, held, images, reference, tiny_folder, wait_ready, worker
from tests.serving import RedisServer

JOBS, CLIENTS = 200, 32
STEPS = 24  # forwards per job


@pytest.fixture(scope="module")
def folder(tokenizer, tiny_config, tmp_path_factory):
    return tiny_folder(tokenizer, tiny_config, tmp_path_factory.mktemp("model"))


def test_a_worker_killed_mid_run_loses_and_duplicates_nothing(folder, tmp_path):
    redis_server = RedisServer(tmp_path).start()
    url = redis_server.url
    workers = [worker(tmp_path, f"w{i}", url, folder, "--lease-s", "1", "--max-rows", "8") for i in range(2)]
    node, base = api(tmp_path, url)
    roles = [w for w, _ in workers] + [node]
    answers: dict[int, httpx.Response | Exception] = {}
    try:
        for w, ready in workers:
            wait_ready(ready, roles, w.log.name)
        wait_ready(f"{base}/readyz", roles, "the API node")
        bodies = [{"prompt": ("a red circle", "a blue square above a green triangle")[i % 2], "seed": 1000 + i,
                   "steps": STEPS, "n": 1 + i % 2} for i in range(JOBS)]

        def client(c: int) -> None:
            with httpx.Client(timeout=120) as http:
                for i in range(c, JOBS, CLIENTS):
                    try:
                        answers[i] = http.post(f"{base}/v1/generate", json=bodies[i])
                    except httpx.HTTPError as e:  # recorded: the assertions below name it
                        answers[i] = e

        threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        r = redis.Redis.from_url(url)
        deadline = time.monotonic() + 60
        while len(answers) < JOBS // 4:  # a quarter answered: the run is well under way
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.01)
        while held(r, "w0") == 0:  # kill w0 while it holds jobs, so they must be reclaimed
            assert time.monotonic() < deadline, "w0 never held a job"
        workers[0][0].proc.send_signal(signal.SIGKILL)
        killed_at = len(answers)
        for t in threads:
            t.join(120)
        took = time.monotonic() - t0

        assert sorted(answers) == list(range(JOBS))
        bad = {i: a if isinstance(a, Exception) else a.text[:200] for i, a in answers.items()
               if isinstance(a, Exception) or a.status_code != 200}
        assert not bad, bad
        assert killed_at < JOBS * 3 // 4, f"the kill came late: {killed_at} answers before it"
        ids = [answers[i].json()["id"] for i in range(JOBS)]
        assert len(set(ids)) == JOBS
        counts = {i: finals(r, job) for i, job in enumerate(ids)}
        assert set(counts.values()) == {1}, counts  # one final event per job, the re-runs wrote none
        assert r.hget("vqdiff:stats", "reclaimed:tiny") not in (None, b"0")  # w0's jobs moved to w1
        print(f"{JOBS} jobs in {took:.1f} s, w0 killed after {killed_at} answers")
    finally:
        for role in roles:
            role.kill()
        redis_server.stop()
    want = reference(folder, bodies)  # once the roles are gone: they would share the two cores
    wrong = [i for i in range(JOBS) if images(answers[i]) != want[i]]
    assert not wrong, f"{len(wrong)} requests differ from the single process: {wrong[:10]}"
