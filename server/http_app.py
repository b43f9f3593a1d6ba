"""The HTTP API (FastAPI). Handlers validate, translate, call the engine through ``ApiEventStream``,
and serialise; every error leaves as ``{"error": {message, type, param, code}}``."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from fastapi import Depends, FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from vqdiff.model.sampling.params import GenerationParams
from vqdiff.model.sampling.sampler import request_params
from vqdiff.server.aio import ApiEventStream, ResumeStream
from vqdiff.server.api import preview_interval, require_key, resolve_model
from vqdiff.server.docs import add_docs
from vqdiff.server.engine import Engine
from vqdiff.server.errors import ApiError, bad_body, from_failure, invalid, unavailable
from vqdiff.server.request import Failure, Progress, Request, Result
from vqdiff.server.schemas import (
    ErrorResponse, GenerateRequest, GenerateResponse, OpenAIImage, OpenAIImageRequest, OpenAIImagesResponse, b64,
)
from vqdiff.server.settings import Settings
from vqdiff.server.uploads import EDIT_FORM, VARIATION_FORM, edit_request, read_form

WEB_PAGE = Path(__file__).parent / "web" / "index.html"
POLL_S = 0.1  # how often a waiting plain request checks whether its client is still there
ERRORS = {code: {"model": ErrorResponse} for code in (401, 422, 429, 500, 503, 504)}
ROUTING = {404: ("not_found", "not_found"), 405: ("method_not_allowed", "method_not_allowed")}  # (type, code)


def create_app(engine: Engine, settings: Settings) -> FastAPI:
    """The app over ``engine`` (a single process's ``Engine`` or the API role's ``RemoteEngine``),
    routing each request to a model of ``engine.catalog``."""
    app = FastAPI(title="vqdiff", version="0.1.0",
                  description="Improved VQ-Diffusion text-to-image server (HTTP API; gRPC on its own port)",
                  docs_url=None, redoc_url=None)  # /docs from local assets (server/docs.py); no /redoc
    add_docs(app)
    catalog = engine.catalog

    # -- errors --------------------------------------------------------------------------------------

    @app.exception_handler(ApiError)
    async def _api_error(_, e: ApiError):
        if not e.counted and e.status in (401, 422):
            engine.metrics.count("invalid" if e.status == 422 else "unauthenticated")
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":  # loc is ("body", character offset): not a field
            engine.metrics.count("invalid")
            return JSONResponse(bad_body(f"not valid JSON: {first.get('ctx', {}).get('error', 'malformed')} "
                                         f"at character {first['loc'][-1]}").body(), status_code=422)
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        engine.metrics.count("invalid")
        if param is None:  # the body itself: missing, not JSON, or JSON that is not an object
            return JSONResponse(bad_body(first.get("msg", "invalid body")).body(), status_code=422)
        return JSONResponse(invalid(f"{param}: {first.get('msg', 'invalid')}", param).body(), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, e: StarletteHTTPException):
        if e.status_code == 400:  # the framework could not parse the body (bad UTF-8, nesting, huge numbers)
            engine.metrics.count("invalid")
            return JSONResponse(bad_body("it could not be parsed (invalid UTF-8, nesting too deep, or a number "
                                         "too long)").body(), status_code=422)
        kind, code = ROUTING.get(e.status_code, ("invalid_request_error", "http_error"))
        error = ApiError(e.status_code, str(e.detail), kind, code=code)
        return JSONResponse(error.body(), status_code=e.status_code, headers=getattr(e, "headers", None))

    async def authorize(request: HttpRequest) -> None:
        require_key(request.headers.get("authorization"), settings.api_keys)

    # -- probes, metrics, models, the page -----------------------------------------------------------

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if not engine.ready:
            raise unavailable("not ready: the server is starting or draining")
        return {"status": "ready"}

    @app.get("/metrics")
    async def metrics():
        # the API role's exposition reads the queue in Redis: off the event loop
        body = await asyncio.to_thread(engine.metrics.exposition) if engine.blocking_submit else \
            engine.metrics.exposition()
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return {"object": "list", "data": [{**s.info, "object": "model", "owned_by": "vqdiff",
                                            "default_params": s.defaults.to_dict(), "few_steps": s.few_steps}
                                           for s in catalog.all()]}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(WEB_PAGE.read_text() if WEB_PAGE.is_file() else "<p>vqdiff: no web page built</p>")

    # -- generation ----------------------------------------------------------------------------------

    def build(body: GenerateRequest) -> Request:
        served = resolve_model(engine, body.model)
        try:
            params = request_params(served.model, body.given())
        except ValueError as e:
            raise invalid(str(e)) from None
        if body.preview_every is not None and body.preview_every < 0:
            raise invalid(f"preview_every: {body.preview_every} is not allowed; expected an integer >= 0")
        preview = preview_interval(body.preview_every, settings, params.steps) if body.stream else 0
        return Request(prompt=body.prompt, params=params, n=body.n, preview_every=preview, resumable=body.stream,
                       model=served.name, edit=body.edit_input(settings.max_upload_bytes))

    async def run(http: HttpRequest, req: Request) -> Result:
        """Submit and wait for the result; a client that disconnects cancels the request."""
        async with ApiEventStream(engine, req) as events:
            while True:
                event = await events.next(POLL_S)
                if event is None:
                    if await http.is_disconnected():
                        return None  # __aexit__ cancels the request
                    continue
                if isinstance(event, Failure):
                    raise from_failure(event.status, event.message)
                if isinstance(event, Result):
                    return event

    @app.post("/v1/generate", response_model=GenerateResponse, responses=ERRORS, dependencies=[Depends(authorize)])
    async def generate(body: GenerateRequest, http: HttpRequest):
        req = build(body)
        if body.stream:
            # submit before the first byte: a refusal (422 / 429 / 503) is a status, not an event
            events = await ApiEventStream(engine, req).__aenter__()
            return event_stream(sse(req, events), events)
        result = await run(http, req)
        if result is None:
            return Response(status_code=499)
        if "image/png" in http.headers.get("accept", "") and body.n == 1:
            return Response(result.images[0], media_type="image/png",
                            headers={"X-Request-Id": req.id, "X-Seed": str(result.seeds[0])})
        return GenerateResponse.of(req.id, result)

    def event_stream(body, events) -> StreamingResponse:
        return StreamingResponse(body, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                 background=BackgroundTask(events.__aexit__))  # runs after a disconnect too

    async def sse(req: Request, events: ApiEventStream, resumed: bool = False):
        """Progress events with previews, heartbeats while nothing happens, then one final event
        (``result``, or ``error`` for what failed after the stream began). Where the engine gives
        event ids (the API role), each event carries one (``id:``) to resume after."""
        try:
            if not resumed:
                yield f"event: queued\ndata: {json.dumps({'id': req.id, 'seed': req.params.seed})}\n\n"
            while True:
                event = await events.next(settings.heartbeat_s)
                eid = f"id: {events.last_id}\n" if event is not None and events.last_id else ""
                if event is None:
                    yield ": heartbeat\n\n"
                elif isinstance(event, Progress):
                    data = {"id": req.id, "step": event.step, "total": event.total, "unmasked": event.unmasked,
                            "previews": [b64(p) for p in event.previews]}
                    yield f"{eid}event: progress\ndata: {json.dumps(data)}\n\n"
                elif isinstance(event, Result):
                    yield f"{eid}event: result\ndata: {GenerateResponse.of(req.id, event).model_dump_json()}\n\n"
                    return
                else:
                    yield f"{eid}event: error\ndata: {json.dumps(from_failure(event.status, event.message).body())}\n\n"
                    return
        finally:
            await events.__aexit__(None, None, None)  # before the final event: cancels the request

    @app.get("/v1/generate/{req_id}/events", responses={404: {"model": ErrorResponse}, **ERRORS},
             dependencies=[Depends(authorize)])
    async def resume(req_id: str, http: HttpRequest, after: str | None = None):
        """A streamed request's events after the id in ``Last-Event-ID`` (or ``?after=``; none: from the
        start), followed to its final event. Only the API role keeps events to resume (in Redis, so
        any API node answers); a single-process server answers 404."""
        req = Request(prompt="", params=GenerationParams(), id=req_id, resumable=True)  # only the id is read
        events = await ResumeStream(engine, req, http.headers.get("last-event-id") or after or "0").__aenter__()
        return event_stream(sse(req, events, resumed=True), events)

    # -- the OpenAI Images API ------------------------------------------------------------------------

    def openai_checks(served, size: str | None, response_format: str | None) -> None:
        want = f"{served.image_size}x{served.image_size}"
        if size not in (None, "", "auto", want):
            raise invalid(f"size: {size!r} is not allowed; this model draws {want}", "size")
        if response_format not in (None, "", "b64_json"):
            raise invalid(f"response_format: {response_format!r} is not supported; use 'b64_json'", "response_format")

    async def openai_run(http: HttpRequest, req: Request):
        result = await run(http, req)
        if result is None:
            return Response(status_code=499)
        return OpenAIImagesResponse(created=int(time.time()), data=[OpenAIImage(b64_json=b64(p)) for p in result.images])

    @app.post("/v1/images/generations", response_model=OpenAIImagesResponse, responses=ERRORS,
              dependencies=[Depends(authorize)])
    async def openai_images(body: OpenAIImageRequest, http: HttpRequest):
        served = resolve_model(engine, body.model)
        openai_checks(served, body.size, body.response_format)
        req = Request(prompt=body.prompt, params=served.defaults, n=body.n if body.n is not None else 1,
                      model=served.name)
        return await openai_run(http, req)

    async def openai_edit(http: HttpRequest, variation: bool):
        """images.edit / images.create_variation: a multipart form, read and translated by server/uploads.py."""
        texts, files = await read_form(http, settings.max_upload_bytes)
        served = resolve_model(engine, texts.get("model") or None)
        openai_checks(served, texts.get("size"), texts.get("response_format"))
        return await openai_run(http, edit_request(texts, files, served, variation))

    @app.post("/v1/images/edits", response_model=OpenAIImagesResponse, responses=ERRORS,
              dependencies=[Depends(authorize)], openapi_extra=EDIT_FORM)
    async def openai_edits(http: HttpRequest):
        """Repaint the region of ``image`` that ``mask`` (or, without one, the image itself) leaves
        transparent, drawing ``prompt`` there; every other token of the image is kept."""
        return await openai_edit(http, variation=False)

    @app.post("/v1/images/variations", response_model=OpenAIImagesResponse, responses=ERRORS,
              dependencies=[Depends(authorize)], openapi_extra=VARIATION_FORM)
    async def openai_variations(http: HttpRequest):
        """Images like ``image``: a ``strength`` share of its tokens (default 0.5) repainted, chosen by
        each image's seed; ``prompt`` (default empty) conditions the repainted tokens."""
        return await openai_edit(http, variation=True)

    return app
