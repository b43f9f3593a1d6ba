"""The image tokeniser: a VQ-VAE whose module tree and state_dict keys are those of diffusers' ``VQModel``.

Written from the math, not copied: a ``VQModel`` state dict (group norm) loads here with
``load_state_dict(strict=True)``. Pixels are (B, 3, H, W) in [0, 1] at the boundary; the network
itself sees 2x-1 and produces values that are clamped to [-1, 1] and mapped back.

Encoder: conv_in -> levels (resnets [+ self-attention], stride-2 downsample except the last)
-> mid (resnet, attention, resnet) -> GroupNorm, SiLU, conv_out -> quant_conv (1x1 to the codebook dim).
Decoder mirrors it with layers_per_block + 1 resnets per level and nearest x2 upsampling.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vqdiff.model.config import VQVAEConfig

EPS = 1e-6  # GroupNorm eps everywhere, as in the released checkpoints


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=EPS)


class ResnetBlock(nn.Module):
    """norm-SiLU-conv twice, plus a 1x1 shortcut when the width changes."""

    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = group_norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = group_norm(c_out, groups)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = self.conv2(F.silu(self.norm2(h)))  # (B, C_out, H, W)
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nn.Module):
    """Single-head spatial self-attention (head dim = channels) with a residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = group_norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # key "to_out.0", as in diffusers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = (proj(t).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, HW, C)
        a = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (B, HW, C)
        a = self.to_out[0](a).transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)
        return x + a


class Downsample(nn.Module):
    """Pad right/bottom by one, then a stride-2 3x3 conv: (H, W) -> (H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Nearest x2, then a 3x3 conv: (H, W) -> (2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class Level(nn.Module):
    """One resolution level: diffusers' (Attn)DownEncoderBlock2D or (Attn)UpDecoderBlock2D.

    ``resample`` is "down", "up" or None; its module list is named as diffusers names it.
    """

    def __init__(self, c_in: int, c_out: int, n: int, groups: int, attention: bool, resample: str | None):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(c_in if i == 0 else c_out, c_out, groups) for i in range(n))
        self.attentions = nn.ModuleList(Attention(c_out, groups) for _ in range(n)) if attention else None
        self.downsamplers = nn.ModuleList([Downsample(c_out)]) if resample == "down" else None
        self.upsamplers = nn.ModuleList([Upsample(c_out)]) if resample == "up" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(x)
            if self.attentions is not None:
                x = self.attentions[i](x)
        for resample in (self.downsamplers, self.upsamplers):
            if resample is not None:
                x = resample[0](x)
        return x


class MidBlock(nn.Module):
    """resnet, attention, resnet at the lowest resolution (diffusers' UNetMidBlock2D)."""

    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups), ResnetBlock(channels, channels, groups)])
        # Identity has no parameters, so a VQModel built with mid_block_add_attention=False still matches.
        self.attentions = nn.ModuleList([Attention(channels, groups) if attention else nn.Identity()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        ch, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            Level(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, cfg.attention[i], "down" if i < n - 1 else None)
            for i in range(n)
        )
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = group_norm(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)  # (B, ch[0], H, W)
        for block in self.down_blocks:
            x = block(x)  # ends at (B, ch[-1], H/f, W/f)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, latent_channels, H/f, W/f)


class Decoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        ch, g, n = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups, len(cfg.block_out_channels)
        attn = tuple(reversed(cfg.attention))
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            Level(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, attn[i], "up" if i < n - 1 else None)
            for i in range(n)
        )
        self.conv_norm_out = group_norm(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))  # (B, ch[-1], h, w)
        for block in self.up_blocks:
            x = block(x)  # ends at (B, ch[0], h*f, w*f)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, out_channels, H, W), roughly in [-1, 1]


