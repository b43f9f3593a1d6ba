"""FLOPs of the transformer forward, counted from its config (a multiply-add is 2 FLOPs), for the
model-FLOPs utilisation (MFU) the serving benchmarks print.

Per row (one image's cond or uncond branch) and forward, per layer, with N image tokens, L text
tokens and width D: self-attention projections 8ND^2 and scores/values 4N^2D; cross-attention's
query and output projections 4ND^2 and scores/values 4NLD (its text keys/values are computed once per
request and cached: not counted); the MLP (x4) 16ND^2. Then the output head 2NDK. Norms, the
timestep embedding and the sampling step are left out (under 1% at ITHQ's shapes). ITHQ: 2.29 TFLOP
per row and forward, so 458 TFLOP per image at 100 forwards with guidance (2 rows).
"""

from __future__ import annotations


def forward_flops(c, text_len: int) -> float:
    """FLOPs of one forward of one row. ``c``: a ``TransformerConfig``."""
    n, d, L = c.num_tokens, c.dim, text_len
    per_layer = 8 * n * d * d + 4 * n * n * d + 4 * n * d * d + 4 * n * L * d + 2 * c.mlp_ratio * 2 * n * d * d
    return c.num_layers * per_layer + 2 * n * d * c.num_embed


def image_flops(c, text_len: int, forwards: int, rows: int = 2) -> float:
    """FLOPs of one image: ``forwards`` forwards of ``rows`` rows (2: cond + uncond)."""
    return forward_flops(c, text_len) * forwards * rows
