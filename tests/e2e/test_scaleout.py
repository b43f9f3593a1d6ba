"""The scale-out roles as separate processes over a real redis-server: one API node, two workers, one
of them killed with SIGKILL mid-run. Every request gets exactly one answer, and every image is
byte-equal to the same request served by the single process."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import redis
import torch

from vqdiff.model.io.folder import load_model, random_model, save_model
from vqdiff.model.io.images import decode_pngs
from vqdiff.model.sampling.sampler import request_params, sample
from vqdiff.server.broker import GROUP, key
from tests.serving import ROOT, RedisServer, free_port

JOBS, CLIENTS = 40, 8


def role(*flags: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vqdiff.cli", "serve", *flags], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_ready(url: str, procs: list[subprocess.Popen], what: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        for p in procs:
            assert p.poll() is None, p.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, f"{what} never became ready"
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)


@pytest.fixture(scope="module")
def folder(tokenizer, tiny_config, tmp_path_factory):
    model = random_model(tiny_config, tokenizer, seed=3).eval()
    with torch.no_grad():
        model.transformer.out.weight.mul_(40.0)
        model.null_cond.embeddings.normal_()
    return save_model(model, tmp_path_factory.mktemp("model") / "tiny")


def test_a_worker_killed_mid_run_loses_and_duplicates_nothing(folder, tmp_path):
    redis_server = RedisServer(tmp_path).start()
    url = redis_server.url
    api_port, ports = free_port(), (free_port(), free_port())
    workers = [role("--role", "worker", "--redis-url", url, "--model", str(folder), "--worker-name", f"w{i}",
                    "--worker-port", str(ports[i]), "--lease-s", "1", "--max-rows", "8", "--dtype", "fp32")
               for i in range(2)]
    api = role("--role", "api", "--redis-url", url, "--host", "127.0.0.1", "--http-port", str(api_port),
               "--grpc-port", "0")
    procs = [*workers, api]
    base = f"http://127.0.0.1:{api_port}"
    answers: dict[int, httpx.Response] = {}
    try:
        for i, port in enumerate(ports):
            wait_ready(f"http://127.0.0.1:{port}/readyz", procs, f"worker {i}")
        wait_ready(f"{base}/readyz", procs, "the API node")
        bodies = [{"prompt": ("a red circle", "a blue square above a green triangle")[i % 2], "seed": 1000 + i,
                   "steps": 30, "n": 1 + i % 2} for i in range(JOBS)]

        def client(c: int) -> None:
            for i in range(c, JOBS, CLIENTS):
                try:
                    answers[i] = httpx.post(f"{base}/v1/generate", json=bodies[i], timeout=120)
                except httpx.HTTPError as e:  # recorded: the assertions below name it
                    answers[i] = e

        threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
        for t in threads:
            t.start()
        r = redis.Redis.from_url(url)
        deadline = time.monotonic() + 60
        while len(answers) < JOBS // 4:  # a quarter answered: the run is well under way
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.01)
        while True:  # kill w0 while it holds jobs, so they must be reclaimed
            held = {c["name"].decode(): c["pending"] for c in r.xinfo_consumers(key("jobs", "tiny"), GROUP)}
            if held.get("w0", 0) > 0:
                workers[0].send_signal(signal.SIGKILL)
                break
            assert time.monotonic() < deadline, f"w0 never held a job: {held}"
        for t in threads:
            t.join(120)

        assert sorted(answers) == list(range(JOBS))
        bad = {i: a if isinstance(a, Exception) else a.text[:200] for i, a in answers.items()
               if isinstance(a, Exception) or a.status_code != 200}
        assert not bad, bad
        finals = {}
        for i in range(JOBS):
            job = answers[i].json()["id"]
            finals[i] = sum(f[b"kind"] in (b"result", b"failure") for _, f in r.xrange(key("events", job)))
        assert set(finals.values()) == {1}, finals  # one final event per job, the re-runs wrote none
        model = load_model(folder, device="cpu", dtype=torch.float32).eval()
        for i in range(JOBS):
            got = [base64.b64decode(im["b64_json"]) for im in answers[i].json()["images"]]
            given = {k: v for k, v in bodies[i].items() if k not in ("prompt", "n")}
            params = [request_params(model, {**given, "seed": given["seed"] + k}) for k in range(bodies[i]["n"])]
            tokens = sample(model, [bodies[i]["prompt"]] * bodies[i]["n"], params, decode=False).tokens
            assert got == decode_pngs(model, tokens, batch=1), f"request {i}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        redis_server.stop()
