"""The web page (``GET /``) in headless Chromium against the real server (tiny random model, HTTP
only): a prompt streams previews into the page until the final image; a bad value shows the API's
error; Stop aborts the stream and the server cancels the request. Skipped without Chromium, except under CI, where a missing browser fails the run."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.serving import chromium

CHROMIUM = chromium(module_level=True)
from playwright.sync_api import expect, sync_playwright  # noqa: E402

from vqdiff.model.io.folder import random_model
from vqdiff.server.main import serve_async
from vqdiff.server.settings import Settings
from tests.serving import free_port

TIMEOUT_MS = 10_000
SLOW = threading.Event()  # while set, every transformer forward takes 50 ms more: a run long enough to stop
page_server_model: list = []  # the model the module's server runs (an edit is checked against the library)


@pytest.fixture(scope="module")
def server(tokenizer, tiny_config):
    """The real server (engine + HTTP) on its own event loop in a thread; yields its base URL."""
    model = random_model(tiny_config, tokenizer, seed=3).eval()
    with torch.no_grad():  # confident, varied predictions, as in test_sampler's tiny_model
        model.transformer.out.weight.mul_(40.0)
        model.null_cond.embeddings.normal_()
    model.transformer.register_forward_pre_hook(lambda *_: time.sleep(0.05) if SLOW.is_set() else None)
    page_server_model[:] = [model]
    settings = Settings(host="127.0.0.1", http_port=free_port(), grpc_port=0, grace_s=1.0)
    loop = asyncio.new_event_loop()
    started, stop = asyncio.Event(), asyncio.Event()
    ready = threading.Event()  # set once serving, or once serve_async has failed
    errors: list[BaseException] = []

    async def main() -> None:
        asyncio.create_task(started.wait()).add_done_callback(lambda _: ready.set())
        await serve_async(settings, model=model, folder=Path("tiny"), started=started, stop=stop)

    def run() -> None:
        try:
            loop.run_until_complete(main())
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
            errors.append(e)
        finally:
            ready.set()

    thread = threading.Thread(target=run, name="vqdiff-server", daemon=True)
    thread.start()
    assert ready.wait(30), "the server did not start within 30 s"
    if errors:
        raise errors[0]
    yield f"http://127.0.0.1:{settings.http_port}"
    loop.call_soon_threadsafe(stop.set)
    thread.join(timeout=15)
    loop.close()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(server + "/")
    expect(page.locator("#steps")).not_to_have_value("")  # defaults from /v1/models are in
    yield page
    context.close()


def _png(data_url: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert data_url.startswith(prefix), data_url[:40]
    return Image.open(io.BytesIO(base64.b64decode(data_url[len(prefix):])))


def _sse_result(body: bytes) -> dict:
    """The data of the stream's ``result`` event."""
    for block in body.decode().split("\n\n"):
        lines = block.split("\n")
        if "event: result" in lines:
            return json.loads("".join(line[len("data: "):] for line in lines if line.startswith("data: ")))
    raise AssertionError(f"no result event in the stream: {body[:200]!r}")


def test_generate_streams_previews_then_the_image(page, tiny_config):
    page.fill("#prompt", "a red circle above a blue square")
    page.fill("#steps", "8")
    page.fill("#preview_every", "2")
    # every src the image takes, in order: each record's oldValue is the src it replaced (several changes
    # may land in one callback, and by then the target holds only the last), the final src is read below
    page.evaluate("""() => {
        window.srcs = [];
        new MutationObserver(records => { for (const r of records) window.srcs.push(r.oldValue); })
            .observe(document.getElementById("preview"),
                     {attributes: true, attributeFilter: ["src"], attributeOldValue: true});
    }""")
    with page.expect_response(lambda r: r.url.endswith("/v1/generate")) as response:
        page.click("#generate")
    expect(page.locator("#preview.final")).to_be_visible()
    expect(page.locator("#generate")).to_be_enabled()  # the stream is read to its end

    assert page.eval_on_selector("#progress", "e => [e.value, e.max]") == [8, 8]
    expect(page.locator("#status")).to_contain_text("step 8/8")
    expect(page.locator("#error")).to_be_empty()
    srcs = page.evaluate("window.srcs")
    final = page.get_attribute("#preview", "src")
    # the page's empty image, then one preview per progress event at steps 2, 4 and 6. Their pixels are
    # the model's business, not the page's: a confident model's 'predicted' preview may already be the
    # final image, so the count of images shown is what is asserted, not how many differ
    assert srcs[0] is None, srcs[:1]
    previews = srcs[1:]
    assert len(previews) == 3 and None not in previews, f"{len(previews)} previews shown before the final image"
    size = tiny_config.image_size
    for url in {*previews, final}:
        image = _png(url)
        assert image.format == "PNG" and image.size == (size, size)

    result = _sse_result(response.value.body())
    assert final == "data:image/png;base64," + result["images"][0]["b64_json"]
    assert page.text_content("#seed_out") == str(result["seed"])
    assert "total" in page.text_content("#timings")


def test_invalid_steps_shows_the_api_error(page):
    page.fill("#prompt", "a red circle")
    page.fill("#steps", "0")
    page.click("#generate")
    expect(page.locator("#error")).to_contain_text("steps")
    expect(page.locator("#error")).to_contain_text("not allowed")
    expect(page.locator("#status")).to_have_text("failed")
    assert page.get_attribute("#preview", "src") is None


