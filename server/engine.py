"""The engine: one thread owns the model and the device and runs the step loop.

Every step: ask the scheduler what runs; encode the text of new arrivals (one batched call) and
cache their cross-attention keys/values; run ONE transformer forward over the cond and uncond rows
of every running image (``vqdiff.model.sampling.sampler.advance``); read one small per-row summary back to the host
(finite?, unmasked fraction); hand finished grids and due previews to the decode pool, so VQVAE
decoding and PNG encoding never stall the loop.

A step that raises is re-run as two halves (results do not depend on batch membership, so this
changes nothing for the requests that succeed); a request that fails alone, or produces
non-finite values, is failed and the engine keeps serving.

API side (any thread): ``submit`` / ``cancel`` / ``drain`` / ``shutdown``. Events reach each
request's ``emit`` in order: progress (with previews), then one ``Result`` or ``Failure``.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import torch

from vqdiff.model.sampling.buckets import BucketedForward
from vqdiff.model.io import edit_input as edits
from vqdiff.model.sampling.edit import edit_params
from vqdiff.model.sampling.rng import random_seed
from vqdiff.model.sampling.sampler import RequestState, advance, batch_text_kv, forward_rows, start
from vqdiff.model.sampling.params import image_seed
from vqdiff.model.io.images import decode_pngs, preview_tokens
from vqdiff.server.metrics import Metrics
from vqdiff.server.request import Event, Failure, Progress, Request, Result, Status, Timings
from vqdiff.server.scheduler import Draining, QueueFull, Scheduler
from vqdiff.server.served import Catalog, Served
from vqdiff.server.settings import Settings

log = logging.getLogger("vqdiff.engine")

__all__ = ["Engine", "QueueFull", "Draining", "validate", "timeout_s"]


class _Ordered:
    """Delivers a request's events in the order the engine produced them, although the decode
    pool may finish them out of order."""

    def __init__(self, req: Request):
        self.req, self.lock, self.next, self.issued, self.pending = req, threading.Lock(), 0, 0, {}

    def ticket(self) -> int:  # engine thread only
        self.issued += 1
        return self.issued - 1

    def put(self, ticket: int, event: Event | None) -> None:
        with self.lock:
            self.pending[ticket] = event
            while self.next in self.pending:
                ev = self.pending.pop(self.next)
                self.next += 1
                if ev is not None:
                    try:
                        self.req.emit(ev)
                    except Exception:  # a client's sink must never take the engine down
                        log.exception("%s: emit failed", self.req.id)


@dataclass
class _Due:
    """Grids of one request to decode: its final images, or a preview with its progress."""

    req: Request
    out: _Ordered
    ticket: int
    tokens: torch.Tensor  # (n, N) in [0, K)
    progress: Progress | None = None  # None: the final images


class Engine:
    blocking_submit = False  # ``submit`` and ``follow`` never wait on I/O: the event loop may call them

    def __init__(self, model, settings: Settings | None = None, model_name: str = "default",
                 metrics: Metrics | None = None, info: dict | None = None):
        self.model = model
        self.settings = settings or Settings()
        self.model_name = model_name
        self.metrics = metrics or Metrics(model_name, model.device)
        info = info or {"id": model_name, "image_size": model.config.image_size}
        self.catalog = Catalog.of(Served(model_name, model, info))  # what the front ends route to
        # the transformer forward: eager, or compiled over padded row buckets (model/sampling/buckets.py)
        self.forward = BucketedForward(model.transformer, self.settings.max_rows, self.settings.compile)
        self.scheduler = Scheduler(self.settings.max_rows, self.settings.max_waiting)
        self._cond = threading.Condition()
        self._states: dict[Request, list[RequestState]] = {}
        self._out: dict[Request, _Ordered] = {}
        self._decoder = ThreadPoolExecutor(self.settings.decode_workers, thread_name_prefix="vqdiff-decode")
        self._decoding = 0  # decode jobs in flight
        self._kv_key: tuple[int, ...] = ()  # Request.seq of the batch whose text k/v is cached
        self._kv = None
        self._stop = False
        self._thread: threading.Thread | None = None
        c = model.config.transformer
        self.mask_id, self.num_tokens, self.num_timesteps = c.mask_id, c.num_tokens, c.num_timesteps

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="vqdiff-engine", daemon=True)
        self._thread.start()
        return self

    @property
    def ready(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self.scheduler.draining

    def drain(self) -> None:
        with self._cond:
            self.scheduler.drain()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is queued, running or decoding; False on timeout."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not (self.scheduler.idle and self._decoding == 0):
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def shutdown(self, grace_s: float = 0.0) -> None:
        """Refuse new requests, let queued and running ones finish for up to ``grace_s``, fail the
        rest as unavailable, and stop the thread."""
        self.drain()
        self.wait_idle(grace_s)
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()  # it finishes the step in progress, then returns
        with self._cond:
            gone = self.scheduler.abort_all()
            self._publish_queue()
            self._cond.notify_all()  # wait_idle callers: nothing is queued or running any more
        for r in gone:
            self._states.pop(r, None)
            self._fail(r, r.status, "the server shut down before this request finished; retry it")
        self._decoder.shutdown(wait=True)

    # -- API side ----------------------------------------------------------------------------------

    def submit(self, req: Request) -> Request:
        """Validate and queue. Raises ValueError (bad input), QueueFull or Draining; in every case
        nothing is queued. ``req.params`` comes back resolved (seed and uncond filled in)."""
        s = self.settings
        try:
            if req.model not in (None, self.model_name):
                raise ValueError(f"model: {req.model!r} is not served here; this server runs {self.model_name!r}")
            validate(req, s, self.model)
        except ValueError:
            self.metrics.count("invalid")
            raise
        req.deadline = req.arrival + timeout_s(req, s)
        with self._cond:
            try:
                self.scheduler.add(req)
            except (QueueFull, Draining):
                self.metrics.count("rejected")
                raise
            self._out[req] = _Ordered(req)
            self._publish_queue()
            self._cond.notify_all()
        return req

    def cancel(self, req: Request) -> None:
        """The client went away: the request leaves the batch at the next step boundary."""
        with self._cond:
            self.scheduler.cancel(req)
            self._cond.notify_all()

    # -- the step loop (engine thread) -------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self.scheduler.idle and not self._stop:
                    self._cond.wait()
                if self._stop:  # checked every step: shutdown past the grace period
                    return
                out = self.scheduler.schedule(time.monotonic())
                self._publish_queue()
            for r in out.finished:
                self._states.pop(r, None)
                self._fail(r, r.status, "cancelled" if r.status == Status.FINISHED_CANCELLED
                           else "the request's deadline passed before it finished")
            if out.admitted:
                self._admit(out.admitted)
            running = [r for r in out.running if r in self._states]
            if running:
                try:
                    self._step(running)
                except Exception as e:  # a bug in the loop itself: fail this batch, keep serving
                    log.exception("engine step failed")
                    self._finish_all({r: (Status.FINISHED_FAILED, f"internal error: {e}") for r in running})

    def _admit(self, reqs: list[Request]) -> None:
        """Encode the text of all new arrivals in one call; a request whose encoding fails alone fails."""
        now = time.monotonic()
        for r in reqs:
            self.metrics.label(self.metrics.queue_wait).observe(now - r.arrival)
        groups, failed = [reqs], {}
        while groups:
            group = groups.pop()
            prompts = [r.prompt for r in group for _ in range(r.n)]
            params = [replace(r.params, seed=image_seed(r.params.seed, i)) for r in group for i in range(r.n)]
            try:
                inits = [g for r in group for g in self._start_grids(r)]  # an edit's image, VQVAE-encoded
                states = start(self.model, prompts, params, inits)
            except Exception as e:
                if len(group) == 1:
                    failed[group[0]] = (Status.FINISHED_FAILED, f"could not start: {e}")
                else:
                    groups += [group[: len(group) // 2], group[len(group) // 2 :]]
                continue
            i = 0
            for r in group:
                self._states[r], i = states[i : i + r.n], i + r.n
        if failed:
            self._finish_all(failed)

    def _start_grids(self, r: Request) -> list:
        """Each image's starting grid: None (all masked) for a generation, the image's tokens with the
        repainted ones masked for an edit (model/io/edit_input.py)."""
        if r.edit is None:
            return [None] * r.n
        return edits.start_grids(self.model, r.edit, r.params.seed, r.n, self.settings.max_upload_bytes)

    def _step(self, running: list[Request]) -> None:
        t0 = time.perf_counter()
        done: dict[Request, tuple[Status, str]] = {}
        due: list[_Due] = []  # grids to decode this step: finished images and previews
        for group, out in self._advance(running, done):
            # one host read per step: is every row finite, and how much of it is unmasked
            finite = torch.isfinite(out.purity).all(dim=-1).tolist()  # (B,)
            unmasked = (out.tokens != self.mask_id).float().mean(dim=-1).tolist()  # (B,)
            row = 0
            for r in group:
                rows = slice(row, row + r.n)
                row += r.n
                first = self._states[r][0]
                if not all(finite[rows]):
                    done[r] = (Status.FINISHED_FAILED, "the model produced non-finite probabilities for this request")
                elif first.done:
                    done[r] = (Status.FINISHED_OK, "")
                    due.append(_Due(r, self._out[r], self._out[r].ticket(), out.tokens[rows]))
                elif r.preview_every and first.step % r.preview_every == 0:
                    grids = preview_tokens(out.tokens[rows], out.log_p[rows], self.mask_id)  # (n, N)
                    progress = Progress(first.step, first.plan.steps, sum(unmasked[rows]) / r.n)
                    due.append(_Due(r, self._out[r], self._out[r].ticket(), grids, progress))
        self.metrics.label(self.metrics.step_duration).observe(time.perf_counter() - t0)

        now = time.monotonic()
        ok = [r for r, (status, _) in done.items() if status == Status.FINISHED_OK]
        for r in ok:
            r.denoised_at = now
        if due:
            with self._cond:
                self._decoding += 1
            self._decoder.submit(self._decode_job, due)
        self._finish_all({r: v for r, v in done.items() if v[0] != Status.FINISHED_OK}, ok=ok)

    def _advance(self, reqs: list[Request], done: dict):
        """Yield (requests, StepOutput) for every group that stepped; a group that raises is split in
        two and retried; a single request that raises is failed."""
        groups = [reqs]
        while groups:
            group = groups.pop(0)
            states = [s for r in group for s in self._states[r]]
            # Request.seq is never reused (an id() is, once its object is freed: a new batch could
            # then match the last one's key and run on the previous requests' text)
            key = tuple(r.seq for r in group)
            try:
                if key != self._kv_key:  # the batch changed: rebuild its text k/v once (padded to its bucket)
                    self._kv, self._kv_key = self.forward.pad_kv(batch_text_kv(states)), key
                out = advance(self.model.transformer, self.model.schedule, states, text_kv=self._kv,
                              forward=self.forward)
            except Exception as e:
                self._kv_key, self._kv = (), None
                if _is_oom(e) and torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if len(group) == 1:
                    log.warning("%s failed alone: %s", group[0].id, e)
                    done[group[0]] = (Status.FINISHED_FAILED, f"{'out of memory' if _is_oom(e) else 'step failed'}: {e}")
                else:
                    self.metrics.label(self.metrics.retries).inc()
                    groups += [group[: len(group) // 2], group[len(group) // 2 :]]
                continue
            self.metrics.label(self.metrics.forwards).inc()
            self.metrics.label(self.metrics.rows).observe(forward_rows(states))
            yield group, out

    # -- results -----------------------------------------------------------------------------------

    def _decode_job(self, due: list[_Due]) -> None:
        """Decode pool: the grids due this step in fixed-size VQVAE calls, then PNGs, then events."""
        t0 = time.monotonic()
        try:
            try:
                grids = torch.cat([d.tokens for d in due])  # (M, N)
                pngs, error = decode_pngs(self.model, grids, self.settings.decode_batch), None
            except Exception as e:
                log.exception("decode failed")
                pngs, error = [], e
            decode_s = time.monotonic() - t0
            i = 0
            for d in due:
                mine, i = tuple(pngs[i : i + len(d.tokens)]), i + len(d.tokens)
                r = d.req
                if d.progress is not None:  # a preview; a failed one is skipped, not fatal
                    if error is None and r.first_preview_at is None:
                        r.first_preview_at = time.monotonic()
                        self.metrics.label(self.metrics.first_preview).observe(r.first_preview_at - r.arrival)
                    d.out.put(d.ticket, None if error else replace(d.progress, previews=mine))
                elif error is not None:
                    self._emit_failure(r, d.out, d.ticket, Status.FINISHED_FAILED, f"decoding failed: {error}")
                else:
                    self._emit_result(r, d.out, d.ticket, mine, decode_s)
        finally:
            with self._cond:
                self._decoding -= 1
                self._cond.notify_all()

    def _emit_result(self, r: Request, out: _Ordered, ticket: int, pngs: tuple[bytes, ...], decode_s: float) -> None:
        now = time.monotonic()
        timings = Timings(
            queue_ms=1000 * (r.admitted_at - r.arrival), denoise_ms=1000 * (r.denoised_at - r.admitted_at),
            decode_ms=1000 * decode_s, total_ms=1000 * (now - r.arrival))
        seeds = tuple(image_seed(r.params.seed, i) for i in range(r.n))
        self.metrics.count("success")
        self.metrics.label(self.metrics.images).inc(r.n)
        self.metrics.label(self.metrics.latency).observe(now - r.arrival)
        self._out.pop(r, None)
        out.put(ticket, Result(images=pngs, seeds=seeds, params=r.params, timings=timings))

    def _emit_failure(self, r: Request, out: _Ordered, ticket: int, status: Status, message: str) -> None:
        r.status = status
        self.metrics.count(status.outcome)
        self._out.pop(r, None)
        out.put(ticket, Failure(status=status, message=message))

    def _fail(self, r: Request, status: Status, message: str) -> None:
        out = self._out.get(r)
        if out is not None:
            self._emit_failure(r, out, out.ticket(), status, message)

    def _finish_all(self, failed: dict[Request, tuple[Status, str]], ok: list[Request] = ()) -> None:
        """Retire requests from the scheduler: ``ok`` ones await their decode; ``failed`` ones get
        their Failure event now."""
        with self._cond:
            self.scheduler.update({**{r: Status.FINISHED_OK for r in ok}, **{r: s for r, (s, _) in failed.items()}})
            self._publish_queue()
            self._cond.notify_all()
        for r in list(ok) + list(failed):
            self._states.pop(r, None)
        for r, (status, message) in failed.items():
            self._fail(r, status, message)


    def _publish_queue(self) -> None:
        """The running / waiting gauges, set (under the lock) wherever the scheduler's lists change,
        so that every scrape reads the truth, an idle server included."""
        self.metrics.label(self.metrics.running).set(len(self.scheduler.running))
        self.metrics.label(self.metrics.waiting).set(len(self.scheduler.waiting))


def validate(req: Request, limits, model) -> None:
    """Check a request against the server's limits (``max_images``, ``max_prompt_chars``,
    ``max_upload_bytes``) and the model (``config.transformer.num_tokens`` / ``num_timesteps``,
    ``null_cond``; an edit's image: ``config.image_size`` and the token grid), and resolve its
    parameters with a fresh seed when it gave none. Raises ValueError naming the field. The engine
    and the API role's ``RemoteEngine`` (server/remote.py) both call it."""
    if not isinstance(req.n, int) or not 1 <= req.n <= limits.max_images:
        raise ValueError(f"n: {req.n!r} is not allowed; expected an integer in [1, {limits.max_images}]")
    if len(req.prompt) > limits.max_prompt_chars:
        raise ValueError(f"prompt: {len(req.prompt)} characters is too long; at most {limits.max_prompt_chars}")
    _check_text("prompt", req.prompt)
    _check_text("negative_prompt", req.params.negative_prompt)
    if req.preview_every < 0:
        raise ValueError(f"preview_every: {req.preview_every} is not allowed; expected an integer >= 0")
    c = model.config.transformer
    req.params = req.params.resolve(num_tokens=c.num_tokens, num_timesteps=c.num_timesteps,
                                    has_null=model.null_cond is not None, seed=random_seed())
    if req.edit is not None:  # an inpainting or a variation: its checks, and at most M steps
        req.params = edit_params(req.params, edits.check(req.edit, model.config, limits.max_upload_bytes))


def timeout_s(req: Request, limits) -> float:
    """Seconds the request may take, queueing included: its own timeout capped by ``request_timeout_s``."""
    return limits.request_timeout_s if req.timeout_s is None else min(req.timeout_s, limits.request_timeout_s)


def _check_text(name: str, text: str | None) -> None:
    """Text the tokenizer can take: valid Unicode (a JSON string may carry a lone surrogate)."""
    if text is None:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name}: character {e.start} ({text[e.start]!r}) is not valid Unicode text "
                         f"(a lone surrogate); send UTF-8 text") from None


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
