"""Independent coupling (I-CFM): each source is paired with a uniformly random target."""

from __future__ import annotations

import torch
from torch import Tensor

from sdfm.couplings.base import MinibatchCoupling


class IndependentCoupling(MinibatchCoupling):
    """Pair x0 with a random permutation of the target batch, drawn from the caller's generator."""

    def __init__(self, *, per_class: bool = False) -> None:
        self.per_class = per_class

    def match(self, x0: Tensor, x1: Tensor, generator: torch.Generator) -> Tensor:
        """Return a (B,) int64 random permutation of range(B), B = len(x0) = len(x1)."""
        if x0.shape[0] != x1.shape[0]:
            raise ValueError(f"x0 has {x0.shape[0]} rows but x1 has {x1.shape[0]}")
        return torch.randperm(x1.shape[0], generator=generator, device=generator.device).to(x1.device)
