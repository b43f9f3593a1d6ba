"""The HTTP API through a real server on loopback (uvicorn, the engine, the tiny random model)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from vqdiff.model.sampling.sampler import request_params, sample
from vqdiff.model.io.images import decode_pngs
from tests.serving import ServerThread, confident_model


@pytest.fixture(scope="module")
def model(tokenizer, tiny_config):
    m = confident_model(tokenizer, tiny_config)
    m.generation_defaults = {"steps": 6, "guidance_scale": 2.0}
    return m


@pytest.fixture(scope="module")
def server(model):
    with ServerThread(model, max_rows=12, max_images=4) as s:
        yield s


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def alone(model, prompt: str, **kw) -> np.ndarray:
    """The request run on its own, its grid decoded on its own: what the server must send, bit for bit."""
    tokens = sample(model, [prompt], request_params(model, kw), decode=False).tokens  # (1, N)
    return pixels(decode_pngs(model, tokens, batch=1)[0])


def metric(url: str, name: str, **labels) -> float:
    text = httpx.get(f"{url}/metrics").text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}{{(.*)}} (\S+)$", line) or re.match(rf"^{re.escape(name)} (\S+)$", line)
        if m and (not want or all(part in m.group(1) for part in want.split(","))):
            total += float(m.groups()[-1])
    return total


def test_generate_returns_the_image_the_model_draws_alone(server, model):
    r = httpx.post(f"{server.url}/v1/generate", json={"prompt": "a red circle", "seed": 7, "steps": 5}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["seed"] == 7 and body["id"].startswith("gen-")
    assert body["params"]["steps"] == 5 and body["params"]["guidance_scale"] == 2.0  # the folder's default
    assert body["params"]["uncond"] == "null"  # resolved, not "auto"
    assert set(body["timings"]) == {"queue_ms", "denoise_ms", "decode_ms", "total_ms"}
    assert body["timings"]["total_ms"] >= body["timings"]["denoise_ms"] > 0
    png = base64.b64decode(body["images"][0]["b64_json"])
    np.testing.assert_array_equal(pixels(png), alone(model, "a red circle", seed=7, steps=5))


def test_accept_image_png_returns_the_raw_image(server, model):
    r = httpx.post(f"{server.url}/v1/generate", json={"prompt": "a blue square", "seed": 3},
                   headers={"Accept": "image/png"}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-seed"] == "3"
    np.testing.assert_array_equal(pixels(r.content), alone(model, "a blue square", seed=3))


def test_many_concurrent_requests_with_different_parameters_all_match_alone(server, model):
    jobs = [
        {"prompt": "a red circle", "seed": 1, "steps": 4},
        {"prompt": "a blue square", "seed": 2, "steps": 9, "sampler": "random"},
        {"prompt": "the triangle", "seed": 3, "steps": 20, "sampler": "skip", "guidance_scale": 3.5},
        {"prompt": "a green circle", "seed": 4, "steps": 7, "truncation_rate": 0.7, "purity_weight": 2.0},
        {"prompt": "left of the square", "seed": 5, "steps": 6, "negative_prompt": "red"},
        {"prompt": "a circle", "seed": 6, "steps": 5, "guidance_scale": 1.0},
        {"prompt": "above a triangle", "seed": 8, "steps": 3, "n": 2},
        {"prompt": "a square", "seed": 9, "steps": 100, "sampler": "posterior"},
    ] * 2

    async def go():
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*(c.post(f"{server.url}/v1/generate", json=j) for j in jobs))

    before = metric(server.url, "vqdiff_forward_passes_total")
    responses = asyncio.run(go())
    forwards = metric(server.url, "vqdiff_forward_passes_total") - before
    for job, r in zip(jobs, responses):
        assert r.status_code == 200, r.text
        images = r.json()["images"]
        kw = {k: v for k, v in job.items() if k not in ("prompt", "n")}
        for i, image in enumerate(images):
            want = alone(model, job["prompt"], **{**kw, "seed": job["seed"] + i})
            np.testing.assert_array_equal(pixels(base64.b64decode(image["b64_json"])), want)
    # batching: far fewer forwards than the sum of the requests' steps
    assert forwards < sum(j["steps"] for j in jobs)


@pytest.mark.parametrize("body, param", [
    ({"prompt": "a", "steps": 0}, "steps"),
    ({"prompt": "a", "steps": 1000}, "steps"),
    ({"prompt": "a", "guidance_scale": -1}, "guidance_scale"),
    ({"prompt": "a", "truncation_rate": 0}, "truncation_rate"),
    ({"prompt": "a", "sampler": "ddim"}, "sampler"),
    ({"prompt": "a", "n": 0}, "n"),
    ({"prompt": "a", "n": 99}, "n"),
    ({"prompt": "a", "seed": -5}, "seed"),
    ({"prompt": "a", "steps": "5"}, "steps"),
    ({"prompt": "a", "stepz": 5}, "stepz"),
    ({"prompt": 5}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "a", "uncond": "negative"}, "uncond"),
    ({"prompt": "a", "sampler": "posterior", "steps": 10}, "steps"),
])
def test_bad_input_is_a_422_envelope_naming_the_field(server, body, param):
    r = httpx.post(f"{server.url}/v1/generate", json=body, timeout=30)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    assert param in err["message"]


def test_malformed_json_and_unknown_routes_use_the_envelope(server):
    r = httpx.post(f"{server.url}/v1/generate", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "error" in r.json()
    r = httpx.post(f"{server.url}/v1/generate", content=b'{"prompt": "a"}',
                   headers={"content-type": "application/x-www-form-urlencoded"})  # curl -d without -H
    assert r.status_code == 422 and "Content-Type: application/json" in r.json()["error"]["message"]
    r = httpx.get(f"{server.url}/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"


def test_streaming_sends_previews_every_k_steps_then_the_result(server, model):
    events = []
    with httpx.stream("POST", f"{server.url}/v1/generate", timeout=60,
                      json={"prompt": "a red circle", "seed": 4, "steps": 8, "stream": True, "preview_every": 2}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[6:])))
    kinds = [k for k, _ in events]
    assert kinds == ["queued", "progress", "progress", "progress", "result"]
    progress = [d for k, d in events if k == "progress"]
    assert [p["step"] for p in progress] == [2, 4, 6] and all(p["total"] == 8 for p in progress)
    assert [p["unmasked"] for p in progress] == [0.25, 0.5, 0.75]  # 64 tokens, 8 per step
    assert all(pixels(base64.b64decode(p["previews"][0])).shape == (16, 16, 3) for p in progress)
    result = events[-1][1]
    np.testing.assert_array_equal(pixels(base64.b64decode(result["images"][0]["b64_json"])),
                                  alone(model, "a red circle", seed=4, steps=8))


def test_models_health_and_readiness(server):
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    m = httpx.get(f"{server.url}/v1/models").json()["data"][0]
    assert m["image_size"] == 16 and m["default_params"]["steps"] == 6 and m["learnable_null"] is True


def test_a_request_may_name_the_served_model_and_no_other(server):
    name = httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]
    ok = httpx.post(f"{server.url}/v1/generate", json={"prompt": "a red circle", "steps": 2, "model": name}, timeout=30)
    assert ok.status_code == 200, ok.text
    r = httpx.post(f"{server.url}/v1/generate", json={"prompt": "a red circle", "model": "another"}, timeout=30)
    assert r.status_code == 422 and r.json()["error"]["param"] == "model", r.text
    assert "another" in r.json()["error"]["message"] and name in r.json()["error"]["message"]


def test_openai_client_works_unmodified(server, model):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    out = client.images.generate(prompt="a red circle", n=2, size="16x16", response_format="b64_json")
    assert len(out.data) == 2
    for d in out.data:
        assert pixels(base64.b64decode(d.b64_json)).shape == (16, 16, 3)
    with pytest.raises(openai.UnprocessableEntityError, match="size"):
        client.images.generate(prompt="a red circle", size="1024x1024")


@pytest.fixture
def slow_steps(monkeypatch):
    """Every engine step takes >= 20 ms, so a 100-step request outlasts the client's patience."""
    import vqdiff.server.engine as engine_module

    real = engine_module.advance

    def slow(*a, **kw):
        time.sleep(0.02)
        return real(*a, **kw)

    monkeypatch.setattr(engine_module, "advance", slow)


