"""Exponential moving average of a model's weights, used for sampling and evaluation."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class EMA:
    """A shadow copy of a model whose weights follow shadow <- decay * shadow + (1 - decay) * model.

    The shadow is a deep copy in eval mode with gradients off; sample from ``.module``. Pass the
    unwrapped model (not a DDP or compiled wrapper) so that parameters line up one to one.

    Args:
        model: the model being trained.
        decay: in [0, 1]; 0 makes the shadow a plain copy of the latest weights.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int | None) -> float:
        """Decay used at optimizer step ``step`` (1-based): min(decay, (1 + step) / (10 + step)).

        The warm-up keeps the average from remembering the untrained initial weights: with a fixed
        0.999 after a few thousand steps, e^-3 of the weight still sits on the first steps, which
        visibly shrinks samples of short runs. ``step=None`` uses ``decay`` as is.
        """
        return self.decay if step is None else min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        """Move the shadow weights towards ``model``'s and copy its buffers (e.g. norm statistics).

        Args:
            model: the trained model (unwrapped).
            step: the optimizer step just taken, for the decay warm-up (``decay_at``).
        """
        decay = self.decay_at(step)
        shadow = list(self.module.parameters())
        current = list(model.parameters())
        if len(shadow) != len(current):
            raise ValueError(f"EMA tracks {len(shadow)} parameters but the model has {len(current)}")
        # lerp_(end, w) = self + w * (end - self); with w = 1 - decay this is the EMA step, and
        # w = 1 returns `end` exactly, so decay 0 copies the weights bit for bit.
        torch._foreach_lerp_(shadow, [p.detach() for p in current], 1.0 - decay)
        for shadow_buffer, buffer in zip(self.module.buffers(), model.buffers(), strict=True):
            shadow_buffer.copy_(buffer)

    def state_dict(self) -> dict[str, Any]:
        """The shadow module's state dict."""
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the shadow module's weights from ``state_dict()``."""
        self.module.load_state_dict(state)
