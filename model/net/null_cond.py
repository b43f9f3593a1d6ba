"""The learnable null condition of discrete classifier-free guidance (Eq. 7).

A full (text_len, text_dim) sequence that replaces the text embedding for the unconditional
branch. Not L2-normalised; trained jointly (the caption is replaced by it with probability 0.1)
or fine-tuned alone. Stored as ITHQ stores it: one parameter named ``embeddings``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class NullCondition(nn.Module):
    def __init__(self, length: int, dim: int):
        super().__init__()
        self.embeddings = nn.Parameter(torch.zeros(length, dim))  # (L, D)

    def forward(self, batch: int) -> Tensor:
        return self.embeddings.unsqueeze(0).expand(batch, -1, -1)  # (B, L, D)
