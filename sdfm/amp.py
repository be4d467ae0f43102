"""Mixed-precision training: ``train.precision`` resolved for a device, its autocast context and its
gradient scaler.

- ``fp32``: no autocast.
- ``bf16``: the forward pass and the loss under ``torch.autocast(dtype=torch.bfloat16)``; bf16 has
  fp32's exponent range, so no loss scaling is needed.
- ``fp16``: the same in float16, with a ``torch.amp.GradScaler`` (its state is checkpointed).
- ``auto``: bf16 on CUDA, fp32 on the CPU.

In every mode the parameters (the master weights), the optimizer state and the EMA stay fp32: autocast
only changes the dtype that individual operations compute in.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Literal

import torch

from sdfm.errors import UserError

Precision = Literal["fp32", "bf16", "fp16"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

__all__ = ["Precision", "autocast", "describe", "grad_scaler", "resolve_precision"]


def resolve_precision(name: str, device: torch.device) -> Precision:
    """``train.precision`` for this device ('auto': bf16 on CUDA, fp32 elsewhere).

    Raises:
        UserError: the device cannot compute in the asked precision (one line naming the fix).
    """
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name not in ("fp32", "bf16", "fp16"):
        raise UserError(f"train.precision = {name!r} is not a known choice; use auto, fp32, bf16 or fp16")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(
            f"train.precision = 'bf16' but {torch.cuda.get_device_name(device)} has no bf16 support "
            "(it needs compute capability 8.0 or newer); use train.precision = 'fp16' or 'fp32'"
        )
    return name  # type: ignore[return-value]


def autocast(precision: Precision, device: torch.device) -> AbstractContextManager:
    """The context to run the forward pass and the loss in (a no-op for fp32)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def grad_scaler(precision: Precision, device: torch.device) -> torch.amp.GradScaler:
    """A gradient scaler, enabled for fp16 only (disabled, every call passes straight through)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def describe(precision: Precision) -> str:
    """One line for the start-of-training log."""
    if precision == "fp32":
        return "precision fp32"
    scaler = " with a gradient scaler" if precision == "fp16" else ""
    return f"precision {precision} (torch.autocast{scaler}; master weights, optimizer state and EMA in fp32)"
