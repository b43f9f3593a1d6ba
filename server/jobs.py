"""What travels through Redis between API nodes and workers: a job (one request, parameters resolved)
and the events of a job (progress with previews, then one result or failure), as stream fields.

A job carries its resolved parameters (seed included), so whichever worker runs it, and however many
times, draws the same image. Events map one to one onto the engine's ``Progress`` / ``Result`` /
``Failure``; PNG bytes travel base64-encoded inside the JSON of the entry's ``data`` field.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass, field

from vqdiff.model.sampling.params import GenerationParams
from vqdiff.model.io.edit_input import EditInput
from vqdiff.server.request import Event, Failure, Progress, Request, Result, Status, Timings


@dataclass(frozen=True)
class Job:
    id: str
    model: str
    prompt: str
    params: GenerationParams  # resolved: seed and uncond filled in
    n: int = 1
    preview_every: int = 0
    deadline: float = float("inf")  # wall-clock seconds (time.time()): processes share no monotonic clock
    created: float = field(default_factory=time.time)
    edit: EditInput | None = None  # an edit's PNGs travel in the job, base64

    @classmethod
    def of(cls, req: Request, model: str, timeout_s: float) -> Job:
        return cls(id=req.id, model=model, prompt=req.prompt, params=req.params, n=req.n,
                   preview_every=req.preview_every, deadline=time.time() + timeout_s, edit=req.edit)

    def to_fields(self) -> dict[str, str]:
        d = {"id": self.id, "model": self.model, "prompt": self.prompt, "params": self.params.to_dict(), "n": self.n,
             "preview_every": self.preview_every, "deadline": self.deadline, "created": self.created}
        if self.edit is not None:
            e = self.edit
            d["edit"] = {"image": _b64(e.image), "mask": None if e.mask is None else _b64(e.mask),
                         "strength": e.strength}
        return {"job": json.dumps(d)}

    @classmethod
    def from_fields(cls, fields: dict) -> Job:
        """Raises ValueError on an entry that is not a job (a poison entry is failed, not retried)."""
        try:
            d = json.loads(_text(fields, "job"))
            e = d.get("edit")
            edit = None if e is None else EditInput(
                image=base64.b64decode(e["image"]), mask=None if e["mask"] is None else base64.b64decode(e["mask"]),
                strength=e["strength"])
            return cls(id=d["id"], model=d["model"], prompt=d["prompt"], params=GenerationParams.from_dict(d["params"]),
                       n=d["n"], preview_every=d["preview_every"], deadline=d["deadline"], created=d["created"],
                       edit=edit)
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
            raise ValueError(f"not a job entry: {e!r}") from None

    def request(self, emit) -> Request:
        """The engine's request for this job; its deadline is converted to this process's clock."""
        left = self.deadline - time.time()
        return Request(prompt=self.prompt, params=self.params, n=self.n, preview_every=self.preview_every, emit=emit,
                       timeout_s=max(left, 1e-3), id=self.id, edit=self.edit)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _text(fields: dict, key: str) -> str:
    value = fields.get(key, fields.get(key.encode()))
    if value is None:
        raise KeyError(key)
    return value.decode() if isinstance(value, bytes) else value


def event_fields(event: Event, attempt: int = 1) -> dict[str, str]:
    """An engine event as the fields of one entry of the job's event stream."""
    if isinstance(event, Progress):
        data = {"step": event.step, "total": event.total, "unmasked": event.unmasked,
                "previews": [_b64(p) for p in event.previews], "attempt": attempt}
        return {"kind": "progress", "data": json.dumps(data)}
    if isinstance(event, Result):
        t = event.timings
        data = {"images": [_b64(p) for p in event.images], "seeds": list(event.seeds), "params": event.params.to_dict(),
                "timings": {"queue_ms": t.queue_ms, "denoise_ms": t.denoise_ms, "decode_ms": t.decode_ms,
                            "total_ms": t.total_ms}}
        return {"kind": "result", "data": json.dumps(data)}
    if isinstance(event, Failure):
        return {"kind": "failure", "data": json.dumps({"status": event.status.name, "message": event.message})}
    raise TypeError(f"not an engine event: {event!r}")


def decode_event(fields: dict) -> Event:
    kind, d = _text(fields, "kind"), json.loads(_text(fields, "data"))
    if kind == "progress":
        return Progress(step=d["step"], total=d["total"], unmasked=d["unmasked"],
                        previews=tuple(base64.b64decode(p) for p in d["previews"]))
    if kind == "result":
        return Result(images=tuple(base64.b64decode(p) for p in d["images"]), seeds=tuple(d["seeds"]),
                      params=GenerationParams.from_dict(d["params"]), timings=Timings(**d["timings"]))
    if kind == "failure":
        return Failure(status=Status[d["status"]], message=d["message"])
    raise ValueError(f"unknown event kind {kind!r}")
