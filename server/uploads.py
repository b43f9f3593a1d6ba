"""The multipart forms of ``POST /v1/images/edits`` and ``/v1/images/variations`` (the OpenAI Images
API's shape): the body read with a size limit, its fields as text and its files as bytes, their
translation into the engine's request, and their OpenAPI schemas.

The limit is applied while the body arrives: a client sending gigabytes is answered 422 after the
first ``limit`` bytes, never spooled to disk. A field may come once only, and a file field (``image``,
``mask``) must be a file.
"""

from __future__ import annotations

from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect, Request as HttpRequest

from vqdiff.model.io.edit_input import EditInput
from vqdiff.model.sampling.sampler import request_params
from vqdiff.server.errors import ApiError, invalid
from vqdiff.server.request import Request

FILES = ("image", "mask")
VARIATION_STRENGTH = 0.5  # /v1/images/variations without a strength: half the tokens repainted
FORM_SLACK = 64 * 1024  # the text fields and the multipart framing beside the files


class _TooLarge(Exception):
    pass


def _limited(receive, limit: int):
    """An ASGI ``receive`` that raises once more than ``limit`` body bytes have come."""
    seen = 0

    async def wrapped():
        nonlocal seen
        message = await receive()
        if message.get("type") == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _TooLarge()
        return message

    return wrapped


async def read_form(http: HttpRequest, max_upload_bytes: int) -> tuple[dict[str, str], dict[str, bytes]]:
    """(text fields, files) of a multipart body of at most two files of ``max_upload_bytes`` each.
    Raises the 422 ``ApiError`` naming the field for: not multipart, a body over the limit, a field
    sent twice, a text field where a file belongs (or a file where text does)."""
    content_type = http.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise invalid(f"the body must be multipart/form-data (an image file and the form's fields); "
                      f"got {content_type or 'no Content-Type'!r}", "image")
    limit = len(FILES) * max_upload_bytes + FORM_SLACK
    declared = http.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    try:
        form = await HttpRequest(http.scope, _limited(http.receive, limit)).form(max_files=4, max_fields=64)
    except _TooLarge:
        raise _too_large(None, limit) from None
    except ClientDisconnect:
        raise
    except Exception as e:  # noqa: BLE001 - the multipart parser's errors: a malformed body
        raise invalid(f"the multipart body could not be parsed: {e}", "image") from None
    texts: dict[str, str] = {}
    files: dict[str, bytes] = {}
    try:
        for key in set(form.keys()):
            values = form.getlist(key)
            name = key[:-2] if key.endswith("[]") else key  # the OpenAI client names a list of images image[]
            if len(values) > 1 or name in texts or name in files:
                raise invalid(f"{name}: given {len(values)} times; one {'file' if name in FILES else 'value'} "
                              "is allowed", name)
            value = values[0]
            if name in FILES:
                if not isinstance(value, UploadFile):
                    raise invalid(f"{name}: expected a file (a PNG), got a text field", name)
                files[name] = await value.read()
            elif isinstance(value, UploadFile):
                raise invalid(f"{name}: expected a text field, got a file", name)
            else:
                texts[name] = value
    finally:
        await form.close()
    return texts, files


def _too_large(size: int | None, limit: int) -> ApiError:
    told = f"{size} bytes" if size is not None else "more than that"
    return invalid(f"image: the upload is too large: at most {limit} bytes in all (an image and a mask of "
                   f"max_upload_bytes each, and the form's fields); got {told}", "image")


def _converted(texts: dict[str, str], name: str, default, convert, what: str):
    """A form field converted (absent or empty: ``default``); a text ``convert`` refuses is a 422."""
    value = texts.get(name)
    if value is None or value == "":
        return default
    try:
        return convert(value)
    except ValueError:
        raise invalid(f"{name}: {value!r} is not {what}", name) from None


def integer(texts: dict[str, str], name: str, default: int | None = None) -> int | None:
    return _converted(texts, name, default, int, "an integer")


def number(texts: dict[str, str], name: str, default: float | None = None) -> float | None:
    return _converted(texts, name, default, float, "a number")


def edit_request(texts: dict[str, str], files: dict[str, bytes], served, variation: bool) -> Request:
    """The engine's request of an edit (or a variation) form for the ``served`` model. Beside the
    OpenAI fields, ``seed`` (both) and ``strength`` / ``prompt`` (variations: default 0.5 and empty)
    are read; other fields are ignored, as on /v1/images/generations."""
    if "image" not in files:
        raise invalid("image: required: the PNG file to edit", "image")
    prompt = texts.get("prompt", "" if variation else None)
    if prompt is None:
        raise invalid("prompt: required: what to draw in the masked region", "prompt")
    if variation:
        if "mask" in files:
            raise invalid("mask: a variation takes no mask; use /v1/images/edits to repaint a region", "mask")
        edit = EditInput(image=files["image"], strength=number(texts, "strength", VARIATION_STRENGTH))
    else:
        if "strength" in texts:
            raise invalid("strength: is for /v1/images/variations; an edit repaints its mask's region", "strength")
        edit = EditInput(image=files["image"], mask=files.get("mask", files["image"]))  # none: the image's alpha
    seed = integer(texts, "seed")
    try:
        params = served.defaults if seed is None else request_params(served.model, {"seed": seed})
    except ValueError as e:
        raise invalid(str(e)) from None
    return Request(prompt=prompt, params=params, n=integer(texts, "n", 1), model=served.name, edit=edit)


def _form_schema(required: list[str], **extra) -> dict:
    """The OpenAPI request body of a multipart Images API form (what /docs shows)."""
    png = {"type": "string", "format": "binary"}
    props = {"image": {**png, "description": "PNG at the model's image size"},
             "n": {"type": "integer", "default": 1}, "size": {"type": "string", "description": "WxH: the model's"},
             "response_format": {"type": "string", "enum": ["b64_json"]}, "model": {"type": "string"},
             "seed": {"type": "integer", "description": "0..2^63-1; image i uses seed + i"}, **extra}
    schema = {"type": "object", "required": required, "properties": props}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


EDIT_FORM = _form_schema(
    ["image", "prompt"], prompt={"type": "string", "description": "what to draw in the region"},
    mask={"type": "string", "format": "binary", "description": "PNG of the image's size; transparent pixels (alpha 0) "
                                                               "are repainted. Omitted: the image's own transparency"})
VARIATION_FORM = _form_schema(
    ["image"], prompt={"type": "string", "default": ""},
    strength={"type": "number", "default": VARIATION_STRENGTH, "description": "share of tokens repainted, in (0, 1]"})

__all__ = ["read_form", "edit_request", "integer", "number", "EDIT_FORM", "VARIATION_FORM", "ApiError"]
