"""Token-space editing: repaint the tokens of a region (inpainting) or a share of all tokens
(variations), with the selection samplers.

The image is VQVAE-encoded to its grid x0 of N tokens. The tokens to repaint start as [MASK]; every
other token is frozen. The purity and random samplers only ever choose masked positions and draw
only there (model/sampling/step.py), so a frozen token keeps its value exactly. ``steps`` forwards
are spread over the M repainted tokens alone (at most one forward per token), and each forward's
timestep is the one whose mask probability is nearest the masked fraction (Sec. 3.2's argmin rule):
the first is the timestep of M / N, not T (``sampler.plan``).

- **The mask rule.** A pixel mask (H, W), True where the image is to be repainted, becomes a token
  mask: a token is repainted when ANY pixel of its f x f patch is marked. Every marked pixel is then
  inside a repainted patch. Pixels outside the marked region but in a partly marked patch are
  repainted too; the rest keep their tokens, though the decoder's receptive field shifts the pixels
  of frozen tokens next to repainted ones (docs/RESULTS.md measures how far).
- **Variations.** ``strength`` s in (0, 1], no mask: round(s * N) tokens (at least one) are
  repainted, the ones with the smallest uniforms of the image's seed in a stream of their own
  (``rng.uniform`` at step -1, which no sampling step uses), so the seed alone chooses them.
- **The posterior samplers refuse an edit.** The original reverse process starts at t = T-1 from an
  all-[MASK] grid, and each of its steps may replace any token (the uniform part of the transition),
  so a frozen region would have to be re-imposed after every step onto a grid whose statistics the
  model was never trained on at that t; the selection samplers need no such correction.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from vqdiff.model.sampling import rng
from vqdiff.model.sampling.params import POSTERIOR_SAMPLERS, GenerationParams

VARIATION_STEP = -1  # the rng step of a variation's token choice: no sampling step is negative


def token_mask(pixels: Tensor, height: int, width: int) -> Tensor:
    """(H, W) bool, True = repaint -> (height * width,) bool, row-major: a token is repainted when
    any pixel of its patch is (H and W multiples of the grid's)."""
    h, w = pixels.shape
    if h % height or w % width:
        raise ValueError(f"mask: {w}x{h} pixels do not tile a {width}x{height} token grid")
    patches = pixels.view(height, h // height, width, w // width)  # (height, f, width, f)
    return patches.any(dim=3).any(dim=1).flatten()  # (height * width,)


def variation_count(strength: float, num_tokens: int) -> int:
    """Tokens a variation of ``strength`` repaints: round(strength * N), at least 1."""
    if not isinstance(strength, (int, float)) or isinstance(strength, bool) or not 0.0 < strength <= 1.0:
        raise ValueError(f"strength: {strength!r} is not allowed; expected a number in (0, 1]")
    return max(1, min(num_tokens, round(strength * num_tokens)))


def variation_mask(seed: int, strength: float, num_tokens: int) -> Tensor:
    """(N,) bool: the ``variation_count`` positions with the smallest uniforms of ``seed``'s own
    stream (ties by position)."""
    u = rng.uniform(torch.tensor([seed]), torch.tensor([VARIATION_STEP]), rng.SELECT, num_tokens)[0]  # (N,)
    order = torch.sort(u, stable=True).indices
    chosen = torch.zeros(num_tokens, dtype=torch.bool)
    chosen[order[: variation_count(strength, num_tokens)]] = True
    return chosen


def check_mask(edit: Tensor) -> int:
    """The number M of tokens a token mask repaints; an empty or full mask is an error."""
    m, n = int(edit.sum()), edit.numel()
    if m == 0:
        raise ValueError("mask: marks no pixel to repaint (transparent pixels mark the region); nothing to edit")
    if m == n:
        raise ValueError("mask: covers every token of the image: that is plain generation; send no image or mask")
    return m


def edit_params(params: GenerationParams, repainted: int) -> GenerationParams:
    """An edit's parameters: a selection sampler (the posterior ones refuse, module docstring), and
    ``steps`` at most the M repainted tokens (one token per forward at least)."""
    if params.sampler in POSTERIOR_SAMPLERS:
        raise ValueError(f"sampler: {params.sampler!r} cannot edit an image (each of its steps may change any "
                         "token); use 'purity' or 'random'")
    return replace(params, steps=min(params.steps, repainted))


def masked_grid(tokens: Tensor, edit: Tensor, mask_id: int) -> Tensor:
    """(N,) tokens and (N,) bool -> the starting grid: MASK_ID where repainted, the token elsewhere."""
    return torch.where(edit.to(tokens.device), torch.full_like(tokens, mask_id), tokens)


def start_grids(model, images: Tensor, edits: list[Tensor]) -> list[Tensor]:
    """The starting grid of each row: (B, 3, H, W) images in [0, 1] and their (N,) token masks ->
    (N,) long grids (``masked_grid``)."""
    tokens = model.vqvae.tokenize(images.to(model.device, torch.float32))  # (B, N)
    return [masked_grid(t, e, model.config.transformer.mask_id) for t, e in zip(tokens, edits)]


@torch.no_grad()
def edit(model, images: Tensor, prompts: list[str], params: GenerationParams | list[GenerationParams] | None = None,
         masks: Tensor | None = None, strength: float | None = None, decode: bool = True):
    """Repaint ``images`` (B, 3, H, W) in [0, 1]: where ``masks`` (B, H, W) bool is True, or, without
    masks, a ``strength`` share of each image's tokens chosen by its seed. Returns ``sample``'s
    ``SampleResult``; tokens outside the repainted ones equal the image's own."""
    from vqdiff.model.sampling.sampler import default_params, sample, start

    c = model.config.transformer
    if images.ndim != 4 or len(images) != len(prompts):
        raise ValueError(f"images: expected (B, 3, H, W) with B = {len(prompts)} prompts; got {tuple(images.shape)}")
    if (masks is None) == (strength is None):
        raise ValueError("edit needs masks or a strength (a variation), not both")
    if params is None:
        params = default_params(model)
    if isinstance(params, GenerationParams):
        params = [params] * len(prompts)
    # the seeds first: a variation's tokens are chosen by the seed
    params = [p.resolve(num_tokens=c.num_tokens, num_timesteps=c.num_timesteps, has_null=model.null_cond is not None,
                        seed=rng.random_seed()) for p in params]
    if masks is not None:  # an empty or a full mask is refused
        edits = [token_mask(m, c.height, c.width) for m in masks.cpu()]
        repainted = [check_mask(e) for e in edits]
    else:  # strength 1 repaints every token: a generation that keeps nothing, allowed
        edits = [variation_mask(p.seed, strength, c.num_tokens) for p in params]
        repainted = [variation_count(strength, c.num_tokens)] * len(edits)
    params = [edit_params(p, m) for p, m in zip(params, repainted)]
    return sample(model, prompts, params, decode=decode, inits=start_grids(model, images, edits))


__all__ = ["token_mask", "variation_mask", "variation_count", "check_mask", "edit_params", "masked_grid", "start_grids",
           "edit"]
