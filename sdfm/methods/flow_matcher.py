"""``FlowMatcher``: the training targets of flow matching for a user's own loop, in TorchCFM's call
shape, over any sdfm coupling (the model, optimizer and loop stay the user's).

    fm = FlowMatcher(ExactOT())
    t, x_t, u_t = fm.sample_location_and_conditional_flow(x0, x1)
    loss = ((model(t, x_t) - u_t) ** 2).mean()

Library code: single device (the pairs live where x0 is).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sdfm.couplings.base import Coupling, Pairs
from sdfm.couplings.independent import IndependentCoupling
from sdfm.couplings.semidiscrete import SemidiscreteOT
from sdfm.methods.paths import LinearPath

__all__ = ["FlowMatcher", "FlowSample"]


@dataclass
class FlowSample:
    """One batch of flow-matching targets.

    Attributes:
        t: (B,) times in [0, 1).
        x_t: (B, *shape) points on the paths at t.
        u_t: (B, *shape) the velocity to regress onto there.
        labels: (B,) classes of the pairs' targets (condition the model on these), or None.
        pairs: the coupling's pairs (x0, x1, index).
    """

    t: Tensor
    x_t: Tensor
    u_t: Tensor
    labels: Tensor | None
    pairs: Pairs


class FlowMatcher:
    """Pairs from a coupling, a time per pair, and the point and velocity of the path there.

    Args:
        coupling: any sdfm coupling (``Independent()``, ``ExactOT()``, ``Sinkhorn()``,
            ``GlobalBatch(...)``) or a fitted ``SemidiscreteOT``, which draws x1 itself; default
            ``Independent()`` (I-CFM).
        path: 'linear' (x_t = (1 - t) x0 + t x1, u_t = x1 - x0), or a path object with
            ``sample(x0, x1, t) -> PathSample`` (``sdfm.methods.paths``).

    Example:
        >>> fm = sdfm.FlowMatcher(sdfm.ExactOT())
        >>> t, x_t, u_t = fm.sample_location_and_conditional_flow(torch.randn(256, 2), data[:256])
    """

    def __init__(self, coupling: Coupling | SemidiscreteOT | None = None, path="linear"):
        self.coupling = coupling if coupling is not None else IndependentCoupling()
        if path == "linear":
            path = LinearPath()
        if not hasattr(path, "sample"):
            raise ValueError(f"path must be 'linear' or an object with sample(x0, x1, t), got {path!r}")
        self.path = path

    def sample(
        self,
        x0: Tensor,
        x1: Tensor | None = None,
        t: Tensor | None = None,
        *,
        labels: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> FlowSample:
        """Targets of one batch.

        Args:
            x0: (B, *shape) source samples (noise).
            x1: (B, *shape) the data batch; None for a ``SemidiscreteOT`` coupling (it matches x0
                against the whole dataset).
            t: (B,) times; default uniform on [0, 1) from ``generator``.
            labels: (B,) classes of x1 (of the queries, for ``SemidiscreteOT``), or None.
            generator: the source of randomness (coupling and times); None: torch's global one.
        """
        if isinstance(self.coupling, SemidiscreteOT):
            pairs = self.coupling(x0, labels, generator=generator)
        else:
            pairs = self.coupling(x0, x1, labels, generator=generator)
        if t is None:
            t = torch.rand(x0.shape[0], generator=generator, device=getattr(generator, "device", None) or "cpu")
        t = t.to(x0.device)
        s = self.path.sample(pairs.x0, pairs.x1, t)
        return FlowSample(t=t, x_t=s.x_t, u_t=s.dx_t, labels=pairs.labels, pairs=pairs)

    def sample_location_and_conditional_flow(
        self,
        x0: Tensor,
        x1: Tensor | None = None,
        t: Tensor | None = None,
        *,
        labels: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(t, x_t, u_t) of ``sample``, TorchCFM's call shape (``sample`` also returns the labels)."""
        s = self.sample(x0, x1, t, labels=labels, generator=generator)
        return s.t, s.x_t, s.u_t