def _cancelled(page, server) -> float:
    metrics = page.request.get(server + "/metrics").text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("vqdiff_requests_total{") and 'outcome="cancelled"' in line)


def test_stop_aborts_the_stream_and_the_server_cancels(page, server):
    before = _cancelled(page, server)
    page.fill("#prompt", "a green triangle")
    page.fill("#steps", "64")
    page.fill("#preview_every", "1")
    SLOW.set()  # 64 steps take > 3 s: Stop lands mid-run
    try:
        page.click("#generate")
        expect(page.locator("#status")).to_contain_text("step ")
        expect(page.locator("#stop")).to_be_enabled()
        page.click("#stop")
        expect(page.locator("#status")).to_have_text("stopped")
        expect(page.locator("#generate")).to_be_enabled()
        expect(page.locator("#stop")).to_be_disabled()
        expect(page.locator("#error")).to_be_empty()
        assert page.locator("#preview.final").count() == 0
        deadline = time.monotonic() + 5
        while _cancelled(page, server) == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _cancelled(page, server) == before + 1, "the server did not cancel the aborted request"
    finally:
        SLOW.clear()


def test_edit_paints_a_region_and_only_that_region_is_repainted(page, server, tmp_path, tiny_config):
    """Pick a PNG, paint over its left columns, Edit: the request carries the image and a mask whose
    transparent pixels are where the brush went; the stream starts with the rest already unmasked,
    and the answer is the library's edit of exactly what the page sent."""
    import numpy as np

    from vqdiff.model.io.images import rgb_tensor, transparent_pixels

    size = tiny_config.image_size
    src = tmp_path / "source.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(src)
    page.fill("#prompt", "a blue square")
    page.fill("#steps", "4")
    page.fill("#preview_every", "1")
    page.fill("#seed", "12")
    page.set_input_files("#edit_file", str(src))
    expect(page.locator("#generate")).to_have_text("Edit")
    expect(page.locator("#paint")).to_be_visible()
    page.fill("#brush", "2")
    box = page.locator("#paint").bounding_box()
    cell = box["width"] / size
    page.mouse.move(box["x"] + cell * 1, box["y"] + cell * 1)
    page.mouse.down()
    for row in range(1, size, 2):  # a zig-zag over columns 0..3
        page.mouse.move(box["x"] + cell * 1, box["y"] + cell * row, steps=2)
        page.mouse.move(box["x"] + cell * 3, box["y"] + cell * row, steps=2)
    page.mouse.up()
    with page.expect_request(lambda r: r.url.endswith("/v1/generate")) as request, \
            page.expect_response(lambda r: r.url.endswith("/v1/generate")) as response:
        page.click("#generate")
    expect(page.locator("#preview.final")).to_be_visible()
    expect(page.locator("#error")).to_be_empty()

    sent = request.value.post_data_json
    image = Image.open(io.BytesIO(base64.b64decode(sent["image"])))
    mask = transparent_pixels(Image.open(io.BytesIO(base64.b64decode(sent["mask"]))), "mask")  # (H, W)
    assert image.size == (size, size) and mask.any() and not mask[:, 5:].any()  # only where the brush went
    events = [b for b in response.value.body().decode().split("\n\n") if "event: progress" in b]
    first = json.loads(events[0].split("data: ", 1)[1])
    assert first["unmasked"] > 0.5  # the unpainted tokens were never masked

    result = _sse_result(response.value.body())
    model = page_server_model[0]
    from vqdiff.model.io.images import decode_pngs
    from vqdiff.model.sampling.edit import edit
    from vqdiff.model.sampling.sampler import request_params

    want = edit(model, rgb_tensor(image)[None], ["a blue square"], request_params(model, {"steps": 4, "seed": 12}),
                masks=mask[None], decode=False)
    assert base64.b64decode(result["images"][0]["b64_json"]) == decode_pngs(model, want.tokens, batch=1)[0]
    page.click("#no_edit")
    expect(page.locator("#generate")).to_have_text("Generate")
    expect(page.locator("#paint")).to_be_hidden()


def test_the_form_shows_the_few_steps_rule_until_a_field_is_edited(page, server):
    """A model folder's few-steps rule (GET /v1/models) fills the form for short requests, so what
    the page sends is what the server would have chosen; a field the user edits is left alone."""
    model = page_server_model[0]
    saved = model.generation_defaults
    model.generation_defaults = {"steps": 40, "few_steps": {"max_steps": 16, "purity_weight": 2.0,
                                                            "unmask_schedule": "cosine"}}
    try:
        page.reload()
        expect(page.locator("#steps")).to_have_value("40")
        expect(page.locator("#unmask_schedule")).to_have_value("linear")
        page.fill("#steps", "8")
        expect(page.locator("#unmask_schedule")).to_have_value("cosine")
        expect(page.locator("#purity_weight")).to_have_value("2")
        page.fill("#steps", "32")
        expect(page.locator("#purity_weight")).to_have_value("1")
        page.fill("#purity_weight", "0.5")  # edited: the rule no longer sets it
        page.fill("#steps", "8")
        expect(page.locator("#purity_weight")).to_have_value("0.5")
        expect(page.locator("#unmask_schedule")).to_have_value("cosine")
    finally:
        model.generation_defaults = saved