class Codebook(nn.Module):
    """Holds the K x D code vectors under the key ``quantize.embedding.weight``."""

    def __init__(self, num_codes: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(num_codes, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / num_codes, 1.0 / num_codes)


class VQVAEOutput(NamedTuple):
    recon: torch.Tensor  # (B, 3, H, W) in [0, 1]
    tokens: torch.Tensor  # (B, h*w) long
    loss: torch.Tensor  # scalar: the VQ terms
    z_e: torch.Tensor  # (B, D, h, w): the encoder's latents, before quantisation


class VQVAE(nn.Module):
    def __init__(self, config: VQVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(config.latent_channels, config.vq_embed_dim, 1)
        self.quantize = Codebook(config.num_vq_embeddings, config.vq_embed_dim)
        self.post_quant_conv = nn.Conv2d(config.vq_embed_dim, config.latent_channels, 1)
        self.decoder = Decoder(config)

    @property
    def codebook(self) -> torch.Tensor:
        return self.quantize.embedding.weight  # (K, D)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> z_e (B, D, H/f, W/f), before quantisation."""
        c, f = self.config.in_channels, self.config.downsample
        if images.ndim != 4 or images.shape[1] != c or images.shape[2] % f or images.shape[3] % f:
            raise ValueError(
                f"encode expects images of shape (B, {c}, H, W) with H and W multiples of {f}; got {tuple(images.shape)}"
            )
        return self.quant_conv(self.encoder(images * 2 - 1))  # (B, D, h, w)

    def quantize_latents(self, z_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Nearest code per position. Returns z_q (B, D, h, w), tokens (B, h, w) long, loss (scalar).

        z_q carries the straight-through gradient to z_e. loss = beta * ||sg(q) - z_e||^2 (commitment,
        trains the encoder) + ||q - sg(z_e)||^2 (codebook): the VQ-VAE paper's convention. diffusers'
        default ("legacy") VectorQuantizer puts beta on the other term.
        """
        d = self.config.vq_embed_dim
        if z_e.ndim != 4 or z_e.shape[1] != d:
            raise ValueError(f"quantize_latents expects z_e of shape (B, {d}, h, w); got {tuple(z_e.shape)}")
        b, _, h, w = z_e.shape
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, d).float()  # (BHW, D)
        e = self.codebook.float()  # (K, D)
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.T + e.pow(2).sum(1)  # (BHW, K) squared L2
        tokens = dist.argmin(1).view(b, h, w)  # (B, h, w)
        q = self.quantize.embedding(tokens).permute(0, 3, 1, 2).to(z_e.dtype)  # (B, D, h, w)
        beta = self.config.commitment_beta
        loss = beta * F.mse_loss(z_e, q.detach()) + F.mse_loss(q, z_e.detach())
        z_q = z_e + (q - z_e).detach()  # (B, D, h, w) straight-through
        return z_q, tokens, loss

    def tokenize(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> tokens (B, h*w) long, row-major."""
        _, tokens, _ = self.quantize_latents(self.encode(images))  # (B, h, w)
        return tokens.flatten(1)  # (B, h*w)

    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, N) with N a square, or (B, h, w), ids in [0, K) -> images (B, 3, H, W) in [0, 1]."""
        k = self.config.num_vq_embeddings
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise ValueError(f"decode_tokens expects integer token ids; got dtype {tokens.dtype}")
        if tokens.ndim == 2:
            side = math.isqrt(tokens.shape[1])
            if side * side != tokens.shape[1]:
                raise ValueError(f"decode_tokens got (B, N) tokens with N = {tokens.shape[1]}, not a square grid")
            tokens = tokens.view(tokens.shape[0], side, side)  # (B, h, w)
        elif tokens.ndim != 3:
            raise ValueError(f"decode_tokens expects tokens of shape (B, N) or (B, h, w); got {tuple(tokens.shape)}")
        bad = (tokens < 0) | (tokens >= k)
        if bad.any():  # one host sync per decode, not in the denoising loop
            raise ValueError(f"token id {int(tokens[bad][0])} is outside [0, {k}) (codebook size K = {k})")
        q = self.quantize.embedding(tokens.long()).permute(0, 3, 1, 2)  # (B, D, h, w)
        return self.decode_latents(q)

    def decode_latents(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantised latents (B, D, h, w) -> images (B, 3, H, W) in [0, 1]."""
        x = self.decoder(self.post_quant_conv(z_q))  # (B, 3, H, W)
        return (x.clamp(-1, 1) + 1) / 2

    def forward(self, images: torch.Tensor) -> VQVAEOutput:
        """Reconstruction (B, 3, H, W) in [0, 1], tokens (B, h*w), vq_loss (scalar: the VQ terms of
        ``quantize_latents``, the codebook trained by gradient) and the encoder's latents z_e (B, D, h, w).
        The EMA codebook and code restarts of training are in model/train/vqvae.py (``training_pass``).
        """
        z_e = self.encode(images)  # (B, D, h, w)
        z_q, tokens, loss = self.quantize_latents(z_e)
        return VQVAEOutput(self.decode_latents(z_q), tokens.flatten(1), loss, z_e)


__all__ = ["VQVAE", "VQVAEOutput"]
