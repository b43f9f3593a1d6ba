"""``VQDiffusion``: every part of a model folder as one module, and the calls the sampler needs.

It holds weights and the schedule, never per-request state: a request's prompt, parameters,
randomness and progress travel with the request (see the sampler).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vqdiff.model.config import ModelConfig
from vqdiff.model.diffusion import Schedule
from vqdiff.model.net.null_cond import NullCondition
from vqdiff.model.net.text_encoder import TextEncoder
from vqdiff.model.net.transformer import VQDiffusionTransformer
from vqdiff.model.net.vqvae import VQVAE


class VQDiffusion(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        transformer: VQDiffusionTransformer,
        vqvae: VQVAE,
        text_encoder: TextEncoder,
        null_cond: NullCondition | None,
    ):
        super().__init__()
        if (null_cond is None) == config.learnable_null:
            raise ValueError(f"config.learnable_null is {config.learnable_null} but null_cond is {null_cond!r}")
        self.config = config
        self.transformer = transformer
        self.vqvae = vqvae
        self.text_encoder = text_encoder
        self.null_cond = null_cond
        self._schedule = Schedule(config.diffusion)
        # GenerationParams fields this model is best sampled with (the folder's vqdiff.json)
        self.generation_defaults: dict = {}

    @property
    def device(self) -> torch.device:
        return self.transformer.out.weight.device

    @property
    def schedule(self) -> Schedule:
        """The diffusion schedule, on the model's device (it is a table, not a parameter)."""
        if self._schedule.device != self.device:
            self._schedule = self._schedule.to(self.device)
        return self._schedule

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> Tensor:
        """(B, L, D) normalised CLIP features, fp32."""
        return self.text_encoder.encode(prompts).to(self.device)

    def null_text(self, batch: int) -> Tensor:
        """The unconditional text for B rows: the learned null if the model has one, else the empty prompt."""
        if self.null_cond is not None:
            return self.null_cond(batch)  # (B, L, D)
        return self.encode_text([""] * batch)  # (B, L, D)

    @torch.no_grad()
    def decode(self, tokens: Tensor) -> Tensor:
        """(B, N) token ids in [0, K) -> (B, 3, H, W) images in [0, 1]."""
        c = self.config.transformer
        return self.vqvae.decode_tokens(tokens.view(-1, c.height, c.width))
