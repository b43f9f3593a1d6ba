"""Tokens to PNG bytes: one VQVAE decode for a whole group of grids, then one PNG per image; ``to_uint8``
is the one conversion of [0, 1] images to 8-bit pixels (the CLI saves its PNGs with it too)."""

from __future__ import annotations

import io

import torch
from PIL import Image
from torch import Tensor


def to_uint8(images: Tensor) -> Tensor:
    """(B, 3, H, W) or (3, H, W) in [0, 1] -> (B, H, W, 3) or (H, W, 3) uint8 on the CPU: x * 255,
    rounded half to even, clamped to [0, 255]."""
    return (images.movedim(-3, -1) * 255).round().clamp(0, 255).to("cpu", torch.uint8)


def png_bytes(image: Tensor) -> bytes:
    """(3, H, W) in [0, 1] -> PNG."""
    arr = to_uint8(image).numpy()  # (H, W, 3)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@torch.no_grad()
def decode_pngs(model, tokens: Tensor, batch: int = 1) -> list[bytes]:
    """(M, N) token ids in [0, K) -> M PNGs, decoded ``batch`` grids per VQVAE call.

    Every call has exactly ``batch`` rows (the last is padded with copies of its final grid): a
    convolution's kernel, and so its last bits, may depend on the batch size, and an image's bytes
    must not depend on how many others finished in the same step. With ``batch=1`` (the default)
    they depend on nothing else at all."""
    if batch < 1:
        raise ValueError(f"batch: {batch} is not allowed; expected an integer >= 1")
    pngs = []
    for chunk in tokens.split(batch):  # (<= batch, N)
        pad = batch - len(chunk)
        full = torch.cat([chunk, chunk[-1:].expand(pad, -1)]) if pad else chunk  # (batch, N)
        images = model.decode(full)[: len(chunk)]  # (len(chunk), 3, H, W)
        if not torch.isfinite(images).all():
            raise FloatingPointError("the VQVAE decoded non-finite pixels")
        pngs += [png_bytes(im) for im in images]
    return pngs


def preview_tokens(tokens: Tensor, log_p: Tensor, mask_id: int) -> Tensor:
    """A 'predicted' preview: masked positions show the current argmax of p(x0).
    tokens: (B, N); log_p: (B, N, K) -> (B, N) in [0, K)."""
    return torch.where(tokens == mask_id, log_p.argmax(dim=-1), tokens)


MAX_PIXELS = 4096 * 4096  # an upload declaring more is refused before its pixels are decompressed


def open_png(data: bytes, field: str) -> Image.Image:
    """PNG bytes -> a PIL image whose header is read and whose pixels are not yet decompressed
    (``load_png``): check its size first. Another format, or more than ``MAX_PIXELS``, raises
    ValueError naming ``field``."""
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise ValueError(f"{field}: empty; expected a PNG file")
    try:
        im = Image.open(io.BytesIO(data), formats=["PNG"])
    except Exception:  # noqa: BLE001 - PIL raises several types for a file it cannot identify
        raise ValueError(f"{field}: not a PNG file") from None
    if im.width * im.height > MAX_PIXELS:
        raise ValueError(f"{field}: {im.width}x{im.height} pixels is too large")
    return im


def load_png(im: Image.Image, field: str) -> Image.Image:
    """Decompress an ``open_png`` image's pixels; a truncated or corrupt file raises ValueError."""
    try:
        im.load()
    except Exception as e:  # noqa: BLE001 - truncated or corrupt data
        raise ValueError(f"{field}: the PNG data is damaged ({e})") from None
    return im


def check_size(im: Image.Image, size: int, field: str) -> None:
    """The model edits ``size`` x ``size`` images: any other size is refused (not resized: the frozen
    tokens are meant to be the given image's own)."""
    if (im.width, im.height) != (size, size):
        raise ValueError(f"{field}: {im.width}x{im.height} is not allowed; this model edits {size}x{size} images "
                         "(resize it first)")


def rgb_tensor(im: Image.Image) -> Tensor:
    """A PIL image -> (3, H, W) float32 in [0, 1] (alpha dropped; palette and grey expanded)."""
    arr = torch.frombuffer(bytearray(im.convert("RGB").tobytes()), dtype=torch.uint8)
    return arr.view(im.height, im.width, 3).permute(2, 0, 1).float() / 255  # (3, H, W)


def has_transparency(im: Image.Image) -> bool:
    """Whether the image carries an alpha channel (or a transparent palette entry / colour)."""
    return "A" in im.getbands() or "transparency" in im.info


def transparent_pixels(im: Image.Image, field: str) -> Tensor:
    """(H, W) bool: True where the image is fully transparent (alpha 0): the region to repaint, as the
    OpenAI Images API defines an edit's mask. A PNG without transparency raises ValueError."""
    if not has_transparency(im):
        raise ValueError(f"{field}: has no alpha channel; transparent pixels (alpha 0) mark the region to edit, "
                         "so send an RGBA PNG")
    alpha = torch.frombuffer(bytearray(im.convert("RGBA").getchannel("A").tobytes()), dtype=torch.uint8)
    return alpha.view(im.height, im.width) == 0  # (H, W)
