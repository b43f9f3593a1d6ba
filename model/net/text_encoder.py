"""Text conditioning: prompt -> (B, L, D) per-token CLIP features (L = 77), L2-normalised per token.

CLIP is transformers' ``CLIPTextModel``; this is only the wiring that the released model uses
(docs/DESIGN.md, section 7: Released models): lowercase, 77 tokens padded, overlong prompts cut
to 77 KEEPING the end-of-text token (diffusers drops it), all token states after the final
LayerNorm, no projection.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from vqdiff.model.config import TextEncoderConfig


def clip_config(c: TextEncoderConfig, tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        max_position_embeddings=c.max_length,
        hidden_act=c.hidden_act,
        projection_dim=c.hidden_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def text_encoder_config(clip: CLIPTextConfig) -> TextEncoderConfig:
    return TextEncoderConfig(
        vocab_size=clip.vocab_size,
        hidden_size=clip.hidden_size,
        intermediate_size=clip.intermediate_size,
        num_hidden_layers=clip.num_hidden_layers,
        num_attention_heads=clip.num_attention_heads,
        max_length=clip.max_position_embeddings,
        hidden_act=clip.hidden_act,
    )


class TextEncoder(nn.Module):
    def __init__(self, tokenizer: CLIPTokenizer, clip: CLIPTextModel):
        super().__init__()
        if len(tokenizer) > clip.config.vocab_size:
            raise ValueError(
                f"tokenizer has {len(tokenizer)} tokens but the text encoder's vocab_size is {clip.config.vocab_size}"
            )
        self.tokenizer = tokenizer
        self.clip = clip
        self.max_length = clip.config.max_position_embeddings  # 77 for CLIP; smaller models may use fewer

    @property
    def dim(self) -> int:
        return self.clip.config.hidden_size

    def tokenize(self, prompts: list[str]) -> Tensor:
        """prompts -> (B, L) token ids (L = 77 for CLIP); an overlong prompt keeps its end-of-text token."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a list of strings")
        enc = self.tokenizer(
            [p.lower() for p in prompts], padding="max_length", max_length=self.max_length, truncation=True,
            return_tensors="pt",
        )
        return enc["input_ids"]  # (B, L)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.clip(input_ids=ids.to(self.clip.device)).last_hidden_state  # (B, L, D)
        return h / h.norm(dim=-1, keepdim=True)  # (B, L, D)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Tensor:
        return self(self.tokenize(prompts))  # (B, L, D)
