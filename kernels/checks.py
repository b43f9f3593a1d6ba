"""What every launcher checks before a kernel reads memory: shapes, dtypes, contiguity, device."""

from __future__ import annotations

import torch
from torch import Tensor

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_device(t: Tensor, name: str, device: torch.device, interpreted: bool) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (where the logits are)")
    if not interpreted and t.device.type != "cuda":
        raise ValueError(f"{name} is on {t.device}: the compiled kernels need CUDA tensors "
                         "(or TRITON_INTERPRET=1 set before the kernels are imported)")


def check_tensor(t: Tensor, name: str, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...],
                 device: torch.device, interpreted: bool) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must be {' or '.join(str(d) for d in dtypes)}, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (strides {t.stride()} for shape {tuple(t.shape)})")
    check_device(t, name, device, interpreted)


def check_logits(cond: Tensor, uncond: Tensor, interpreted: bool) -> tuple[int, int, int]:
    """(B, N, K) of the cond and uncond logits: the same shape, dtype and device, contiguous."""
    if not isinstance(cond, Tensor) or cond.dim() != 3:
        raise ValueError(f"cond must be (B, N, K) logits, got {getattr(cond, 'shape', type(cond).__name__)}")
    check_tensor(cond, "cond", tuple(cond.shape), LOGIT_DTYPES, cond.device, interpreted)
    check_tensor(uncond, "uncond", tuple(cond.shape), (cond.dtype,), cond.device, interpreted)
    return tuple(cond.shape)  # type: ignore[return-value]
