"""An edit's inputs as they come from a client (``EditInput``: PNG bytes and a strength), checked
and turned into what the sampler starts from (model/sampling/edit.py has the rules: which tokens a
mask repaints, how a variation chooses its tokens, why the posterior samplers refuse).

``check`` runs where a request is validated (the server's engine, or an API node that has no model:
it needs only the model's geometry); ``start_grids`` runs where the model is, at admission, reading
the PNGs again. Every refusal is a ValueError naming its field: ``image``, ``mask`` or ``strength``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vqdiff.model.io.images import check_size, load_png, open_png, rgb_tensor, transparent_pixels
from vqdiff.model.sampling.edit import check_mask, masked_grid, token_mask, variation_count, variation_mask
from vqdiff.model.sampling.params import image_seed


@dataclass(frozen=True)
class EditInput:
    """What an edit starts from. With ``mask`` its fully transparent pixels (alpha 0) are repainted
    (an inpainting); with ``strength`` that share of the tokens, chosen by each image's seed (a
    variation)."""

    image: bytes  # PNG at the model's image size
    mask: bytes | None = None  # PNG of the same size
    strength: float | None = None  # in (0, 1]


@dataclass(frozen=True)
class Read:
    image: Tensor  # (3, H, W) in [0, 1]
    edit: Tensor | None  # (N,) bool, the tokens a mask repaints; None: a variation (per seed)
    repainted: int  # M: tokens repainted per image


def read(e: EditInput, config, max_bytes: int) -> Read:
    """Decode and check an edit against a model's geometry (``config.image_size``,
    ``config.transformer.{height, width, num_tokens}``) and the upload limit."""
    if not isinstance(e.image, (bytes, bytearray)):
        raise ValueError("image: expected PNG bytes")
    if e.mask is not None and e.strength is not None:
        raise ValueError("strength: is for a variation, without a mask; with a mask its transparent region is "
                         "repainted")
    if e.mask is None and e.strength is None:
        raise ValueError("mask: required with an image (its transparent pixels mark the region to repaint); "
                         "or give a strength in (0, 1] for a variation")
    for name, data in (("image", e.image), ("mask", e.mask)):
        if data is not None and len(data) > max_bytes:
            raise ValueError(f"{name}: {len(data)} bytes is too large; at most {max_bytes}")
    size, c = int(config.image_size), config.transformer
    im = open_png(e.image, "image")
    check_size(im, size, "image")  # from the header: nothing is decompressed for a wrong size
    image = rgb_tensor(load_png(im, "image"))  # (3, H, W)
    if e.strength is not None:
        return Read(image, None, variation_count(e.strength, c.num_tokens))
    mask_im = im if e.mask is e.image else open_png(e.mask, "mask")
    if (mask_im.width, mask_im.height) != (im.width, im.height):
        raise ValueError(f"mask: {mask_im.width}x{mask_im.height} is not the image's size, {im.width}x{im.height}")
    load_png(mask_im, "mask")
    edit = token_mask(transparent_pixels(mask_im, "mask"), c.height, c.width)  # (N,)
    return Read(image, edit, check_mask(edit))


def check(e: EditInput, config, max_bytes: int) -> int:
    """``read``'s checks; returns M, the tokens each image repaints."""
    return read(e, config, max_bytes).repainted


@torch.no_grad()
def start_grids(model, e: EditInput, seed: int, n: int, max_bytes: int) -> list[Tensor]:
    """The n starting grids (N,) of an edit request whose image i has seed ``image_seed(seed, i)``:
    the image's tokens (one VQVAE encode), MASK_ID where repainted."""
    r = read(e, model.config, max_bytes)
    c = model.config.transformer
    tokens = model.vqvae.tokenize(r.image[None].to(model.device))[0]  # (N,)
    masks = [r.edit] * n if r.edit is not None else [
        variation_mask(image_seed(seed, i), e.strength, c.num_tokens) for i in range(n)]
    return [masked_grid(tokens, m, c.mask_id) for m in masks]
