"""A real server (engine + HTTP + optional gRPC, ``vqdiff.server.main.serve_async``) on loopback, in a
background thread with its own event loop, for end-to-end tests."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

from vqdiff.server.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def confident_model(tokenizer, config, seed: int = 3):
    """A random model with confident, varied predictions: its output layer scaled by 40 and its null
    condition drawn at random (a zero null makes guidance a no-op)."""
    import torch

    from vqdiff.model.io.folder import random_model

    m = random_model(config, tokenizer, seed=seed).eval()
    with torch.no_grad():
        m.transformer.out.weight.mul_(40.0)
        m.null_cond.embeddings.normal_()
    return m


def sse_events(lines) -> list[dict]:
    """SSE blocks as {"id", "event", "data"} (comments skipped)."""
    out, block = [], {}
    for line in lines:
        if line == "":
            if block:
                out.append(block)
                if block.get("event") in ("result", "error"):
                    return out
            block = {}
        elif not line.startswith(":"):
            field, _, value = line.partition(": ")
            block[field] = json.loads(value) if field == "data" else value
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    def __init__(self, model, settings: Settings | None = None, **overrides):
        base = settings or Settings(host="127.0.0.1", grpc_port=0, grace_s=5.0)
        self.settings = replace(base, http_port=free_port(), **overrides)
        self.model = model
        self.loop = asyncio.new_event_loop()
        self.started = asyncio.Event()
        self.stop_event = asyncio.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        from vqdiff.server.main import Server

        self.server = Server(self.settings, model=model, folder=None)
        self.engine = self.server.engine

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings.http_port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.run(started=self.started, stop=self.stop_event))
        except BaseException as e:  # surfaced by start()/stop()
            self.error = e

    def start(self) -> ServerThread:
        self.thread.start()
        for _ in range(600):
            if self.started.is_set() or self.error is not None:
                break
            self.thread.join(0.05)
        if self.error is not None:
            raise self.error
        assert self.started.is_set(), "the server did not start in 30 s"
        return self

    def begin_stop(self) -> None:
        """What SIGTERM does: start the drain (returns at once)."""
        self.loop.call_soon_threadsafe(self.stop_event.set)

    def stop(self, timeout: float = 60) -> None:
        self.begin_stop()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the server did not stop"
        if self.error is not None:
            raise self.error

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def cli(capsys, *argv: str) -> tuple[int, str]:
    """``vqdiff ARGV`` in this process (a subprocess would spend seconds importing torch each time):
    the exit status and stderr. tests/unit/test_sampler.py runs the real ``python -m vqdiff.cli``."""
    from vqdiff.cli import main

    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse's own errors
        code = e.code
    return code, capsys.readouterr().err


def serve_process(folder, *flags: str, ready_s: float = 60) -> tuple[subprocess.Popen, str, int]:
    """A real ``vqdiff serve`` on loopback for ``folder`` (fp32), once /readyz answers 200:
    (the process, its HTTP URL, its gRPC port). Its output is piped to ``proc.stdout``."""
    import httpx

    http_port, grpc_port = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vqdiff.cli", "serve", "--model", str(folder), "--host", "127.0.0.1",
         "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--dtype", "fp32", *flags],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + ready_s
    while True:
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read().decode()[-3000:])
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the server never became ready")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return proc, url, grpc_port
        except httpx.HTTPError:
            pass
        time.sleep(0.1)


class RedisServer:
    """A real ``redis-server`` on a free loopback port for the tests of the scale-out roles.
    ``stop()`` (SIGTERM) then ``start()`` again keeps the port: a Redis outage. In memory only (no RDB,
    no AOF) by default: the restarted server has lost every key. ``persist=True``: an append-only
    file in ``workdir``, fsynced at every write, so the restarted server has every stream, group and
    key it had (leases included, expiring on the wall clock)."""

    def __init__(self, workdir: Path, persist: bool = False):
        import shutil

        self.binary = shutil.which("redis-server")
        if self.binary is None:
            import pytest

            if os.environ.get("CI"):
                raise RuntimeError("redis-server is not installed (.ci/run installs it)")
            pytest.skip("redis-server is not installed")
        self.workdir, self.persist, self.port, self.proc = workdir, persist, free_port(), None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        import redis

        aof = ["--appendonly", "yes", "--appendfsync", "always"] if self.persist else ["--appendonly", "no"]
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *aof,
             "--dir", str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:  # BusyLoadingError too: still loading its append-only file
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def chromium(module_level: bool = False) -> str:
    """The system Chromium's path, with playwright to drive it; else skip, or fail under CI (where
    .ci/run installs both)."""
    import shutil

    import pytest

    path = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        import playwright.sync_api  # noqa: F401
        have_playwright = True
    except ImportError:
        have_playwright = False
    if path is None or not have_playwright:
        missing = "chromium" if path is None else "the playwright package"
        if os.environ.get("CI"):
            pytest.fail(f"{missing} is not installed; CI must run the browser test", pytrace=False)
        pytest.skip(f"{missing} is not installed", allow_module_level=module_level)
    return path
