"""The bridge from the engine thread to asyncio handlers (HTTP and gRPC share it).

``EventStream`` submits a request whose events land in an ``asyncio.Queue`` on the caller's loop;
leaving the ``async with`` block before the final event cancels the request, so a client that goes
away frees its batch slot at the next step boundary.

``engine.blocking_submit`` says whether ``submit`` waits on I/O (the API role's Redis round trips);
then it runs in a worker thread, so one slow Redis call never stalls every other client of the loop.

An engine may hand each event an id (``emit(event, event_id)``): the API role's ``RemoteEngine``
passes the Redis entry id, which the SSE stream sends as ``id:`` so that a client can resume.
``ResumeStream`` follows an existing request's events after such an id instead of submitting.
"""

from __future__ import annotations

import asyncio

from vqdiff.server.engine import Draining, Engine, QueueFull
from vqdiff.server.errors import from_submit
from vqdiff.server.request import Event, Failure, Request, Result
from vqdiff.server.scheduler import Unavailable, UnknownRequest


class EventStream:
    def __init__(self, engine: Engine, req: Request):
        self.engine, self.req = engine, req
        self.queue: asyncio.Queue[tuple[Event, str | None]] = asyncio.Queue()
        self.finished = False
        self.last_id: str | None = None  # the id of the event ``next`` returned last (None: the engine gives none)

    def _emitter(self):
        loop = asyncio.get_running_loop()

        def emit(event: Event, event_id: str | None = None) -> None:  # engine or decode thread
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, (event, event_id))
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

        return emit

    async def __aenter__(self) -> EventStream:
        self.req.emit = self._emitter()
        # raises ValueError / QueueFull / Draining / Unavailable; nothing queued then. The API role's
        # submit is a few Redis round trips: a thread waits on them, not the event loop
        if self.engine.blocking_submit:
            await _finish_in_thread(self.engine.submit, self.req, self.engine)
        else:
            self.engine.submit(self.req)
        return self

    async def __aexit__(self, *exc) -> None:
        if not self.finished:
            self.engine.cancel(self.req)

    async def next(self, timeout: float | None = None) -> Event | None:
        """The next event, or None after ``timeout`` seconds without one."""
        try:
            event, self.last_id = await asyncio.wait_for(self.queue.get(), timeout)
        except asyncio.TimeoutError:
            return None
        if isinstance(event, (Result, Failure)):
            self.finished = True
        return event


async def _finish_in_thread(call, req: Request, engine, *args) -> None:
    """``call(req, *args)`` in a worker thread. A caller cancelled meanwhile (a gRPC client that went
    away) does not leak the request: once the call has queued it, it is cancelled."""
    task = asyncio.ensure_future(asyncio.to_thread(call, req, *args))
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(lambda t: t.cancelled() or t.exception() is not None or engine.cancel(req))
        raise


REFUSALS = (ValueError, QueueFull, Draining, Unavailable, UnknownRequest)


class ApiEventStream(EventStream):
    """``EventStream`` whose refusals (bad input, queue full, draining, unavailable) are ``ApiError``s:
    what the HTTP and gRPC handlers use."""

    async def __aenter__(self) -> ApiEventStream:
        try:
            return await super().__aenter__()
        except REFUSALS as e:
            raise from_submit(e) from None


class ResumeStream(EventStream):
    """The events of the request ``req.id`` after event id ``after``, through ``engine.follow``
    (engines without it answer ``UnknownRequest``). Refusals are ``ApiError``s."""

    def __init__(self, engine: Engine, req: Request, after: str):
        super().__init__(engine, req)
        self.after = after

    async def __aenter__(self) -> ResumeStream:
        self.req.emit = self._emitter()
        follow = getattr(self.engine, "follow", None)
        try:
            if follow is None:
                raise UnknownRequest(f"{self.req.id}: this server keeps no request events to resume "
                                     f"(only the API role, which keeps them in Redis, does)")
            await _finish_in_thread(follow, self.req, self.engine, self.after)  # Redis round trips
        except REFUSALS as e:
            raise from_submit(e) from None
        return self
