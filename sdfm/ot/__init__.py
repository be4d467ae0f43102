"""Optimal-transport solvers on batches of points: single-device library code.

- ``sinkhorn``: the log-domain Sinkhorn loop (``SinkhornOptions``, ``SinkhornResult``), written once
  against ``collectives.Collectives`` so that the same loop solves one process's batch and a batch
  whose rows are split over ranks (``sdfm.distributed.sinkhorn``).
- ``reductions``: its logsumexp reduction per backend (blocked torch, in-memory scores, KeOps, Triton).
- ``gumbel``: exact row samples of the entropic plan with counter-based Gumbel noise.
- ``exact``: the exact OT permutation between equal-size batches (linear assignment).
- ``collectives``: the interface of the reductions across ranks, and its no-op for one process.
"""

from sdfm.ot.exact import exact_ot_assignment
from sdfm.ot.gumbel import sample_rows
from sdfm.ot.sinkhorn import SinkhornOptions, SinkhornResult, cost_std, marginal_errors, sinkhorn

__all__ = [
    "SinkhornOptions",
    "SinkhornResult",
    "cost_std",
    "exact_ot_assignment",
    "marginal_errors",
    "sample_rows",
    "sinkhorn",
]
