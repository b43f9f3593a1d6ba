"""The bridge from the engine thread to asyncio handlers (HTTP and gRPC share it).

``EventStream`` submits a request whose events land in an ``asyncio.Queue`` on the caller's loop;
leaving the ``async with`` block before the final event cancels the request, so a client that goes
away frees its batch slot at the next step boundary.
"""

from __future__ import annotations

import asyncio

from vqdiff.server.engine import Draining, Engine, QueueFull
from vqdiff.server.errors import from_submit
from vqdiff.server.request import Event, Failure, Request, Result


class EventStream:
    def __init__(self, engine: Engine, req: Request):
        self.engine, self.req = engine, req
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.finished = False

    async def __aenter__(self) -> EventStream:
        loop = asyncio.get_running_loop()

        def emit(event: Event) -> None:  # engine or decode thread
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, event)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

        self.req.emit = emit
        self.engine.submit(self.req)  # raises ValueError / QueueFull / Draining; nothing queued then
        return self

    async def __aexit__(self, *exc) -> None:
        if not self.finished:
            self.engine.cancel(self.req)

    async def next(self, timeout: float | None = None) -> Event | None:
        """The next event, or None after ``timeout`` seconds without one."""
        try:
            event = await asyncio.wait_for(self.queue.get(), timeout)
        except asyncio.TimeoutError:
            return None
        if isinstance(event, (Result, Failure)):
            self.finished = True
        return event


class ApiEventStream(EventStream):
    """``EventStream`` whose refusals (bad input, queue full, draining) are ``ApiError``s: what the
    HTTP and gRPC handlers use."""

    async def __aenter__(self) -> ApiEventStream:
        try:
            return await super().__aenter__()
        except (ValueError, QueueFull, Draining) as e:
            raise from_submit(e) from None
