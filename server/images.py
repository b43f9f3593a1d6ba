"""Tokens to PNG bytes: one VQVAE decode for a whole group of grids, then one PNG per image."""

from __future__ import annotations

import io

import torch
from PIL import Image
from torch import Tensor


def png_bytes(image: Tensor) -> bytes:
    """(3, H, W) in [0, 1] -> PNG."""
    arr = (image.permute(1, 2, 0) * 255).round().clamp(0, 255).to("cpu", torch.uint8).numpy()  # (H, W, 3)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@torch.no_grad()
def decode_pngs(model, tokens: Tensor) -> list[bytes]:
    """(M, N) token ids in [0, K) -> M PNGs."""
    images = model.decode(tokens)  # (M, 3, H, W)
    if not torch.isfinite(images).all():
        raise FloatingPointError("the VQVAE decoded non-finite pixels")
    return [png_bytes(im) for im in images]


def preview_tokens(tokens: Tensor, log_p: Tensor, mask_id: int) -> Tensor:
    """A 'predicted' preview: masked positions show the current argmax of p(x0).
    tokens: (B, N); log_p: (B, N, K) -> (B, N) in [0, K)."""
    return torch.where(tokens == mask_id, log_p.argmax(dim=-1), tokens)
