"""Exact minibatch OT (OT-CFM): pair each source with its partner in the optimal permutation."""

from __future__ import annotations

import torch
from torch import Tensor

from sdfm.couplings.base import MinibatchCoupling
from sdfm.ot.exact import SOLVERS, Solver, exact_ot_assignment
from sdfm.ot.sinkhorn import COSTS, Cost


class ExactOTCoupling(MinibatchCoupling):
    """OT-CFM: the optimal permutation of the minibatch (``sdfm.ot.exact.exact_ot_assignment``), solved on
    the CPU: a coupling that can be computed ahead of the step in a background thread (``prefetchable``)."""

    prefetchable = True

    def __init__(
        self, *, cost: Cost = "sqeuclidean", solver: Solver = "auto", per_class: bool = False
    ) -> None:
        if cost not in COSTS:
            raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        self.cost, self.solver = cost, solver
        self.per_class = per_class

    def match(self, x0: Tensor, x1: Tensor, generator: torch.Generator) -> Tensor:
        """Return the (B,) optimal permutation of x1 (B, D) for x0 (B, D); deterministic."""
        del generator
        return exact_ot_assignment(x0, x1, self.cost, self.solver).to(x1.device)
