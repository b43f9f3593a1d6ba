"""Wire types of the HTTP API (pydantic). Translation to the engine's types lives here too, so the
handlers stay thin. Field names are the paper's and the engine's; unknown fields are an error."""

from __future__ import annotations

import base64
import binascii
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from vqdiff.model.io.edit_input import EditInput
from vqdiff.server.api import PARAM_NAMES, timings_dict
from vqdiff.server.errors import invalid
from vqdiff.server.request import Result

Number = StrictFloat | StrictInt


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr = Field(description="The text to draw.")
    model: Optional[StrictStr] = Field(None, description="A served model's id (GET /v1/models); omitted: the "
                                                         "server's default model.")
    negative_prompt: Optional[StrictStr] = Field(None, description="Text to steer away from (the uncond branch).")
    n: StrictInt = Field(1, description="Images; image i uses seed + i.")
    seed: Optional[StrictInt] = Field(None, description="0..2^63-1; omitted: the server picks one and returns it.")
    steps: Optional[StrictInt] = Field(None, description="Transformer forward passes.")
    guidance_scale: Optional[Number] = Field(None, description="1 = no guidance (released convention).")
    truncation_rate: Optional[Number] = Field(None, description="Keep the most likely classes up to this mass.")
    sampler: Optional[Literal["purity", "random", "posterior", "skip"]] = None
    purity_weight: Optional[Number] = Field(None, description="r of Eq. 11 (purity sampler).")
    unmask_schedule: Optional[Literal["linear", "cosine"]] = Field(
        None, description="Tokens unmasked per forward (purity / random): linear, the same each forward; cosine, "
                          "few first.")
    uncond: Optional[Literal["auto", "null", "empty", "negative"]] = None
    image: Optional[StrictStr] = Field(None, description="An edit: the image to start from, a base64 PNG at the model's "
                                                         "size; with mask (inpainting) or strength (a variation).")
    mask: Optional[StrictStr] = Field(None, description="A base64 PNG of the image's size: its transparent pixels "
                                                        "(alpha 0) mark the region to repaint.")
    strength: Optional[Number] = Field(None, description="A variation (image, no mask): the share of tokens "
                                                         "repainted, in (0, 1], chosen by each image's seed.")
    stream: StrictBool = Field(False, description="Server-Sent Events: progress with previews, then the result.")
    preview_every: Optional[StrictInt] = Field(None, description="Steps between streamed previews (stream only).")

    def given(self) -> dict:
        """The generation parameters this request set (``vqdiff.model.sampling.sampler.request_params`` fills the rest)."""
        return {k: getattr(self, k) for k in PARAM_NAMES if getattr(self, k) is not None}

    def edit_input(self, max_upload_bytes: int) -> EditInput | None:
        """``image`` / ``mask`` / ``strength`` (base64 PNGs) as an edit; the engine checks the rest."""
        if self.image is None:
            for name in ("mask", "strength"):
                if getattr(self, name) is not None:
                    raise invalid(f"{name}: given without an image to edit", name)
            return None
        image, mask = (_unbase64(getattr(self, n), n, max_upload_bytes) for n in ("image", "mask"))
        return EditInput(image=image, mask=mask, strength=self.strength)


class Image(BaseModel):
    b64_json: str


class TimingsOut(BaseModel):
    queue_ms: float
    denoise_ms: float
    decode_ms: float
    total_ms: float


class GenerateResponse(BaseModel):
    id: str
    seed: int
    images: list[Image]
    timings: TimingsOut
    params: dict

    @classmethod
    def of(cls, req_id: str, result: Result) -> GenerateResponse:
        return cls(
            id=req_id, seed=result.seeds[0], images=[Image(b64_json=b64(p)) for p in result.images],
            timings=TimingsOut(**timings_dict(result.timings)),
            params=result.params.to_dict())


class OpenAIImageRequest(BaseModel):
    """The OpenAI Images API request (``POST /v1/images/generations``); fields this model cannot
    honour are accepted only at the values it can."""

    model_config = ConfigDict(extra="ignore")

    prompt: StrictStr
    model: Optional[StrictStr] = None
    n: Optional[StrictInt] = 1
    size: Optional[StrictStr] = None  # "WxH"; must be the model's image size
    response_format: Optional[StrictStr] = "b64_json"
    quality: Optional[StrictStr] = None
    style: Optional[StrictStr] = None
    user: Optional[StrictStr] = None


class OpenAIImage(BaseModel):
    b64_json: str
    revised_prompt: Optional[str] = None


class OpenAIImagesResponse(BaseModel):
    created: int
    data: list[OpenAIImage]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def _unbase64(text: str | None, name: str, max_bytes: int) -> bytes | None:
    if text is None:
        return None
    if len(text) > 4 * (max_bytes // 3 + 1):  # before decoding it
        raise invalid(f"{name}: {len(text)} base64 characters is too large; at most {max_bytes} bytes of PNG", name)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(f"{name}: not valid base64", name) from None


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
