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
