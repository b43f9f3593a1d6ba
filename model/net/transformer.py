"""The VQ-Diffusion content transformer: log p(x0 | x_t, y) for every image token.

Weight-compatible with diffusers' ``Transformer2DModel`` in its vectorised-input form (ITHQ's
``transformer/``): module names mirror it so a state dict loads strictly. Two things differ, and
they are why this file exists:

* the timestep ``t`` is per sample, shape (B,): rows of one batch may be at different steps
  (diffusers' AdaLayerNorm takes one scalar per batch);
* the text's cross-attention keys/values can be computed once (``text_kv``) and passed to every
  step, because a request's text never changes while its image tokens do.

Block: AdaLayerNorm(t) -> self-attention -> AdaLayerNorm(t) -> cross-attention(text) ->
LayerNorm -> MLP (x * sigmoid(1.702 x)), each with a residual. Head: LayerNorm -> Linear to K.
The output is raw logits (B, N, K); the sampler combines cond/uncond logits before normalising.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vqdiff.model.config import TransformerConfig


class ImagePositionalEmbeddings(nn.Module):
    """Content embedding of K+1 ids (MASK = K) plus learned row and column embeddings."""

    def __init__(self, num_embed: int, height: int, width: int, dim: int):
        super().__init__()
        self.height, self.width = height, width
        self.emb = nn.Embedding(num_embed, dim)
        self.height_emb = nn.Embedding(height, dim)
        self.width_emb = nn.Embedding(width, dim)

    def forward(self, x_t: Tensor) -> Tensor:
        pos = self.height_emb.weight[:, None, :] + self.width_emb.weight[None, :, :]  # (H, W, D)
        return self.emb(x_t) + pos.reshape(1, self.height * self.width, -1)  # (B, N, D)


class AdaLayerNorm(nn.Module):
    """LayerNorm whose scale and shift come from the timestep, one per sample."""

    def __init__(self, dim: int, num_timesteps: int, eps: float):
        super().__init__()
        self.emb = nn.Embedding(num_timesteps, dim)
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        scale, shift = self.linear(F.silu(self.emb(t)))[:, None, :].chunk(2, dim=-1)  # 2 x (B, 1, D)
        return self.norm(x) * (1 + scale) + shift  # (B, N, D)


class Attention(nn.Module):
    """Multi-head attention; ``to_out`` is a list so the key is ``to_out.0`` as in diffusers."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, kv_dim: int, bias: bool, dropout: float):
        super().__init__()
        inner = num_heads * head_dim
        self.num_heads, self.head_dim, self.dropout = num_heads, head_dim, dropout
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_k = nn.Linear(kv_dim, inner, bias=bias)
        self.to_v = nn.Linear(kv_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])

    def heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, n, Dh)

    def kv(self, context: Tensor) -> Tensor:
        """Keys and values of a context: (B, L, kv_dim) -> (2, B, H, L, Dh)."""
        return torch.stack([self.heads(self.to_k(context)), self.heads(self.to_v(context))])

    def forward(self, x: Tensor, kv: Tensor) -> Tensor:
        q = self.heads(self.to_q(x))  # (B, H, N, Dh)
        p = self.dropout if self.training else 0.0
        o = F.scaled_dot_product_attention(q, kv[0], kv[1], dropout_p=p)  # (B, H, N, Dh)
        o = o.transpose(1, 2).flatten(2)  # (B, N, H*Dh)
        return F.dropout(self.to_out[0](o), p, self.training)


class ApproximateGELU(nn.Module):
    """Linear then x * sigmoid(1.702 x) (diffusers' ``geglu-approximate``)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)
        return x * torch.sigmoid(1.702 * x)


class FeedForward(nn.Module):
    def __init__(self, dim: int, inner: int, dropout: float):
        super().__init__()
        # net.1 is diffusers' parameter-free dropout, kept so that net.2's key matches.
        self.net = nn.ModuleList([ApproximateGELU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim)])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class Block(nn.Module):
    def __init__(self, c: TransformerConfig):
        super().__init__()
        self.norm1 = AdaLayerNorm(c.dim, c.num_timesteps, c.norm_eps)
        self.attn1 = Attention(c.dim, c.num_heads, c.head_dim, c.dim, c.attention_bias, c.dropout)
        self.norm2 = AdaLayerNorm(c.dim, c.num_timesteps, c.norm_eps)
        self.attn2 = Attention(c.dim, c.num_heads, c.head_dim, c.text_dim, c.attention_bias, c.dropout)
        self.norm3 = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.ff = FeedForward(c.dim, c.mlp_ratio * c.dim, c.dropout)

    def forward(self, h: Tensor, t: Tensor, text_kv: Tensor) -> Tensor:
        x = self.norm1(h, t)  # (B, N, D)
        h = h + self.attn1(x, self.attn1.kv(x))
        h = h + self.attn2(self.norm2(h, t), text_kv)
        return h + self.ff(self.norm3(h))  # (B, N, D)


class VQDiffusionTransformer(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        c = self.config = config
        self.latent_image_embedding = ImagePositionalEmbeddings(c.num_embed + 1, c.height, c.width, c.dim)
        self.transformer_blocks = nn.ModuleList([Block(c) for _ in range(c.num_layers)])
        self.norm_out = nn.LayerNorm(c.dim)
        self.out = nn.Linear(c.dim, c.num_embed)

    def text_kv(self, text: Tensor) -> Tensor:
        """Cross-attention keys/values of every layer, computed once per request.

        text: (B, L, text_dim) -> (layers, 2, B, H, L, Dh). Rows of different requests can be
        concatenated along dim 2 to form a batch.
        """
        c = self.config
        if text.dim() != 3 or text.shape[-1] != c.text_dim:
            raise ValueError(f"text must be (B, L, {c.text_dim}), got {tuple(text.shape)}")
        return torch.stack([blk.attn2.kv(text) for blk in self.transformer_blocks])

    def forward(
        self, x_t: Tensor, t: Tensor, text: Tensor | None = None, text_kv: Tensor | None = None
    ) -> Tensor:
        """Logits of p(x0 | x_t, t, text).

        x_t: (B, N) long in [0, K] (K = MASK); t: (B,) long in [0, T); text: (B, L, text_dim), or
        its precomputed ``text_kv``. Returns (B, N, K) logits (the mask class is never predicted).
        """
        c = self.config
        b = x_t.shape[0]
        if x_t.dim() != 2 or x_t.shape[1] != c.num_tokens:
            raise ValueError(f"x_t must be (B, {c.num_tokens}), got {tuple(x_t.shape)}")
        if t.shape != (b,):
            raise ValueError(f"t must be per sample, shape ({b},), got {tuple(t.shape)}")
        if (text is None) == (text_kv is None):
            raise ValueError("pass exactly one of text and text_kv")
        kv = self.text_kv(text) if text_kv is None else text_kv  # (layers, 2, B, H, L, Dh)
        if kv.shape[:3] != (c.num_layers, 2, b):
            raise ValueError(f"text_kv must start with ({c.num_layers}, 2, {b}), got {tuple(kv.shape)}")

        h = self.latent_image_embedding(x_t)  # (B, N, D)
        for i, blk in enumerate(self.transformer_blocks):
            h = blk(h, t, kv[i])
        return self.out(self.norm_out(h))  # (B, N, K)

    def log_probs(self, x_t: Tensor, t: Tensor, text: Tensor | None = None, text_kv: Tensor | None = None) -> Tensor:
        """log p(x0 | ...) in fp32, (B, N, K)."""
        return torch.log_softmax(self.forward(x_t, t, text, text_kv).float(), dim=-1)
