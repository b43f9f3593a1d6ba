"""Model configs: frozen dataclasses with named presets.

Every model folder carries these (as diffusers-style ``config.json`` files, see
``model/io/folder.py``); nothing in the model reads a config from anywhere else.
The ``ithq`` preset has the exact dimensions of Microsoft's released ITHQ model
(docs/DESIGN.md, section 7: Released models); ``tiny`` is for tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class TransformerConfig:
    """The VQ-Diffusion content transformer (diffusers' ``Transformer2DModel``, vectorised input)."""

    num_embed: int  # K: codebook size. Token ids are 0..K-1; MASK_ID = K
    height: int  # token grid rows
    width: int  # token grid columns
    num_layers: int
    num_heads: int
    head_dim: int
    text_dim: int  # width of the text embedding the cross-attention reads
    num_timesteps: int = 100  # rows of the AdaLayerNorm timestep embedding
    mlp_ratio: int = 4
    attention_bias: bool = True
    norm_eps: float = 1e-5
    dropout: float = 0.0

    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def num_tokens(self) -> int:
        return self.height * self.width

    @property
    def mask_id(self) -> int:
        return self.num_embed


@dataclass(frozen=True)
class VQVAEConfig:
    """The image tokeniser (diffusers' ``VQModel`` with group norm)."""

    block_out_channels: tuple[int, ...]
    attention: tuple[bool, ...]  # per encoder level (highest resolution first): self-attention after each resnet
    layers_per_block: int
    latent_channels: int
    num_vq_embeddings: int  # codebook size K
    vq_embed_dim: int
    in_channels: int = 3
    out_channels: int = 3
    norm_num_groups: int = 32
    sample_size: int = 256  # informational (diffusers' field); the image side is ModelConfig.image_size
    mid_block_add_attention: bool = True
    commitment_beta: float = 0.25

    def __post_init__(self) -> None:
        if len(self.attention) != len(self.block_out_channels):
            raise ValueError(
                f"VQVAEConfig.attention has {len(self.attention)} entries, "
                f"block_out_channels has {len(self.block_out_channels)}: they must match"
            )
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"VQVAEConfig: channels {c} not divisible by norm_num_groups {self.norm_num_groups}")

    @property
    def downsample(self) -> int:
        """Pixels per token side (8 for ITHQ)."""
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass(frozen=True)
class TextEncoderConfig:
    """CLIP text transformer dimensions (transformers' ``CLIPTextConfig`` fields)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_length: int = 77
    hidden_act: str = "quick_gelu"


@dataclass(frozen=True)
class DiffusionConfig:
    """The mask-and-replace schedule (diffusers' ``VQDiffusionScheduler`` fields)."""

    num_classes: int  # K, without the mask class
    num_timesteps: int = 100
    alpha_cum_start: float = 0.99999
    alpha_cum_end: float = 0.000009
    gamma_cum_start: float = 0.000009
    gamma_cum_end: float = 0.99999
    auxiliary_loss_weight: float = 5e-4


@dataclass(frozen=True)
class ModelConfig:
    """A whole text-to-image model: what a model folder describes."""

    transformer: TransformerConfig
    vqvae: VQVAEConfig
    text_encoder: TextEncoderConfig
    diffusion: DiffusionConfig
    learnable_null: bool = True  # a learned (text_len, text_dim) null condition is part of the model
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        t, v, e, d = self.transformer, self.vqvae, self.text_encoder, self.diffusion
        checks = [
            ("transformer.num_embed", t.num_embed, "vqvae.num_vq_embeddings", v.num_vq_embeddings),
            ("transformer.num_embed", t.num_embed, "diffusion.num_classes", d.num_classes),
            ("transformer.text_dim", t.text_dim, "text_encoder.hidden_size", e.hidden_size),
            ("transformer.num_timesteps", t.num_timesteps, "diffusion.num_timesteps", d.num_timesteps),
        ]
        for a, av, b, bv in checks:
            if av != bv:
                raise ValueError(f"ModelConfig {self.name!r}: {a} = {av} but {b} = {bv}; they must agree")

    @property
    def image_size(self) -> int:
        """Image side in pixels: token grid side x VQVAE downsampling."""
        return self.transformer.height * self.vqvae.downsample


def ithq() -> ModelConfig:
    """Microsoft's ITHQ model (docs/DESIGN.md, sections 7 and 8: Released models; the diffusers
    folder layout)."""
    return ModelConfig(
        name="ithq",
        transformer=TransformerConfig(
            num_embed=4096, height=32, width=32, num_layers=36, num_heads=16, head_dim=88, text_dim=512
        ),
        vqvae=VQVAEConfig(
            block_out_channels=(64, 128, 256, 512),
            attention=(False, False, False, True),
            layers_per_block=2,
            latent_channels=256,
            num_vq_embeddings=4096,
            vq_embed_dim=128,
            sample_size=256,
        ),
        text_encoder=TextEncoderConfig(),
        diffusion=DiffusionConfig(num_classes=4096),
    )


def tiny() -> ModelConfig:
    """A few-thousand-parameter model shaped like ITHQ, for tests (8x8 tokens of 16x16 images)."""
    k = 37  # deliberately not a power of two
    return ModelConfig(
        name="tiny",
        transformer=TransformerConfig(
            num_embed=k, height=8, width=8, num_layers=2, num_heads=2, head_dim=8, text_dim=32, num_timesteps=100
        ),
        vqvae=VQVAEConfig(
            block_out_channels=(16, 32),
            attention=(False, True),
            layers_per_block=1,
            latent_channels=16,
            num_vq_embeddings=k,
            vq_embed_dim=8,
            norm_num_groups=8,
            sample_size=16,
        ),
        text_encoder=TextEncoderConfig(
            vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
        ),
        diffusion=DiffusionConfig(num_classes=k),
    )


def shapes() -> ModelConfig:
    """The embedded default model's shape: 32x32 images of the procedural shapes dataset
    (model/shapes/scenes.py), 8x8 tokens. Sized to train on 2 CPU cores and to ship in under 30 MB
    (fp16 on disk): transformer ~6 M parameters, text encoder ~1.4 M, VQVAE ~2.5 M."""
    k = 512
    return ModelConfig(
        name="shapes",
        transformer=TransformerConfig(
            num_embed=k, height=8, width=8, num_layers=8, num_heads=3, head_dim=64, text_dim=192, num_timesteps=100
        ),
        vqvae=VQVAEConfig(
            block_out_channels=(64, 128, 128),
            attention=(False, False, True),
            layers_per_block=1,
            latent_channels=64,
            num_vq_embeddings=k,
            vq_embed_dim=32,
            sample_size=32,
        ),
        text_encoder=TextEncoderConfig(
            vocab_size=512, hidden_size=192, intermediate_size=768, num_hidden_layers=3, num_attention_heads=3,
            max_length=32,  # captions are at most ~20 tokens; 32 text positions instead of CLIP's 77
        ),
        diffusion=DiffusionConfig(num_classes=k),
    )


PRESETS = {"ithq": ithq, "tiny": tiny, "shapes": shapes}


def from_name(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]()


__all__ = [
    "TransformerConfig",
    "VQVAEConfig",
    "TextEncoderConfig",
    "DiffusionConfig",
    "ModelConfig",
    "PRESETS",
    "from_name",
    "replace",
]
