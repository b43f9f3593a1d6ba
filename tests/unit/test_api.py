"""server/api.py, the layer the HTTP and gRPC front ends share, and ``to_uint8`` of model/io/images.py."""

from __future__ import annotations

import io
from dataclasses import fields

import numpy as np
import pytest
import torch
from PIL import Image

from vqdiff.model.sampling.params import SEED_MAX, GenerationParams, image_seed
from vqdiff.server import grpc_app
from vqdiff.server.api import (
    PARAM_NAMES, authorized, preview_interval, require_key, timings_dict,
)
from vqdiff.server.errors import ApiError
from vqdiff.model.io.images import png_bytes, to_uint8
from vqdiff.server.proto_gen.vqdiff.v1 import generate_pb2 as pb
from vqdiff.server.request import Timings
from vqdiff.server.schemas import GenerateRequest, TimingsOut
from vqdiff.server.settings import Settings

KEYS = ("alpha", "beta-key")


@pytest.mark.parametrize("header, ok", [
    ("Bearer alpha", True), ("bearer beta-key", True), ("BEARER alpha", True),
    ("Bearer alph", False), ("Bearer alpha ", False), ("alpha", False), ("Basic alpha", False),
    ("Bearer ", False), ("", False), (None, False), ("Bearer ålpha", False),
])
def test_authorized_takes_only_a_configured_bearer_key(header, ok):
    assert authorized(header, KEYS) is ok


def test_no_keys_configured_lets_every_request_through():
    assert authorized(None, ()) and authorized("Bearer anything", ())
    require_key(None, ())  # does not raise


def test_require_key_raises_the_401_unauthenticated_error():
    with pytest.raises(ApiError) as e:
        require_key("Bearer wrong", KEYS)
    assert e.value.status == 401 and e.value.code == "invalid_api_key"
    assert e.value.message == "a valid API key is required: send 'Authorization: Bearer <key>'"
    assert e.value.headers == {"WWW-Authenticate": "Bearer"}


def test_preview_interval_request_then_settings_then_an_eighth_of_the_steps():
    assert preview_interval(3, Settings(preview_every=5), 100) == 3
    assert preview_interval(0, Settings(preview_every=5), 100) == 0  # asked for none
    assert preview_interval(None, Settings(preview_every=5), 100) == 5
    assert preview_interval(None, Settings(), 100) == 12
    assert preview_interval(None, Settings(), 7) == 1


def test_image_seed_counts_up_and_wraps_past_the_largest_seed():
    assert [image_seed(7, i) for i in range(3)] == [7, 8, 9]
    assert image_seed(SEED_MAX, 0) == SEED_MAX
    assert image_seed(SEED_MAX, 1) == 0
    assert image_seed(SEED_MAX - 1, 3) == 1


def test_param_names_are_the_generation_params_fields_and_both_wire_formats_carry_them():
    assert PARAM_NAMES == tuple(f.name for f in fields(GenerationParams))
    assert {"seed", "steps", "sampler", "negative_prompt"} <= set(PARAM_NAMES)
    assert set(PARAM_NAMES) <= set(GenerateRequest.model_fields)
    assert set(PARAM_NAMES) <= set(pb.GenerateRequest.DESCRIPTOR.fields_by_name)
    assert set(grpc_app.SCALAR_PARAMS) | set(grpc_app.ENUM_PARAMS) == set(PARAM_NAMES)


def test_http_given_holds_exactly_the_fields_the_request_set():
    body = GenerateRequest(prompt="a", seed=3, negative_prompt="red", stream=True, preview_every=2)
    assert body.given() == {"seed": 3, "negative_prompt": "red"}
    assert GenerateRequest(prompt="a").given() == {}


def test_timings_dict_fills_both_wire_types():
    t = Timings(queue_ms=1.5, denoise_ms=20.0, decode_ms=3.25, total_ms=24.75)
    assert timings_dict(t) == {"queue_ms": 1.5, "denoise_ms": 20.0, "decode_ms": 3.25, "total_ms": 24.75}
    assert TimingsOut(**timings_dict(t)).model_dump() == timings_dict(t)
    wire = pb.Timings(**timings_dict(t))
    assert (wire.queue_ms, wire.denoise_ms, wire.decode_ms, wire.total_ms) == (1.5, 20.0, 3.25, 24.75)


def test_to_uint8_rounds_clamps_and_moves_channels_last():
    x = torch.tensor([-0.5, 0.0, 0.5 / 255, 1.5 / 255, 0.5, 1.0, 1.7])  # (7,)
    images = x.view(1, 1, 1, 7).expand(2, 3, 1, 7).clone()  # (B=2, 3, H=1, W=7)
    images[1, 2] = 1.0
    out = to_uint8(images)
    assert out.dtype == torch.uint8 and out.shape == (2, 1, 7, 3)
    assert out[0, 0, :, 0].tolist() == [0, 0, 0, 2, 128, 255, 255]  # round half to even: 0.5 -> 0, 1.5 -> 2
    assert out[1, 0, :, 2].tolist() == [255] * 7 and out[1, 0, :, 1].tolist() == out[0, 0, :, 1].tolist()
    assert torch.equal(to_uint8(images[1]), out[1])  # one (3, H, W) image -> (H, W, 3)


def test_png_bytes_holds_the_to_uint8_pixels():
    image = torch.rand(3, 8, 5, generator=torch.Generator().manual_seed(0))
    decoded = np.asarray(Image.open(io.BytesIO(png_bytes(image))).convert("RGB"))  # (8, 5, 3)
    np.testing.assert_array_equal(decoded, to_uint8(image).numpy())
