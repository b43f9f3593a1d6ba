"""What the scale-out end-to-end tests share: the roles as real processes (``vqdiff serve --role
worker|api``, logging to a file each), the tiny model they serve, the single-process reference images
of a set of requests, and what Redis holds of each job's answers."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import redis
import torch

from vqdiff.model.io.folder import load_model, random_model, save_model
from vqdiff.model.io.images import decode_pngs
from vqdiff.model.sampling.sampler import request_params, sample
from vqdiff.server.broker import GROUP, key
from tests.serving import ROOT, free_port

MODEL = "tiny"


def tiny_folder(tokenizer, tiny_config, parent: Path) -> Path:
    """The tiny random model, made confident (as in tests/integration/test_engine.py), saved."""
    model = random_model(tiny_config, tokenizer, seed=3).eval()
    with torch.no_grad():
        model.transformer.out.weight.mul_(40.0)
        model.null_cond.embeddings.normal_()
    return save_model(model, parent / MODEL)


class Role:
    """One ``vqdiff serve`` process (or ``python -m MODULE ...``: a test's wrapper around the CLI),
    its output appended to ``log``. ``restart()`` runs the same command line again."""

    def __init__(self, log: Path, *argv: str, module: str = "vqdiff.cli"):
        self.log, self.argv, self.module = log, list(argv), module
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.restart()

    def restart(self) -> Role:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", self.module, *self.argv], cwd=ROOT, stdout=out,
                                         stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.starts += 1
        return self

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait(10)


def worker(tmp: Path, name: str, redis_url: str, folder: Path, *flags: str, module: str = "vqdiff.cli") -> tuple[Role, str]:
    """A worker process named ``name`` (fp32, one intra-op thread) and its /readyz URL."""
    port = free_port()
    role = Role(tmp / f"{name}.log", "serve", "--role", "worker", "--redis-url", redis_url, "--model", str(folder),
                "--worker-name", name, "--worker-port", str(port), "--dtype", "fp32", "--intra-op-threads", "1",
                *flags, module=module)
    return role, f"http://127.0.0.1:{port}/readyz"


def api(tmp: Path, redis_url: str, *flags: str) -> tuple[Role, str]:
    """An API node (HTTP only) and its base URL."""
    port = free_port()
    role = Role(tmp / "api.log", "serve", "--role", "api", "--redis-url", redis_url, "--host", "127.0.0.1",
                "--http-port", str(port), "--grpc-port", "0", *flags)
    return role, f"http://127.0.0.1:{port}"


def wait_ready(url: str, roles: list[Role], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        for r in roles:
            assert r.alive(), f"{r.log.name} exited ({r.proc.returncode}):\n{r.tail()}"
        assert time.monotonic() < deadline, f"{what} never became ready"
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)


def held(r: redis.Redis, worker: str) -> int:
    """How many jobs ``worker`` holds (delivered, not acknowledged)."""
    try:
        consumers = r.xinfo_consumers(key("jobs", MODEL), GROUP)
    except redis.ResponseError:  # no stream yet
        return 0
    return next((c["pending"] for c in consumers if c["name"].decode() == worker), 0)


def finals(r: redis.Redis, job_id: str) -> int:
    """The job's final events (result or failure) in Redis: exactly one, however many ran it."""
    return sum(f[b"kind"] in (b"result", b"failure") for _, f in r.xrange(key("events", job_id)))


def images(answer: httpx.Response) -> list[bytes]:
    return [base64.b64decode(im["b64_json"]) for im in answer.json()["images"]]


def reference(folder: Path, bodies: list[dict]) -> list[list[bytes]]:
    """The PNGs the single process draws for each of ``bodies`` (prompt, n, seed, steps, ...): image k
    of a request is its seed + k. Sampled in ONE batch and decoded one image per VQVAE call. In fp32
    the tokens do not depend on the batch (model/sampling/rng.py: each request's randomness is its
    own; the README's ``--dtype``: whatever shares the batch); the server batches the same requests
    otherwise, so were that ever untrue the comparison would fail, never pass wrongly."""
    model = load_model(folder, device="cpu", dtype=torch.float32).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model's matrices: one thread is faster than two
    try:
        return _reference(model, bodies)
    finally:
        torch.set_num_threads(threads)


def _reference(model, bodies: list[dict]) -> list[list[bytes]]:
    prompts, params, owner = [], [], []
    for i, b in enumerate(bodies):
        given = {k: v for k, v in b.items() if k not in ("prompt", "n")}
        for k in range(b.get("n", 1)):
            prompts.append(b["prompt"])
            params.append(request_params(model, {**given, "seed": given["seed"] + k}))
            owner.append(i)
    tokens = sample(model, prompts, params, decode=False).tokens  # (images, N)
    pngs = decode_pngs(model, tokens, batch=1)
    out: list[list[bytes]] = [[] for _ in bodies]
    for i, png in zip(owner, pngs):
        out[i].append(png)
    return out
