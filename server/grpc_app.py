"""The gRPC API (``grpc.aio``): ``vqdiff.v1.ImageGeneration`` (proto/vqdiff/v1/generate.proto), the
standard health service and server reflection, on one port.

Handlers are thin, like the HTTP ones: check the API key, translate the proto message to a
``Request`` (the same defaults and validation as ``POST /v1/generate``), run it through
``EventStream``, translate the events back. Every ``ApiError`` leaves as ``context.abort`` with its
gRPC code; bytes that are not a ``GenerateRequest`` are INVALID_ARGUMENT too (``decode_request``). A
client that cancels (or whose deadline passes) gets its handler task cancelled; leaving the ``async
with EventStream`` block then cancels the request, which frees its batch slot at the next step and
counts as ``outcome="cancelled"``.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from vqdiff.model.sampling.params import SAMPLERS, UNCONDS, UNMASK_SCHEDULES, GenerationParams
from vqdiff.model.sampling.sampler import request_params
from vqdiff.server.aio import ApiEventStream
from vqdiff.model.sampling.params import image_seed
from vqdiff.server.api import PARAM_NAMES, preview_interval, require_key, resolve_model, timings_dict
from vqdiff.server.engine import Engine
from vqdiff.server.errors import ApiError, from_failure, invalid
from vqdiff.server.proto_gen.vqdiff.v1 import generate_pb2 as pb
from vqdiff.server.proto_gen.vqdiff.v1 import generate_pb2_grpc
from vqdiff.model.io.edit_input import EditInput
from vqdiff.server.request import Failure, Progress, Request, Result
from vqdiff.server.served import Served
from vqdiff.server.settings import Settings

log = logging.getLogger("vqdiff.grpc")

SERVICE = pb.DESCRIPTOR.services_by_name["ImageGeneration"].full_name  # "vqdiff.v1.ImageGeneration"
ENUM_PARAMS = ("sampler", "uncond", "unmask_schedule")  # proto enums, translated by name; UNSPECIFIED keeps the default
# optional proto fields that map 1:1 onto GenerationParams fields of the same name
SCALAR_PARAMS = tuple(name for name in PARAM_NAMES if name not in ENUM_PARAMS)


def _enum_names(enum, prefix: str, allowed: tuple[str, ...]) -> dict[int, str]:
    """{SAMPLER_PURITY: "purity", ...}; fails at import if the proto and model/sampling/params.py disagree."""
    names = {v: k.removeprefix(prefix).lower() for k, v in enum.items() if v != 0}
    if sorted(names.values()) != sorted(allowed):
        raise RuntimeError(f"{enum.DESCRIPTOR.full_name} has {sorted(names.values())} but the engine knows "
                           f"{sorted(allowed)}: update proto/vqdiff/v1/generate.proto and run proto/generate.sh")
    return names


SAMPLER_NAMES = _enum_names(pb.Sampler, "SAMPLER_", SAMPLERS)
UNCOND_NAMES = _enum_names(pb.Uncond, "UNCOND_", UNCONDS)
SCHEDULE_NAMES = _enum_names(pb.UnmaskSchedule, "UNMASK_SCHEDULE_", UNMASK_SCHEDULES)
SCHEDULE_VALUES = {s: v for v, s in SCHEDULE_NAMES.items()}
SAMPLER_VALUES = {s: v for v, s in SAMPLER_NAMES.items()}
UNCOND_VALUES = {s: v for v, s in UNCOND_NAMES.items()}


# -- proto <-> engine types ----------------------------------------------------------------------------


def to_params(msg: pb.GenerateRequest, model) -> GenerationParams:
    """The request's parameters over the model's defaults for the sampler it names; unset fields (and
    UNSPECIFIED enums) keep the default. Raises ``ApiError`` (INVALID_ARGUMENT) naming the field."""
    given = {name: getattr(msg, name) for name in SCALAR_PARAMS if msg.HasField(name)}
    for name, enum, names in (("sampler", pb.Sampler, SAMPLER_NAMES), ("uncond", pb.Uncond, UNCOND_NAMES),
                              ("unmask_schedule", pb.UnmaskSchedule, SCHEDULE_NAMES)):
        value = getattr(msg, name)  # an int; proto3 enums are open, so unknown numbers arrive too
        if value == 0:
            continue
        if value not in names:
            raise invalid(f"{name}: {value} is not a known value; expected one of "
                          f"{[k for k, v in enum.items() if v != 0]}", name)
        given[name] = names[value]
    try:
        return request_params(model, given)
    except ValueError as e:
        raise invalid(str(e)) from None


def to_request(msg: pb.GenerateRequest, served: Served, settings: Settings, stream: bool,
               timeout_s: float | None) -> Request:
    params = to_params(msg, served.model)
    requested = msg.preview_every if msg.HasField("preview_every") else None
    preview = preview_interval(requested, settings, params.steps) if stream else 0  # previews only travel on streams
    return Request(prompt=msg.prompt, params=params, n=msg.n if msg.HasField("n") else 1, preview_every=preview,
                   timeout_s=timeout_s, model=served.name, edit=to_edit(msg))


def to_edit(msg: pb.GenerateRequest) -> EditInput | None:
    """``image`` / ``mask`` / ``strength`` as an edit (the engine checks them, as over HTTP)."""
    if not msg.HasField("image"):
        for name in ("mask", "strength"):
            if msg.HasField(name):
                raise invalid(f"{name}: given without an image to edit", name)
        return None
    return EditInput(image=msg.image, mask=msg.mask if msg.HasField("mask") else None,
                     strength=msg.strength if msg.HasField("strength") else None)


def params_pb(p: GenerationParams) -> pb.GenerationParams:
    return pb.GenerationParams(
        guidance_scale=p.guidance_scale, uncond=UNCOND_VALUES[p.uncond], negative_prompt=p.negative_prompt,
        truncation_rate=p.truncation_rate, sampler=SAMPLER_VALUES[p.sampler], steps=p.steps,
        purity_weight=p.purity_weight, seed=p.seed, unmask_schedule=SCHEDULE_VALUES[p.unmask_schedule])


def response_pb(req_id: str, r: Result) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        id=req_id, seed=r.seeds[0], images=[pb.Image(png=png, seed=s) for png, s in zip(r.images, r.seeds)],
        timings=pb.Timings(**timings_dict(r.timings)),
        params=params_pb(r.params))


def progress_pb(p: Progress, seeds: list[int]) -> pb.Progress:
    return pb.Progress(step=p.step, total=p.total, unmasked=p.unmasked,
                       previews=[pb.Image(png=png, seed=s) for png, s in zip(p.previews, seeds)])


class Malformed:
    """What ``decode_request`` gives for bytes that are not a ``GenerateRequest``: the handler turns
    it into INVALID_ARGUMENT (a raising deserializer would make grpc answer UNKNOWN, naming the
    exception class)."""

    def __init__(self, reason: str):
        self.message = f"the request is not a valid {pb.GenerateRequest.DESCRIPTOR.full_name}: {reason}"


def decode_request(data: bytes) -> pb.GenerateRequest | Malformed:
    """The request deserializer; never raises. Garbage, a truncated field and a string field that is
    not UTF-8 (also where a client encoded a lone surrogate) all give ``Malformed``."""
    try:
        return pb.GenerateRequest.FromString(data)
    except DecodeError as e:
        # upb: "Error parsing message with type 'vqdiff.v1.GenerateRequest': String field had bad UTF-8"
        return Malformed(str(e).split("': ", 1)[-1] or "malformed protobuf")


# -- the service -----------------------------------------------------------------------------------------


class ImageGeneration(generate_pb2_grpc.ImageGenerationServicer):
    def __init__(self, engine: Engine, settings: Settings):
        self.engine, self.settings = engine, settings

    async def Generate(self, msg: pb.GenerateRequest | Malformed,
                       context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        try:
            req = self._request(msg, context, stream=False)
            async with ApiEventStream(self.engine, req) as events:
                while True:
                    event = await events.next()
                    if isinstance(event, Result):
                        return response_pb(req.id, event)
                    if isinstance(event, Failure):
                        raise from_failure(event.status, event.message)
        except ApiError as e:
            await self._abort(context, e)

    async def GenerateStream(self, msg: pb.GenerateRequest | Malformed, context: grpc.aio.ServicerContext) -> None:
        # context.write rather than an async generator: a cancelled call then cancels this coroutine
        # at once (an abandoned generator would only be closed when garbage-collected)
        try:
            req = self._request(msg, context, stream=True)
            async with ApiEventStream(self.engine, req) as events:
                seeds = [image_seed(req.params.seed, i) for i in range(req.n)]  # resolved by submit
                while True:
                    event = await events.next()
                    if isinstance(event, Progress):
                        await context.write(pb.GenerateStreamResponse(progress=progress_pb(event, seeds)))
                    elif isinstance(event, Result):
                        await context.write(pb.GenerateStreamResponse(result=response_pb(req.id, event)))
                        return
                    elif isinstance(event, Failure):
                        raise from_failure(event.status, event.message)
        except ApiError as e:
            await self._abort(context, e)

    def _request(self, msg: pb.GenerateRequest | Malformed, context: grpc.aio.ServicerContext,
                 stream: bool) -> Request:
        self._authorize(context)
        if isinstance(msg, Malformed):
            raise invalid(msg.message)
        # the client's deadline bounds the engine's (which is also capped by request_timeout_s)
        served = resolve_model(self.engine, msg.model if msg.HasField("model") else None)
        return to_request(msg, served, self.settings, stream, timeout_s=context.time_remaining())

    def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        header = next((v for k, v in context.invocation_metadata() or () if k == "authorization"), None)
        require_key(header, self.settings.api_keys)

    async def _abort(self, context: grpc.aio.ServicerContext, e: ApiError) -> None:
        if not e.counted and e.grpc_code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED):
            self.engine.metrics.count("invalid" if e.grpc_code == grpc.StatusCode.INVALID_ARGUMENT else "unauthenticated")
        # the HTTP headers (Retry-After, WWW-Authenticate) travel as trailing metadata
        await context.abort(e.grpc_code, e.message, tuple((k.lower(), v) for k, v in e.headers.items()))


def add_service(servicer: ImageGeneration, server: grpc.aio.Server) -> None:
    """``generate_pb2_grpc.add_ImageGenerationServicer_to_server`` with ``decode_request`` as the
    request deserializer."""
    handlers = {
        "Generate": grpc.unary_unary_rpc_method_handler(
            servicer.Generate, request_deserializer=decode_request,
            response_serializer=pb.GenerateResponse.SerializeToString),
        "GenerateStream": grpc.unary_stream_rpc_method_handler(
            servicer.GenerateStream, request_deserializer=decode_request,
            response_serializer=pb.GenerateStreamResponse.SerializeToString),
    }
    methods = pb.DESCRIPTOR.services_by_name["ImageGeneration"].methods_by_name
    if sorted(handlers) != sorted(methods):
        raise RuntimeError(f"{SERVICE} has methods {sorted(methods)} but grpc_app.add_service registers "
                           f"{sorted(handlers)}: update add_service")
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


class _Health(health.aio.HealthServicer):
    """grpc.health.v1 where "" and the service answer NOT_SERVING whenever the engine is not ready
    (starting, draining, stopped), not only after ``set_not_serving``."""

    def __init__(self, engine: Engine):
        super().__init__()
        self.engine = engine
        self.stopping = False

    async def Check(self, request: health_pb2.HealthCheckRequest, context) -> health_pb2.HealthCheckResponse:
        if request.service in ("", SERVICE) and (self.stopping or not self.engine.ready):
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING)
        return await super().Check(request, context)


class GrpcServer:
    """What ``start_grpc`` returns: the running server, its bound port, and the shutdown steps."""

    def __init__(self, server: grpc.aio.Server, health_servicer: _Health, port: int):
        self.server, self.health, self.port = server, health_servicer, port
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task] = set()

    def set_not_serving(self) -> None:
        """Health turns NOT_SERVING for every service from now on (Check at once, Watch streams as soon
        as the loop runs). Callable from any thread."""
        self.health.stopping = True

        def notify() -> None:
            task = self._loop.create_task(self.health.enter_graceful_shutdown())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        self._loop.call_soon_threadsafe(notify)

    async def stop(self, grace: float | None) -> None:
        """Refuse new RPCs, give those in flight ``grace`` seconds, then cancel them."""
        self.health.stopping = True
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def start_grpc(engine: Engine, settings: Settings) -> GrpcServer:
    """Serve gRPC on ``settings.host:settings.grpc_port`` (port 0 picks a free one: see ``.port``)."""
    server = grpc.aio.server()
    add_service(ImageGeneration(engine, settings), server)
    health_servicer = _Health(engine)
    await health_servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{settings.host}:{settings.grpc_port}"
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as e:  # grpcio raises on a taken port; older versions returned 0
        raise RuntimeError(f"gRPC: cannot listen on {address}: {e}") from None
    if port == 0:
        raise RuntimeError(f"gRPC: cannot listen on {address}")
    await server.start()
    log.info("gRPC: %s on %s:%d", SERVICE, settings.host, port)
    return GrpcServer(server, health_servicer, port)
