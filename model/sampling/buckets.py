"""The transformer forward over row buckets: a batch of R rows runs at the smallest bucket size
>= R (powers of two up to ``max_rows``), padded with inert rows, so that a compiled forward
(``torch.compile``; its ``reduce-overhead`` mode captures CUDA graphs) sees at most
log2(max_rows) + 1 shapes instead of one per batch size.

A padding row is the all-[MASK] grid at t = 0 with zero text keys/values. The transformer computes
every row on its own (attention runs within a row, norms per token), so padding never changes a
real row's logits, except in the last bits where a matrix kernel is picked by the batch size; and
the padding rows' logits are cut off before anything reads them (tests/unit/test_buckets.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from vqdiff.model.sampling.params import COMPILE_MODES


def bucket_sizes(max_rows: int) -> tuple[int, ...]:
    """2, 4, 8, ... below ``max_rows``, then ``max_rows`` itself."""
    if max_rows < 1:
        raise ValueError(f"max_rows: {max_rows} is not allowed; expected an integer >= 1")
    sizes, r = [], 2
    while r < max_rows:
        sizes.append(r)
        r *= 2
    return (*sizes, max_rows)


class BucketedForward:
    """``transformer(x_t, t, text_kv=kv)`` with the batch padded to its bucket (``pad``) and the
    forward compiled in ``mode`` (``COMPILE_MODES``; "off": eager). A compiled forward always pads:
    that is what bounds its shapes."""

    def __init__(self, transformer, max_rows: int, mode: str = "off", pad: bool | None = None):
        if mode not in COMPILE_MODES:
            raise ValueError(f"compile: {mode!r} is not allowed; expected one of {', '.join(COMPILE_MODES)}")
        self.transformer, self.mode = transformer, mode
        self.sizes = bucket_sizes(max_rows)
        self.pad = mode != "off" if pad is None else pad or mode != "off"
        self.fn = transformer
        if mode != "off":
            import torch._dynamo

            # one graph per bucket: room for all of them before dynamo gives up and runs eager
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, len(self.sizes) + 2)
            self.fn = torch.compile(transformer, mode=None if mode == "default" else mode, dynamic=False)

    def rows_for(self, rows: int) -> int:
        """The bucket a batch of ``rows`` rows runs at (``rows`` itself when not padding)."""
        if not self.pad:
            return rows
        for size in self.sizes:
            if size >= rows:
                return size
        raise ValueError(f"{rows} rows exceed the largest bucket ({self.sizes[-1]}): raise max_rows")

    def pad_kv(self, text_kv: Tensor) -> Tensor:
        """(layers, 2, R, H, L, Dh) -> (layers, 2, bucket(R), H, L, Dh), zeros below the real rows.
        The engine pads its cached text k/v once per batch, not at every step."""
        rows = text_kv.shape[2]
        extra = self.rows_for(rows) - rows
        if extra == 0:
            return text_kv
        shape = list(text_kv.shape)
        shape[2] = extra
        return torch.cat([text_kv, text_kv.new_zeros(shape)], dim=2)

    def __call__(self, x_t: Tensor, t: Tensor, text_kv: Tensor) -> Tensor:
        """x_t: (R, N), t: (R,), text_kv: (layers, 2, R or bucket(R), H, L, Dh) -> logits (R, N, K)."""
        rows = x_t.shape[0]
        size = self.rows_for(rows)
        if size != rows:
            mask = self.transformer.config.mask_id
            x_t = torch.cat([x_t, x_t.new_full((size - rows, x_t.shape[1]), mask)])  # (size, N)
            t = torch.cat([t, t.new_zeros(size - rows)])  # (size,)
        if text_kv.shape[2] != size:
            text_kv = self.pad_kv(text_kv)
        return self.fn(x_t, t, text_kv=text_kv)[:rows]  # (rows, N, K): padding never leaves here

    def warm(self, text_len: int, device, dtype) -> list[int]:
        """Run (and so compile) the forward once at every bucket size, with text of ``text_len``
        positions (the text encoder's ``max_length``: shapes are part of a compiled graph); the
        sizes run."""
        c = self.transformer.config
        with torch.no_grad():
            for size in self.sizes if self.pad else ():
                kv = self.transformer.text_kv(torch.zeros(size, text_len, c.text_dim, device=device, dtype=dtype))
                self(torch.full((size, c.num_tokens), c.mask_id, device=device),
                     torch.zeros(size, dtype=torch.long, device=device), kv)
        return list(self.sizes) if self.pad else []