def test_disconnected_clients_free_their_slot_and_count_as_cancelled(model, slow_steps):
    with ServerThread(model, max_rows=2, max_images=1) as s:
        for stream in (False, True):
            before = metric(s.url, "vqdiff_requests_total", outcome="cancelled")
            body = {"prompt": "a red circle", "sampler": "posterior", "steps": 100, "stream": stream}

            def client():
                try:
                    with httpx.stream("POST", f"{s.url}/v1/generate", json=body, timeout=0.3) as r:
                        for line in r.iter_lines():
                            if line.startswith("event: progress"):
                                break  # a streaming client that has seen enough closes the connection
                except httpx.TimeoutException:
                    pass  # a plain client gives up waiting and closes the connection

            # a 100-step posterior request takes far longer than the client waits
            t = threading.Thread(target=client)
            t.start()
            t.join()
            deadline = time.monotonic() + 10
            while metric(s.url, "vqdiff_requests_total", outcome="cancelled") == before:
                assert time.monotonic() < deadline, f"stream={stream}: the request was never cancelled"
                time.sleep(0.05)
            assert s.engine.wait_idle(5)
            assert metric(s.url, "vqdiff_requests_running") == 0


async def start_long_request(c: httpx.AsyncClient, url: str, **body) -> asyncio.Task:
    """A 100-step posterior request (slowed by ``slow_steps``), once it is in the running batch."""
    task = asyncio.create_task(c.post(f"{url}/v1/generate", json={
        "prompt": "a red circle", "sampler": "posterior", "steps": 100, **body}))
    while metric(url, "vqdiff_requests_running") < 1:
        await asyncio.sleep(0.01)
    return task


