"""The multipart forms of ``POST /v1/images/edits`` and ``/v1/images/variations`` (the OpenAI Images
API's shape): the body read with a size limit, then its fields as text and its files as bytes.

The limit is applied while the body arrives: a client sending gigabytes is answered 422 after the
first ``limit`` bytes, never spooled to disk. A field may come once only, and a file field (``image``,
``mask``) must be a file.
"""

from __future__ import annotations

from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect, Request

from vqdiff.server.errors import ApiError, invalid

FILES = ("image", "mask")
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


async def read_form(http: Request, max_upload_bytes: int) -> tuple[dict[str, str], dict[str, bytes]]:
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
        form = await Request(http.scope, _limited(http.receive, limit)).form(max_files=4, max_fields=64)
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


__all__ = ["read_form", "integer", "number", "ApiError"]
