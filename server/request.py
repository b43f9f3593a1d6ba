"""A request's life in the engine: its status, what it asked for, and the events it emits.

The status is one ordered ``IntEnum``; every finished status comes after the live ones, so
``status.finished`` is one comparison. Events go to the request's ``emit`` callable, which must be
thread-safe (the engine thread calls it; an asyncio handler hands it to its loop).
"""

from __future__ import annotations

import enum
import itertools
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Union

from vqdiff.model.io.edit_input import EditInput  # an edit's PNGs: checked by engine.validate
from vqdiff.model.sampling.params import GenerationParams


class Status(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    # finished: everything from here on
    FINISHED_OK = 2
    FINISHED_CANCELLED = 3  # the client went away or asked to stop
    FINISHED_DEADLINE = 4  # past its deadline (queued or running)
    FINISHED_FAILED = 5  # an error in this request (NaN, decode, a batch it could not run in)
    FINISHED_UNAVAILABLE = 6  # the server stopped before it could finish

    @property
    def finished(self) -> bool:
        return self >= Status.FINISHED_OK

    @property
    def outcome(self) -> str:
        """The label of ``vqdiff_requests_total``."""
        return {Status.FINISHED_OK: "success", Status.FINISHED_CANCELLED: "cancelled",
                Status.FINISHED_DEADLINE: "deadline", Status.FINISHED_FAILED: "failed",
                Status.FINISHED_UNAVAILABLE: "unavailable"}.get(self, self.name.lower())


@dataclass(frozen=True)
class Progress:
    step: int  # steps done (1..total)
    total: int
    unmasked: float  # fraction of image tokens no longer masked, mean over the request's images
    previews: tuple[bytes, ...] = ()  # PNG per image: masked positions shown as the current argmax of p(x0)


@dataclass(frozen=True)
class Timings:
    queue_ms: float
    denoise_ms: float
    decode_ms: float
    total_ms: float


@dataclass(frozen=True)
class Result:
    images: tuple[bytes, ...]  # PNG per image
    seeds: tuple[int, ...]  # the seed of each image (seed, seed + 1, ...)
    params: GenerationParams  # as resolved for the first image
    timings: Timings


@dataclass(frozen=True)
class Failure:
    status: Status  # a finished status other than FINISHED_OK
    message: str


Event = Union[Progress, Result, Failure]

_ids = itertools.count()


def new_id() -> str:
    return f"gen-{uuid.uuid4().hex[:16]}"


@dataclass(eq=False)
class Request:
    """What a client asked for. ``params`` are resolved (seed filled in) before the engine sees it."""

    prompt: str
    params: GenerationParams
    n: int = 1
    preview_every: int = 0  # 0: no previews
    resumable: bool = False  # an SSE stream: its client may reconnect with Last-Event-ID
    model: str | None = None  # the served model's name (``Catalog.resolve``); None: the process's only one
    edit: EditInput | None = None  # None: a generation from an all-masked grid
    emit: Callable[[Event], None] = lambda event: None
    timeout_s: float | None = None  # None: the engine's default deadline
    id: str = field(default_factory=new_id)
    arrival: float = field(default_factory=time.monotonic)
    status: Status = Status.WAITING
    # set by the engine
    deadline: float = float("inf")
    admitted_at: float | None = None
    denoised_at: float | None = None
    first_preview_at: float | None = None
    cancel_requested: bool = False
    seq: int = field(default_factory=lambda: next(_ids))  # arrival order, for FIFO ties

    @property
    def rows(self) -> int:
        """Rows the scheduler budgets for this request: a cond and an uncond row per image (at
        guidance_scale 1 the forward runs only the cond rows, ``sampler.guided``: the budget is then
        an upper bound)."""
        return 2 * self.n
