"""Start-up warm-up: one 2-step image through the sampler, the sampling-step kernels and the VQVAE
decoder, and a compiled forward at every row bucket (model/sampling/buckets.py), before a process
serves. On CUDA this compiles the Triton kernels (and loads cuBLAS and the
attention kernels) for the model's shapes, so that a missing compiler, a Triton fault or a device
error stops the server at start-up, with its traceback, instead of failing the first requests; on a
CPU it costs a few forwards. Other samplers' kernels compile at their first use."""

from __future__ import annotations

import logging
import time

import torch

from vqdiff.model.io.images import decode_pngs
from vqdiff.model.sampling.sampler import request_params, sample

log = logging.getLogger("vqdiff.warmup")


class WarmupFailed(RuntimeError):
    pass


def warm_up(model, forward=None) -> float:
    """Seconds the warm-up took. ``forward``: the engine's ``BucketedForward``; a compiled one is run
    (and compiled) at every row bucket the engine will use. Raises ``WarmupFailed`` naming what failed."""
    t0 = time.monotonic()
    buckets = []
    try:
        if forward is not None:
            dtype = next(model.transformer.parameters()).dtype
            buckets = forward.warm(model.config.text_encoder.max_length, model.device, dtype)
        params = request_params(model, {"sampler": "purity", "steps": min(2, model.config.transformer.num_tokens),
                                        "seed": 0})
        with torch.no_grad():
            tokens = sample(model, ["warm-up"], params, decode=False).tokens  # (1, N)
            decode_pngs(model, tokens, batch=1)
        if str(model.device).startswith("cuda"):
            torch.cuda.synchronize(model.device)
    except Exception as e:
        raise WarmupFailed(f"the start-up warm-up (a 2-step image on {model.device}) failed: "
                           f"{type(e).__name__}: {e}; set --warmup false to start without it") from e
    seconds = time.monotonic() - t0
    log.info("warm-up on %s: a 2-step image%s in %.2f s", model.device,
             f" and the forward at row buckets {buckets} (compile {forward.mode})" if buckets else "", seconds)
    return seconds
