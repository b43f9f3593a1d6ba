"""Editing over HTTP: /v1/generate with image / mask / strength, the OpenAI client's images.edit and
images.create_variation unmodified, every bad input a 422 naming its field, edits and generations
served together each equal to the same request alone."""

from __future__ import annotations

import base64
import io
import threading

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from vqdiff.model.io.images import decode_pngs, rgb_tensor
from vqdiff.model.sampling.edit import edit, token_mask
from vqdiff.model.sampling.sampler import request_params
from tests.e2e.test_http import alone, model  # noqa: F401 - the same tiny model fixture
from tests.serving import ServerThread, sse_events

SIZE = 16  # the tiny model's images: 8x8 tokens of 2x2 pixels


@pytest.fixture(scope="module")
def server(model):
    with ServerThread(model, max_rows=12, max_images=4, max_upload_bytes=4096) as s:
        yield s


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def source(seed: int = 0, size: int = SIZE) -> bytes:
    return png(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def mask_png(region: slice = slice(0, SIZE // 2), size: int = SIZE) -> bytes:
    """RGBA, transparent (alpha 0) over the columns of ``region``: the part to repaint."""
    a = np.full((size, size, 4), 255, dtype=np.uint8)
    a[:, region, 3] = 0
    return png(a)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def edited_alone(model, prompt: str, image: bytes, mask: bytes | None = None, strength: float | None = None,
                 **params) -> np.ndarray:
    """The edit run through the library on its own, decoded alone: what the server must send."""
    im = rgb_tensor(Image.open(io.BytesIO(image)))[None]  # (1, 3, H, W)
    masks = None if mask is None else (np.asarray(Image.open(io.BytesIO(mask)))[..., 3] == 0)
    out = edit(model, im, [prompt], request_params(model, params),
               masks=None if masks is None else torch.from_numpy(masks)[None], strength=strength, decode=False)
    return pixels(decode_pngs(model, out.tokens, batch=1)[0])


def test_generate_with_image_and_mask_is_the_library_edit(server, model):
    body = {"prompt": "a red circle", "image": b64(source()), "mask": b64(mask_png()), "seed": 5}
    r = httpx.post(f"{server.url}/v1/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    got = pixels(base64.b64decode(r.json()["images"][0]["b64_json"]))
    assert np.array_equal(got, edited_alone(model, "a red circle", source(), mask_png(), seed=5))
    c = model.config.transformer
    repainted = int(token_mask(torch.from_numpy(np.asarray(Image.open(io.BytesIO(mask_png())))[..., 3] == 0),
                               c.height, c.width).sum())
    assert r.json()["params"]["steps"] == min(6, repainted)


def test_a_variation_by_strength_and_its_stream(server, model):
    body = {"prompt": "", "image": b64(source(1)), "strength": 0.5, "seed": 9, "stream": True, "preview_every": 1}
    with httpx.stream("POST", f"{server.url}/v1/generate", json=body, timeout=60) as r:
        assert r.status_code == 200
        events = [(e["event"], e["data"]) for e in sse_events(r.iter_lines())]
    assert [k for k, _ in events][0] == "queued" and events[-1][0] == "result"
    progress = [d for k, d in events if k == "progress"]
    assert progress and progress[0]["unmasked"] >= 0.5 - 1e-9  # half the tokens were never masked
    got = pixels(base64.b64decode(events[-1][1]["images"][0]["b64_json"]))
    assert np.array_equal(got, edited_alone(model, "", source(1), strength=0.5, seed=9))


def test_openai_client_edit_and_variation_work_unmodified(server, model):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    out = client.images.edit(image=("in.png", source(2), "image/png"), mask=("mask.png", mask_png(), "image/png"),
                             prompt="a blue square", n=2, size=f"{SIZE}x{SIZE}", response_format="b64_json",
                             extra_body={"seed": 4})
    assert len(out.data) == 2
    for i, d in enumerate(out.data):
        assert np.array_equal(pixels(base64.b64decode(d.b64_json)),
                              edited_alone(model, "a blue square", source(2), mask_png(), seed=4 + i))
    var = client.images.create_variation(image=("in.png", source(3), "image/png"), n=1, size=f"{SIZE}x{SIZE}",
                                         response_format="b64_json", extra_body={"seed": 8, "strength": "0.25"})
    assert np.array_equal(pixels(base64.b64decode(var.data[0].b64_json)),
                          edited_alone(model, "", source(3), strength=0.25, seed=8))
    with pytest.raises(openai.UnprocessableEntityError, match="size"):
        client.images.edit(image=("in.png", source(2), "image/png"), prompt="x", size="1024x1024")


def test_an_edit_without_mask_uses_the_images_own_transparency(server, model):
    rgba = np.concatenate([np.asarray(Image.open(io.BytesIO(source(4)))),
                           np.full((SIZE, SIZE, 1), 255, np.uint8)], axis=-1)
    rgba[SIZE // 2 :, :, 3] = 0  # the bottom half is to be repainted
    r = httpx.post(f"{server.url}/v1/images/edits", files={"image": ("a.png", png(rgba), "image/png")},
                   data={"prompt": "a green triangle", "seed": "3"}, timeout=60)
    assert r.status_code == 200, r.text
    got = pixels(base64.b64decode(r.json()["data"][0]["b64_json"]))
    assert np.array_equal(got, edited_alone(model, "a green triangle", png(rgba), png(rgba), seed=3))


def _post_edit(server, files: dict, data: dict | None = None) -> httpx.Response:
    files = {k: (f"{k}.png", v, "image/png") for k, v in files.items()}
    return httpx.post(f"{server.url}/v1/images/edits", files=files, data={"prompt": "x", **(data or {})}, timeout=30)


@pytest.mark.parametrize("case, param, words", [
    ("wrong image size", "image", "edits 16x16"),
    ("mask of another size", "mask", "not the image's size"),
    ("empty mask", "mask", "no pixel"),
    ("full mask", "mask", "plain generation"),
    ("mask without alpha", "mask", "alpha"),
    ("image not a png", "image", "not a PNG"),
    ("image damaged", "image", "damaged"),
    ("huge upload", "image", "too large"),
    ("posterior sampler", "sampler", "cannot edit"),
    ("strength with a mask", "strength", "variation"),
    ("mask without image", "mask", "without an image"),
    ("image without mask or strength", "mask", "required"),
    ("strength out of range", "strength", "(0, 1]"),
    ("image not base64", "image", "base64"),
    ("form seed out of range", "seed", "not allowed"),
    ("form n not a number", "n", "not an integer"),
])
def test_bad_edits_are_a_422_naming_the_field(server, case, param, words):
    opaque = png(np.full((SIZE, SIZE, 4), 255, np.uint8))
    clear = png(np.zeros((SIZE, SIZE, 4), np.uint8))
    jpeg = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE)).save(jpeg, format="JPEG")
    json_cases = {
        "posterior sampler": {"image": b64(source()), "mask": b64(mask_png()), "sampler": "posterior", "steps": 100},
        "strength with a mask": {"image": b64(source()), "mask": b64(mask_png()), "strength": 0.3},
        "mask without image": {"mask": b64(mask_png())},
        "image without mask or strength": {"image": b64(source())},
        "strength out of range": {"image": b64(source()), "strength": 1.5},
        "image not base64": {"image": "not base64!", "strength": 0.5},
    }
    form_cases = {
        "wrong image size": {"image": source(size=32), "mask": mask_png(size=32)},
        "mask of another size": {"image": source(), "mask": mask_png(size=32)},
        "empty mask": {"image": source(), "mask": opaque},
        "full mask": {"image": source(), "mask": clear},
        "mask without alpha": {"image": source(), "mask": source(7)},
        "image not a png": {"image": jpeg.getvalue(), "mask": mask_png()},
        "image damaged": {"image": source()[: len(source()) // 2], "mask": mask_png()},
        "huge upload": {"image": b"\x89PNG" + bytes(20000), "mask": mask_png()},
        "form seed out of range": {"image": source(), "mask": mask_png()},
        "form n not a number": {"image": source(), "mask": mask_png()},
    }
    fields = {"form seed out of range": {"seed": "-1"}, "form n not a number": {"n": "two"}}.get(case)
    if case in json_cases:
        r = httpx.post(f"{server.url}/v1/generate", json={"prompt": "x", **json_cases[case]}, timeout=30)
    else:
        r = _post_edit(server, form_cases[case], fields)
    assert r.status_code == 422, (case, r.text)
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], (case, error)
    ok = httpx.post(f"{server.url}/v1/generate", json={"prompt": "still serving", "steps": 2}, timeout=30)
    assert ok.status_code == 200


def test_a_form_that_sends_the_image_twice_or_as_text_is_refused(server):
    two = [("image", ("a.png", source(), "image/png")), ("image", ("b.png", source(), "image/png"))]
    r = httpx.post(f"{server.url}/v1/images/edits", files=two, data={"prompt": "x"}, timeout=30)
    assert r.status_code == 422 and r.json()["error"]["param"] == "image" and "2 times" in r.text
    r = httpx.post(f"{server.url}/v1/images/edits", data={"prompt": "x", "image": "text"},
                   files={"mask": ("m.png", mask_png(), "image/png")}, timeout=30)  # multipart, image as text
    assert r.status_code == 422 and "expected a file" in r.text
    r = httpx.post(f"{server.url}/v1/images/edits", json={"prompt": "x"}, timeout=30)
    assert r.status_code == 422 and "multipart" in r.text
    r = httpx.post(f"{server.url}/v1/images/variations", files={"image": ("a.png", source(), "image/png"),
                                                               "mask": ("m.png", mask_png(), "image/png")}, timeout=30)
    assert r.status_code == 422 and r.json()["error"]["param"] == "mask"


def test_edits_and_generations_served_together_each_equal_alone(server, model):
    """Mixed batches: edits, variations and generations sent at once step in the same forwards; each
    answer equals its request run alone."""
    jobs = [{"prompt": "a red circle", "image": b64(source(i)), "mask": b64(mask_png()), "seed": 20 + i} for i in range(3)]
    jobs += [{"prompt": "a blue square", "image": b64(source(5)), "strength": 0.3, "seed": 30}]
    jobs += [{"prompt": f"plain {i}", "seed": 40 + i} for i in range(3)]
    answers: dict[int, httpx.Response] = {}

    def send(i: int) -> None:
        answers[i] = httpx.post(f"{server.url}/v1/generate", json=jobs[i], timeout=120)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, body in enumerate(jobs):
        assert answers[i].status_code == 200, answers[i].text
        got = pixels(base64.b64decode(answers[i].json()["images"][0]["b64_json"]))
        if "image" in body:
            want = edited_alone(model, body["prompt"], base64.b64decode(body["image"]),
                                base64.b64decode(body["mask"]) if "mask" in body else None,
                                strength=body.get("strength"), seed=body["seed"])
        else:
            want = alone(model, body["prompt"], seed=body["seed"])
        assert np.array_equal(got, want), i
