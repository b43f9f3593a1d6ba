"""``vqdiff serve``: load the model, start the engine, and serve HTTP (uvicorn) and gRPC from one
asyncio loop in one process.

SIGTERM / SIGINT start a graceful drain: readiness turns 503 (gRPC health NOT_SERVING), new
requests are refused, queued and running requests finish within ``grace_s``. When the grace period
ends, every request still unfinished is answered 503 with the error envelope and Retry-After (a final
``error`` event on a stream, UNAVAILABLE on gRPC); the handlers get ``ANSWER_S`` to send those
answers, then both servers stop and the process exits 0. A second signal ends the grace period at once.

So the process exits within ``grace_s`` + the engine step in progress + ``ANSWER_S`` (+ the decodes
already running): about ``grace_s`` + 3 s for the embedded model on a CPU (tests/e2e/test_drain.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path

import torch
import uvicorn

from vqdiff.server.engine import Engine
from vqdiff.server.settings import Settings

log = logging.getLogger("vqdiff.server")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ANSWER_S = 2.0  # after the grace period: how long handlers have to send the answers they hold


def model_info(model, folder: Path) -> dict:
    c = model.config
    return {
        "id": folder.name, "path": str(folder), "image_size": c.image_size,
        "tokens": [c.transformer.height, c.transformer.width], "codebook_size": c.transformer.num_embed,
        "num_timesteps": c.transformer.num_timesteps, "learnable_null": c.learnable_null,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.transformer.parameters()).dtype).removeprefix("torch."), "device": str(model.device),
    }


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """``auto``: bf16 where the hardware multiplies bf16 fast (CUDA; CPUs with AMX or AVX512-BF16,
    where batched forwards run faster than in fp32: docs/BENCHMARKS.md, "Server"), else fp32."""
    if name != "auto":
        return DTYPES[name]
    if str(device).startswith("cuda"):
        return torch.bfloat16
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return torch.float32
    return torch.bfloat16 if ("amx_bf16" in flags or "avx512_bf16" in flags) else torch.float32


def load(settings: Settings):
    from vqdiff.model.io.default import default_model_dir
    from vqdiff.model.io.folder import load_model

    folder = settings.model or default_model_dir()
    model = load_model(folder, device=settings.device, dtype=resolve_dtype(settings.dtype, settings.device))
    return model, Path(folder).resolve()


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: this process drains first, then stops it."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class Server:
    """The engine and both front ends of one process. ``run`` serves until ``stop`` is set (or a
    signal arrives), then drains."""

    def __init__(self, settings: Settings, model=None, folder: Path | None = None):
        if model is None:
            model, folder = load(settings)
        self.settings = settings
        self.info = model_info(model, Path(folder or "model"))
        self.engine = Engine(model, settings, model_name=self.info["id"], info=self.info)
        if settings.warmup:  # before any port opens: a fault stops the start
            from vqdiff.server.warmup import warm_up

            warm_up(model, self.engine.forward)

    async def run(self, started: asyncio.Event | None = None, stop: asyncio.Event | None = None) -> None:
        from vqdiff.server.http_app import create_app

        settings, engine = self.settings, self.engine.start()
        app = create_app(engine, settings)
        http = _Uvicorn(uvicorn.Config(app, host=settings.host, port=settings.http_port, log_level="info",
                                       timeout_graceful_shutdown=ANSWER_S, lifespan="off"))
        grpc_server = None
        if settings.grpc_port:
            from vqdiff.server.grpc_app import start_grpc

            grpc_server = await start_grpc(engine, settings)

        stop = stop or asyncio.Event()
        hurry = asyncio.Event()  # a second signal: end the grace period now
        loop = asyncio.get_running_loop()
        signals = 0

        def on_signal() -> None:
            nonlocal signals
            signals += 1
            if signals > 1:
                log.warning("second signal: ending the grace period now")
                hurry.set()
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread
                loop.add_signal_handler(sig, on_signal)

        http_task = asyncio.create_task(http.serve())
        while not http.started and not http_task.done():
            await asyncio.sleep(0.02)
        if http_task.done():  # uvicorn could not start (the port is taken, ...)
            if grpc_server is not None:
                await grpc_server.stop(grace=0)
            await asyncio.to_thread(engine.shutdown, 0.0)
            http_task.result()
            raise RuntimeError(f"the HTTP server did not start on {settings.host}:{settings.http_port}")
        log.info("serving %s: HTTP on %s:%d%s", ", ".join(engine.catalog.names()) or "no model yet", settings.host,
                 settings.http_port,
                 f", gRPC on {settings.grpc_port}" if grpc_server else "")
        if started is not None:
            started.set()

        await stop.wait()
        log.info("draining: up to %.0f s for %d running and %d queued requests", settings.grace_s,
                 len(engine.scheduler.running), len(engine.scheduler.waiting))
        engine.drain()
        if grpc_server is not None:
            grpc_server.set_not_serving()
        idle = asyncio.ensure_future(asyncio.to_thread(engine.wait_idle, settings.grace_s))
        hurried = asyncio.ensure_future(hurry.wait())
        await asyncio.wait([idle, hurried], return_when=asyncio.FIRST_COMPLETED)
        hurried.cancel()
        left = len(engine.scheduler.running) + len(engine.scheduler.waiting)
        if left:
            log.warning("grace period over: answering %d unfinished requests 503", left)
        # fails what is left as unavailable (its handlers answer 503 / UNAVAILABLE), waits for the
        # step in progress and the decodes in flight; the wait_idle thread returns with it
        await asyncio.to_thread(engine.shutdown, 0.0)
        await idle
        if grpc_server is not None:
            await grpc_server.stop(grace=ANSWER_S)
        http.should_exit = True
        await http_task
        log.info("stopped")


async def serve_async(settings: Settings, model=None, folder: Path | None = None,
                      started: asyncio.Event | None = None, stop: asyncio.Event | None = None) -> None:
    await Server(settings, model, folder).run(started, stop)


def serve(settings: Settings) -> None:
    """``vqdiff serve``: the role's process (``single``: this module's ``Server``; ``worker``:
    server/worker.py; ``api``: server/remote.py)."""
    from vqdiff.server import threads

    settings.check_role()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.role == "api":
        import importlib.util

        if importlib.util.find_spec("vqdiff.server.remote") is None:
            raise ValueError("--role api: this installation has no API role (vqdiff.server.remote is missing)")
        from vqdiff.server.remote import serve_api

        serve_api(settings)
        return
    threads.apply(settings)  # before the engine's threads run a torch op: each keeps the count it first saw
    if settings.role == "worker":
        from vqdiff.server.worker import serve_worker

        serve_worker(settings)
        return
    asyncio.run(Server(settings).run())
