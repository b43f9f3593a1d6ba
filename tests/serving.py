"""A real server (engine + HTTP + optional gRPC, ``vqdiff.server.main.serve_async``) on loopback, in a
background thread with its own event loop, for end-to-end tests."""

from __future__ import annotations

import asyncio
import socket
import threading
from dataclasses import replace

from vqdiff.server.settings import Settings


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