def test_queue_full_is_429_with_retry_after_and_disturbs_nothing(model, slow_steps):
    with ServerThread(model, max_rows=2, max_images=1, max_waiting=0) as s:
        async def go():
            async with httpx.AsyncClient(timeout=60) as c:
                first = await start_long_request(c, s.url, seed=1)
                refused = await c.post(f"{s.url}/v1/generate", json={"prompt": "a blue square"})
                return await first, refused

        first, refused = asyncio.run(go())
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["code"] == "queue_full"
        assert first.status_code == 200
        np.testing.assert_array_equal(pixels(base64.b64decode(first.json()["images"][0]["b64_json"])),
                                      alone(model, "a red circle", seed=1, sampler="posterior", steps=100))
        assert metric(s.url, "vqdiff_requests_total", outcome="rejected") == 1
        assert metric(s.url, "vqdiff_requests_total", outcome="success") == 1


def test_api_keys(model):
    with ServerThread(model, api_keys=("k1", "k2")) as s:
        assert httpx.post(f"{s.url}/v1/generate", json={"prompt": "a"}).status_code == 401
        r = httpx.post(f"{s.url}/v1/generate", json={"prompt": "a"}, headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = httpx.post(f"{s.url}/v1/generate", json={"prompt": "a", "steps": 2}, headers={"Authorization": "Bearer k2"},
                       timeout=60)
        assert r.status_code == 200
        assert httpx.get(f"{s.url}/healthz").status_code == 200  # probes stay open


def test_draining_refuses_new_work_finishes_running_and_stops(model, slow_steps):
    s = ServerThread(model, max_rows=2, max_images=1, grace_s=30).start()

    async def go():
        async with httpx.AsyncClient(timeout=60) as c:
            running = await start_long_request(c, s.url, seed=2)
            s.begin_stop()
            while (await c.get(f"{s.url}/readyz")).status_code == 200:
                await asyncio.sleep(0.01)
            ready = await c.get(f"{s.url}/readyz")
            refused = await c.post(f"{s.url}/v1/generate", json={"prompt": "late"})
            return await running, ready, refused

    running, ready, refused = asyncio.run(go())
    assert ready.status_code == 503
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "unavailable"
    assert running.status_code == 200  # the request in flight finished within the grace period
    s.thread.join(30)
    assert not s.thread.is_alive() and s.error is None


def test_deadline_is_504_and_queued_streams_get_heartbeats(model, slow_steps):
    with ServerThread(model, max_rows=2, max_images=1, request_timeout_s=1.0, heartbeat_s=0.1) as s:
        async def go():
            async with httpx.AsyncClient(timeout=60) as c:
                running = await start_long_request(c, s.url)
                lines = []
                async with c.stream("POST", f"{s.url}/v1/generate", json={
                        "prompt": "a blue square", "steps": 4, "stream": True}) as r:
                    async for line in r.aiter_lines():
                        lines.append(line)
                return await running, lines

        running, lines = asyncio.run(go())
    assert running.status_code == 504  # 100 slowed steps take > 1 s
    assert running.json()["error"]["code"] == "deadline_exceeded"
    assert lines.count(": heartbeat") >= 2  # it waited behind the running request
    assert "event: error" in lines or "event: result" in lines


def test_300_sequential_requests_each_equal_the_same_request_alone(server, model):
    prompts = ["a red circle", "a blue square", "the triangle above a green circle", "left of the square"]
    with httpx.Client(timeout=60) as c:
        for i in range(300):
            prompt = prompts[i % 4]
            r = c.post(f"{server.url}/v1/generate", json={"prompt": prompt, "seed": 500 + i, "steps": 2})
            assert r.status_code == 200, r.text
            np.testing.assert_array_equal(pixels(base64.b64decode(r.json()["images"][0]["b64_json"])),
                                          alone(model, prompt, seed=500 + i, steps=2), err_msg=f"request {i}")


def sse_or_json(r: httpx.Response) -> dict:
    assert r.headers["content-type"].startswith("application/json"), (r.status_code, r.headers, r.text[:300])
    return r.json()["error"]


@pytest.mark.parametrize("body, param", [
    ({"n": 100}, "n"),
    ({"steps": 1025}, "steps"),
    ({"prompt": "x" * 2001}, "prompt"),
    ({"sampler": "posterior", "steps": 10}, "steps"),
])
def test_streamed_requests_refused_before_the_first_byte_get_their_status(server, body, param):
    before = metric(server.url, "vqdiff_requests_total", outcome="invalid")
    r = httpx.post(f"{server.url}/v1/generate", json={"prompt": "a red circle", "stream": True, **body}, timeout=30)
    assert r.status_code == 422
    err = sse_or_json(r)
    assert err["param"] == param and err["code"] == "invalid_value", err
    assert metric(server.url, "vqdiff_requests_total", outcome="invalid") == before + 1


@pytest.mark.parametrize("path, body, param", [
    ("/v1/generate", '{"prompt": "\\ud800 a red circle"}', "prompt"),
    ("/v1/generate", '{"prompt": "a red circle", "negative_prompt": "blue \\udfff"}', "negative_prompt"),
    ("/v1/generate", '{"prompt": "\\ud800", "stream": true}', "prompt"),
    ("/v1/images/generations", '{"prompt": "a \\ud800"}', "prompt"),
])
def test_text_that_is_not_unicode_is_a_422_naming_the_field(server, path, body, param):
    before = {o: metric(server.url, "vqdiff_requests_total", outcome=o) for o in ("invalid", "failed")}
    r = httpx.post(f"{server.url}{path}", content=body.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    err = sse_or_json(r)
    assert err["param"] == param and "surrogate" in err["message"], err
    assert metric(server.url, "vqdiff_requests_total", outcome="invalid") == before["invalid"] + 1
    assert metric(server.url, "vqdiff_requests_total", outcome="failed") == before["failed"]


@pytest.mark.parametrize("content", [
    b'{"prompt": "a red',  # truncated
    b"[" * 1000 + b"]" * 1000,  # nesting deeper than the parser takes
    b'{"prompt": "a", "seed": ' + b"9" * 5000 + b"}",  # an integer past Python's digit limit
    b'{"prompt": "\xff\xfe a"}',  # not UTF-8
    b"",
])
def test_a_body_that_is_not_json_is_a_422_envelope_with_a_code(server, content):
    before = metric(server.url, "vqdiff_requests_total", outcome="invalid")
    r = httpx.post(f"{server.url}/v1/generate", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_json" and err["param"] is None and err["type"] == "invalid_request_error", err
    assert metric(server.url, "vqdiff_requests_total", outcome="invalid") == before + 1


def test_routing_errors_have_codes(server):
    r = httpx.get(f"{server.url}/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(f"{server.url}/v1/generate")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_a_named_sampler_without_steps_gets_that_samplers_default(server, model):
    T = model.config.transformer.num_timesteps
    for sampler, steps in (("posterior", T), ("skip", 6), ("random", 6)):  # the folder's default steps: 6
        r = httpx.post(f"{server.url}/v1/generate", json={"prompt": "a red circle", "seed": 1, "sampler": sampler},
                       timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["params"]["sampler"] == sampler and r.json()["params"]["steps"] == steps


def test_gauges_read_zero_on_an_idle_server_after_traffic(server):
    async def go():
        async with httpx.AsyncClient(timeout=60) as c:
            return await asyncio.gather(*(c.post(f"{server.url}/v1/generate", json={
                "prompt": "a red circle", "seed": i, "steps": 3 + i % 4, "n": 1 + i % 3}) for i in range(12)))

    assert all(r.status_code == 200 for r in asyncio.run(go()))
    assert server.engine.wait_idle(10)
    assert metric(server.url, "vqdiff_requests_running") == 0
    assert metric(server.url, "vqdiff_requests_waiting") == 0
    # the memory gauge is the resident set now (the server runs in this process), not a peak
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    assert abs(metric(server.url, "vqdiff_device_memory_bytes") - rss) < 0.1 * rss
    # and the peak gauge is the process's peak resident set: at least what is resident now
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert rss * 0.9 <= metric(server.url, "vqdiff_device_memory_peak_bytes") <= peak * 1.1


def test_streamed_refusals_queue_full_draining_and_unauthenticated(model, slow_steps):
    with ServerThread(model, max_rows=2, max_images=1, max_waiting=0, api_keys=("k",)) as s:
        key = {"Authorization": "Bearer k"}
        r = httpx.post(f"{s.url}/v1/generate", json={"prompt": "a", "stream": True})
        assert r.status_code == 401 and sse_or_json(r)["code"] == "invalid_api_key"

        async def go():
            async with httpx.AsyncClient(timeout=60, headers=key) as c:
                first = await start_long_request(c, s.url, seed=1)
                full = await c.post(f"{s.url}/v1/generate", json={"prompt": "a blue square", "stream": True})
                s.engine.drain()
                draining = await c.post(f"{s.url}/v1/generate", json={"prompt": "a blue square", "stream": True})
                return await first, full, draining

        first, full, draining = asyncio.run(go())
        assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1
        assert sse_or_json(full)["code"] == "queue_full"
        assert draining.status_code == 503 and int(draining.headers["retry-after"]) >= 1
        assert sse_or_json(draining)["code"] == "unavailable"
        assert first.status_code == 200
