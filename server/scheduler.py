"""The batching scheduler: which requests run in the next forward. Plain Python, no torch.

Two calls drive it, once per engine step (the contract of vLLM v1's scheduler):

- ``schedule(now)``: retire cancelled and expired requests, admit waiting ones (FIFO) while their
  rows fit ``max_rows``, and return what runs now;
- ``update(finished)``: the engine reports which running requests completed or failed.

Requests join and leave only between steps. Admission is strictly first-come-first-served: a big
request at the head of the queue is not overtaken by small ones behind it (no starvation).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from vqdiff.server.request import Request, Status


class QueueFull(Exception):
    """More than ``max_waiting`` requests would be queued."""


class Draining(Exception):
    """The server is shutting down and takes no new requests."""


class Unavailable(Exception):
    """What the request needs cannot be reached now (the API role: Redis is down); retry later."""


class UnknownRequest(Exception):
    """No request with this id is known (resuming the events of a request that never existed or expired)."""


@dataclass
class ScheduleOutput:
    admitted: list[Request] = field(default_factory=list)  # new this step: encode their text first
    running: list[Request] = field(default_factory=list)  # everything that steps now (admitted included)
    finished: list[Request] = field(default_factory=list)  # retired before this step (cancelled, deadline)

    @property
    def rows(self) -> int:
        return sum(r.rows for r in self.running)


class Scheduler:
    def __init__(self, max_rows: int, max_waiting: int):
        if max_rows < 2:
            raise ValueError(f"max_rows: {max_rows} is not allowed; expected >= 2")
        self.max_rows = max_rows
        self.max_waiting = max_waiting  # requests queued beyond those that join at the next step
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.draining = False

    # -- called by the API side (under the engine's lock) ------------------------------------------

    def add(self, req: Request) -> None:
        """Queue a request, or refuse it (nothing is queued when this raises)."""
        if self.draining:
            raise Draining("the server is shutting down")
        if req.rows > self.max_rows:
            raise ValueError(f"n: {req.n} is not allowed; at most {self.max_rows // 2} images fit one batch")
        beyond, rows = self._backlog()
        joins_next_step = beyond == 0 and rows + req.rows <= self.max_rows
        if not joins_next_step and beyond + 1 > self.max_waiting:
            raise QueueFull(f"{beyond} requests are waiting for a batch slot (max_waiting={self.max_waiting})")
        req.status = Status.WAITING
        self.waiting.append(req)

    def _backlog(self) -> tuple[int, int]:
        """(queued requests that will NOT join at the next step, rows in use once those that will have)."""
        rows = sum(r.rows for r in self.running)
        joining = 0
        for r in self.waiting:
            if rows + r.rows > self.max_rows:
                break
            rows += r.rows
            joining += 1
        return len(self.waiting) - joining, rows

    def cancel(self, req: Request) -> None:
        """Mark a request to leave at the next step boundary (idempotent; finished ones are left alone)."""
        if not req.status.finished:
            req.cancel_requested = True

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    # -- called by the engine once per step --------------------------------------------------------

    def schedule(self, now: float) -> ScheduleOutput:
        out = ScheduleOutput()
        self.running = self._retire(self.running, now, out.finished)
        self.waiting = deque(self._retire(self.waiting, now, out.finished))

        rows = sum(r.rows for r in self.running)
        while self.waiting and rows + self.waiting[0].rows <= self.max_rows:
            r = self.waiting.popleft()
            r.status = Status.RUNNING
            r.admitted_at = now
            rows += r.rows
            self.running.append(r)
            out.admitted.append(r)
        out.running = list(self.running)
        return out

    @staticmethod
    def _retire(queue, now: float, finished: list[Request]) -> list[Request]:
        keep = []
        for r in queue:
            if r.cancel_requested:
                r.status = Status.FINISHED_CANCELLED
            elif now >= r.deadline:
                r.status = Status.FINISHED_DEADLINE
            else:
                keep.append(r)
                continue
            finished.append(r)
        return keep

    def update(self, finished: dict[Request, Status]) -> None:
        """Retire running requests with their final status (FINISHED_OK or a failure)."""
        for r, status in finished.items():
            if not status.finished:
                raise ValueError(f"{r.id}: {status!r} is not a finished status")
            r.status = status
        self.running = [r for r in self.running if r not in finished]

    def drain(self) -> None:
        """Refuse new requests from now on; queued and running ones still complete."""
        self.draining = True

    def abort_all(self, status: Status = Status.FINISHED_UNAVAILABLE) -> list[Request]:
        """Finish every queued and running request with ``status`` (shutdown past the grace period)."""
        gone = list(self.running) + list(self.waiting)
        for r in gone:
            r.status = status
        self.running, self.waiting = [], deque()
        return gone
