"""The gRPC API end to end: a real ``grpc.aio`` server on loopback (its loop in a background
thread), the real engine and the tiny random model, and the generated sync client.

Tests that need a request to stay running hold the engine's step loop at a gate (a wrapper around
``vqdiff.server.engine.advance``) instead of relying on timing, so they cannot race on a busy CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from PIL import Image

import vqdiff.server.engine as engine_mod
from vqdiff.model.io.folder import random_model
from vqdiff.model.sampling.sampler import default_params, sample
from vqdiff.server.engine import Engine
from vqdiff.server.grpc_app import SERVICE, start_grpc
from vqdiff.model.io.images import decode_pngs
from vqdiff.server.proto_gen.vqdiff.v1 import generate_pb2 as pb
from vqdiff.server.proto_gen.vqdiff.v1 import generate_pb2_grpc
from vqdiff.server.settings import Settings
from tests.serving import free_port

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "a red circle above a blue square"
WAIT_S = 10.0  # upper bound of every poll; a failing test must not hang


@pytest.fixture(scope="module")
def tiny_model(tokenizer, tiny_config):
    m = random_model(tiny_config, tokenizer, seed=3).eval()
    with torch.no_grad():  # a random model with confident, varied predictions (as in test_sampler.py)
        m.transformer.out.weight.mul_(40.0)
        m.null_cond.embeddings.normal_()
    return m


@contextlib.contextmanager
def serving(model, gated: bool = False, **settings):
    """Engine + gRPC server on a loop thread; yields handles for the test thread. ``gated``: the
    engine waits before every forward while ``h.gate`` is clear."""
    gate = threading.Event()
    gate.set()
    real_advance = engine_mod.advance
    if gated:
        def advance(*args, **kwargs):
            gate.wait(WAIT_S)
            return real_advance(*args, **kwargs)

        engine_mod.advance = advance
    port = free_port()
    s = Settings(host="127.0.0.1", grpc_port=port, **settings)
    engine = Engine(model, s, model_name="tiny").start()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="grpc-test-loop", daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(start_grpc(engine, s), loop).result(WAIT_S)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield SimpleNamespace(engine=engine, server=server, channel=channel, gate=gate,
                              stub=generate_pb2_grpc.ImageGenerationStub(channel))
    finally:
        gate.set()
        engine_mod.advance = real_advance
        channel.close()
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(WAIT_S)
        engine.shutdown(0.0)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(WAIT_S)
        loop.close()


def until(condition, what: str) -> None:
    end = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def outcomes(engine: Engine, outcome: str) -> float:
    return engine.metrics.requests.labels("tiny", outcome)._value.get()


def pixels(png: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"))  # (H, W, 3) uint8


def rpc_error(call, request, **kwargs) -> grpc.RpcError:
    """The error that a unary or streaming call ends with (a stream raises while it is read)."""
    with pytest.raises(grpc.RpcError) as info:
        out = call(request, **kwargs)
        if not isinstance(out, pb.GenerateResponse):
            list(out)
    return info.value


# -- generation ------------------------------------------------------------------------------------


def test_generate_matches_the_sampler(tiny_model):
    with serving(tiny_model) as h:
        resp = h.stub.Generate(pb.GenerateRequest(prompt=PROMPT, n=2, seed=5, steps=4, guidance_scale=3.0))
    base = replace(default_params(tiny_model), steps=4, guidance_scale=3.0)
    tokens = sample(tiny_model, [PROMPT] * 2, [replace(base, seed=5), replace(base, seed=6)], decode=False).tokens  # (2, N)
    want = decode_pngs(tiny_model, tokens, batch=1)  # each grid decoded alone, as the server does
    assert [im.seed for im in resp.images] == [5, 6] and resp.seed == 5 and resp.id.startswith("gen-")
    for image, expected in zip(resp.images, want):
        got = pixels(image.png)
        assert got.shape == (16, 16, 3)
        assert image.png == expected  # byte-exact
    p = resp.params
    assert (p.steps, p.seed, p.guidance_scale, p.sampler, p.uncond) == (4, 5, 3.0, pb.SAMPLER_PURITY, pb.UNCOND_NULL)
    assert not p.HasField("negative_prompt")
    t = resp.timings
    assert 0 < t.denoise_ms <= t.total_ms and t.queue_ms >= 0 and t.decode_ms > 0


def test_stream_sends_previews_every_k_steps_then_the_result(tiny_model):
    with serving(tiny_model) as h:
        msgs = list(h.stub.GenerateStream(pb.GenerateRequest(prompt=PROMPT, n=2, seed=1, steps=7, preview_every=3)))
        default_k = list(h.stub.GenerateStream(pb.GenerateRequest(prompt=PROMPT, seed=1, steps=4)))  # k = max(1, 4 // 8)
        unary = h.stub.Generate(pb.GenerateRequest(prompt=PROMPT, n=2, seed=1, steps=7, preview_every=3))
    assert [m.WhichOneof("event") for m in msgs] == ["progress", "progress", "result"]
    progress = [m.progress for m in msgs[:-1]]
    assert [(p.step, p.total) for p in progress] == [(3, 7), (6, 7)]  # exactly k, 2k, ...
    assert all(len(p.previews) == 2 and [im.seed for im in p.previews] == [1, 2] for p in progress)
    assert all(pixels(im.png).shape == (16, 16, 3) for p in progress for im in p.previews)
    assert 0 < progress[0].unmasked <= progress[1].unmasked < 1
    result = msgs[-1].result
    assert [im.png for im in result.images] == [im.png for im in unary.images]  # same seed, same images
    assert [m.progress.step for m in default_k[:-1]] == [1, 2, 3] and default_k[-1].HasField("result")


def test_an_edit_streams_only_its_region_unmasking_and_equals_the_library(tiny_model):
    from vqdiff.model.sampling.edit import edit

    rgb = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    alpha = np.full((16, 16, 1), 255, np.uint8)
    alpha[:, 8:] = 0  # the right half is repainted
    image, mask = png(rgb), png(np.concatenate([rgb, alpha], axis=-1))
    with serving(tiny_model) as h:
        msgs = list(h.stub.GenerateStream(pb.GenerateRequest(prompt=PROMPT, seed=3, steps=4, preview_every=1,
                                                             image=image, mask=mask)))
        e = rpc_error(h.stub.Generate, pb.GenerateRequest(prompt=PROMPT, image=image, mask=png(rgb)))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and e.details().startswith("mask: "), e.details()
        e = rpc_error(h.stub.Generate, pb.GenerateRequest(prompt=PROMPT, strength=0.5))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and e.details().startswith("strength: "), e.details()
    progress = [m.progress for m in msgs[:-1]]
    assert [p.step for p in progress] == [1, 2, 3] and progress[0].unmasked > 0.5  # the left half never masked
    images = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    masks = torch.zeros(1, 16, 16, dtype=torch.bool)
    masks[:, :, 8:] = True
    params = replace(default_params(tiny_model), steps=4, seed=3)
    tokens = edit(tiny_model, images, [PROMPT], params, masks=masks, decode=False).tokens
    assert msgs[-1].result.images[0].png == decode_pngs(tiny_model, tokens, batch=1)[0]


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


# -- errors ----------------------------------------------------------------------------------------


def test_invalid_argument_names_the_field(tiny_model):
    with serving(tiny_model) as h:
        before = outcomes(h.engine, "invalid")
        cases = {"steps": {"steps": 0}, "seed": {"seed": 2**63}, "sampler": {"sampler": 9}, "n": {"n": 0},
                 "guidance_scale": {"guidance_scale": float("nan")}, "model": {"model": "another"}}
        for field, kwargs in cases.items():
            for call in (h.stub.Generate, h.stub.GenerateStream):
                e = rpc_error(call, pb.GenerateRequest(prompt=PROMPT, **kwargs))
                assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and e.details().startswith(f"{field}: "), e
        assert outcomes(h.engine, "invalid") == before + 2 * len(cases)  # each counted once, wherever it failed
        assert h.engine.scheduler.idle
        assert h.stub.Generate(pb.GenerateRequest(prompt=PROMPT, steps=2, model="tiny")).images  # its own name


MALFORMED = {
    "garbage": b"not a protobuf message \xff\xff",
    "a truncated varint": b"\x28\xff",  # field 5 (steps), varint whose continuation bit promises more
    "a prompt that is not UTF-8": b"\x0a\x02\xff\xfe",  # field 1 (prompt), length 2
}


def test_malformed_protobuf_is_invalid_argument(tiny_model):
    assert pb.GenerateRequest.DESCRIPTOR.fields_by_name["prompt"].number == 1
    with pytest.raises(UnicodeEncodeError):  # a lone surrogate cannot leave the Python client as a str
        pb.GenerateRequest(prompt="\ud800").SerializeToString()
    with serving(tiny_model) as h:
        raw = lambda method, call: call(f"/{SERVICE}/{method}", request_serializer=None, response_deserializer=None)
        calls = (raw("Generate", h.channel.unary_unary), raw("GenerateStream", h.channel.unary_stream))
        before = outcomes(h.engine, "invalid")
        for what, data in MALFORMED.items():
            for call in calls:
                e = rpc_error(call, data, timeout=WAIT_S)
                assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (what, e)
                assert e.details().startswith("the request is not a valid vqdiff.v1.GenerateRequest: "), (what, e)
                assert "<class" not in e.details() and "DecodeError" not in e.details(), (what, e)
        e = rpc_error(calls[0], MALFORMED["a prompt that is not UTF-8"])
        assert "UTF-8" in e.details(), e  # says what was wrong
        assert outcomes(h.engine, "invalid") == before + 2 * len(MALFORMED) + 1
        valid = pb.GenerateRequest(prompt=PROMPT, seed=1, steps=2).SerializeToString()
        assert pb.GenerateResponse.FromString(calls[0](valid, timeout=WAIT_S)).seed == 1  # the raw path works
        assert h.stub.Generate(pb.GenerateRequest(prompt=PROMPT, seed=2, steps=2)).seed == 2
        assert h.engine.scheduler.idle


def test_malformed_protobuf_without_a_key_is_unauthenticated(tiny_model):
    with serving(tiny_model, api_keys=("k1",)) as h:
        call = h.channel.unary_unary(f"/{SERVICE}/Generate", request_serializer=None, response_deserializer=None)
        assert rpc_error(call, MALFORMED["garbage"]).code() == grpc.StatusCode.UNAUTHENTICATED
        e = rpc_error(call, MALFORMED["garbage"], metadata=(("authorization", "Bearer k1"),))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (outcomes(h.engine, "unauthenticated"), outcomes(h.engine, "invalid")) == (1, 1)


def test_queue_full_is_resource_exhausted_and_disturbs_nothing(tiny_model):
    # max_waiting=1: the scheduler refuses whenever `max_waiting` requests already wait, so 0 would
    # refuse every request; one running + one waiting fills this server
    with serving(tiny_model, gated=True, max_rows=2, max_images=1, max_waiting=1) as h:
        h.gate.clear()
        running = h.stub.Generate.future(pb.GenerateRequest(prompt=PROMPT, seed=1, steps=3))
        until(lambda: len(h.engine.scheduler.running) == 1, "the first request to run")
        waiting = h.stub.GenerateStream(pb.GenerateRequest(prompt=PROMPT, seed=2, steps=3, preview_every=1))
        until(lambda: len(h.engine.scheduler.waiting) == 1, "the second request to queue")
        rejected = outcomes(h.engine, "rejected")
        e = rpc_error(h.stub.Generate, pb.GenerateRequest(prompt=PROMPT, seed=3, steps=3))
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in e.details()
        assert dict(e.trailing_metadata()).get("retry-after") == "1"
        assert outcomes(h.engine, "rejected") == rejected + 1
        h.gate.set()
        assert running.result(WAIT_S).images[0].seed == 1
        msgs = list(waiting)
        assert [m.progress.step for m in msgs[:-1]] == [1, 2] and msgs[-1].result.seed == 2
        assert outcomes(h.engine, "success") == 2


def test_deadlines_engine_and_client(tiny_model):
    with serving(tiny_model, gated=True, request_timeout_s=0.3) as h:
        h.gate.clear()
        call = h.stub.Generate.future(pb.GenerateRequest(prompt=PROMPT, seed=1, steps=3))
        until(lambda: len(h.engine.scheduler.running) == 1, "the request to run")
        time.sleep(0.35)
        h.gate.set()
        with pytest.raises(grpc.RpcError) as info:
            call.result(WAIT_S)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert outcomes(h.engine, "deadline") == 1
    with serving(tiny_model, gated=True) as h:  # the client's deadline becomes the engine's
        h.gate.clear()
        call = h.stub.Generate.future(pb.GenerateRequest(prompt=PROMPT, seed=1, steps=3), timeout=5.0)
        until(lambda: len(h.engine.scheduler.running) == 1, "the request to run")
        req = h.engine.scheduler.running[0]
        # not request_timeout_s (300 s); the wire format of grpc-timeout rounds up by a few ms
        assert 4.0 < req.deadline - req.arrival <= 5.1
        h.gate.set()
        assert call.result(WAIT_S).seed == 1


def test_unauthenticated_without_or_with_a_wrong_key(tiny_model):
    with serving(tiny_model, api_keys=("k1", "k2")) as h:
        req = pb.GenerateRequest(prompt=PROMPT, seed=1, steps=2)
        for metadata in (None, (("authorization", "Bearer nope"),), (("authorization", "k1"),)):
            e = rpc_error(h.stub.Generate, req, metadata=metadata)
            assert e.code() == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in e.details()
        e = rpc_error(h.stub.GenerateStream, req)
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED
        assert outcomes(h.engine, "unauthenticated") == 4
        assert h.stub.Generate(req, metadata=(("authorization", "Bearer k2"),)).seed == 1
        health = health_pb2_grpc.HealthStub(h.channel)  # probes need no key
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING


def test_a_cancelled_stream_frees_its_slot(tiny_model):
    with serving(tiny_model, gated=True) as h:
        success = outcomes(h.engine, "success")
        call = h.stub.GenerateStream(pb.GenerateRequest(prompt=PROMPT, seed=1, steps=50, preview_every=1))
        assert next(call).progress.step == 1
        h.gate.clear()  # hold it mid-request, so it cannot finish before the cancel lands
        call.cancel()
        until(lambda: not h.engine.scheduler.running or h.engine.scheduler.running[0].cancel_requested,
              "the server to cancel the request")
        h.gate.set()
        until(lambda: not h.engine.scheduler.running, "the request to leave the batch")
        until(lambda: outcomes(h.engine, "cancelled") == 1, "the cancellation to be counted")
        assert outcomes(h.engine, "success") == success


# -- health, reflection, draining ------------------------------------------------------------------


def test_health_reflection_and_draining(tiny_model):
    with serving(tiny_model) as h:
        health = health_pb2_grpc.HealthStub(h.channel)
        status = lambda service: health.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status("") == status(SERVICE) == health_pb2.HealthCheckResponse.SERVING
        services = ProtoReflectionDescriptorDatabase(h.channel).get_services()
        assert {SERVICE, "grpc.health.v1.Health"} <= set(services)
        h.server.set_not_serving()
        h.engine.drain()
        assert status("") == status(SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
        e = rpc_error(h.stub.Generate, pb.GenerateRequest(prompt=PROMPT, steps=2))
        assert e.code() == grpc.StatusCode.UNAVAILABLE


# -- the generated code ----------------------------------------------------------------------------


def test_generated_code_matches_the_proto(tmp_path):
    """proto/generate.sh into a temp dir gives the checked-in server/proto_gen/ byte for byte."""
    pytest.importorskip("grpc_tools")
    subprocess.run(["bash", str(ROOT / "proto" / "generate.sh"), str(tmp_path)], check=True,
                   env={**os.environ, "PYTHON": sys.executable}, capture_output=True)
    files = lambda root: {p.relative_to(root): p.read_bytes() for p in root.rglob("*")
                          if p.is_file() and "__pycache__" not in p.parts}
    want, got = files(tmp_path), files(ROOT / "server" / "proto_gen")
    assert sorted(got) == sorted(want)
    stale = [str(p) for p in want if want[p] != got[p]]
    assert not stale, f"{stale} differ from proto/: run proto/generate.sh (grpcio-tools as pinned in pyproject.toml)"


def test_a_named_sampler_without_steps_gets_that_samplers_default(tiny_model):
    T = tiny_model.config.transformer.num_timesteps
    with serving(tiny_model) as h:
        resp = h.stub.Generate(pb.GenerateRequest(prompt=PROMPT, seed=1, sampler=pb.SAMPLER_POSTERIOR))
        assert resp.params.sampler == pb.SAMPLER_POSTERIOR and resp.params.steps == T
        resp = h.stub.Generate(pb.GenerateRequest(prompt=PROMPT, seed=1, sampler=pb.SAMPLER_SKIP))
        assert resp.params.steps == default_params(tiny_model).steps  # the folder's budget, within 1..T
