"""The entropic OT coupling of a minibatch: Sinkhorn potentials, then one row sample per source."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from sdfm.couplings.base import MinibatchCoupling
from sdfm.ot.gumbel import draw_seed, sample_rows
from sdfm.ot.sinkhorn import SinkhornOptions, SinkhornResult, sinkhorn

Solve = Callable[..., SinkhornResult]
"""``solve(x, y, options, g_init=...) -> SinkhornResult``: ``sinkhorn``, or a sharded solve."""


class SinkhornCoupling(MinibatchCoupling):
    """Entropic OT coupling of a minibatch (``sdfm.ot.sinkhorn``), sampled row by row (``sdfm.ot.gumbel``).

    Each call warm-starts from the previous call's column potential g (when ``warm_start`` and the
    sizes match); g is this coupling's state, so a resumed run continues bit-identically.

    Args:
        options: the solver settings.
        warm_start: start each solve from the previous one's g (off by default, as ``coupling.warm_start``).
        per_class: keep pairs within a class.
    """

    def __init__(
        self,
        options: SinkhornOptions = SinkhornOptions(),
        *,
        warm_start: bool = False,
        per_class: bool = False,
    ) -> None:
        if (problem := options.problem()) is not None:
            raise ValueError(problem)
        self.options = options
        self.warm_start = warm_start
        self.per_class = per_class
        self._n: int | None = None  # rows of the problem the warm-start g was solved with
        self._g: Tensor | None = None
        self._last: SinkhornResult | None = None

    def match(self, x0: Tensor, x1: Tensor, generator: torch.Generator) -> Tensor:
        """Return (B,) int64 partners in x1 (B, D) for the rows of x0 (B, D)."""
        return self.solve_rows(x0, x1, draw_seed(generator), n=x0.shape[0]).to(x1.device)

    def solve_rows(
        self, x: Tensor, y: Tensor, seed: int, *, n: int, row_offset: int = 0, solve: Solve = sinkhorn
    ) -> Tensor:
        """Solve a problem of n rows against the columns y (m, d), warm-started, and draw the partners
        of the rows x (n_r, d) it holds (global ids row_offset ...; all n rows for one process).

        ``solve`` is ``sinkhorn`` for one process, or the sharded solve of the ranks that hold the
        other rows (``sdfm.distributed.sinkhorn``); the state {g, n} is the same either way, so a run
        resumes on any number of ranks.

        Returns:
            (n_r,) int64 column indices into y.
        """
        warm = self.warm_start and self._g is not None and self._n == n and self._g.shape[0] == y.shape[0]
        result = solve(x, y, self.options, g_init=self._g.to(y.device) if warm else None)
        self._last = result
        if self.warm_start:
            self._n, self._g = n, result.g
        return sample_rows(x, y, result, self.options, seed=seed, row_offset=row_offset)

    def stats(self) -> dict[str, float]:
        if self._last is None:
            return {}
        last = self._last
        return {"sinkhorn_iters": float(last.iters), "sinkhorn_err": last.err, "sinkhorn_eps": last.eps}

    def state_dict(self) -> dict[str, Tensor]:
        """The warm-start g (m,) and the row count n it was solved with."""
        if self._g is None:
            return {}
        return {"g": self._g.detach().clone(), "n": torch.tensor(self._n, dtype=torch.long)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if not state:
            self._n = self._g = None
            return
        if set(state) == {"g", "n"}:
            self._n, self._g = int(state["n"]), state["g"].detach().clone()
        else:
            raise ValueError(f"a Sinkhorn coupling state has keys 'g' and 'n', got {sorted(state)}")


class Sinkhorn(SinkhornCoupling):
    """The entropic OT coupling with its solver settings as keywords (every ``SinkhornOptions`` field):
    partners drawn from the Sinkhorn plan of the batch, one per row. Runs where the batch is (CPU or
    CUDA; ``backend='keops'`` or ``'triton'`` for large batches on a GPU).

    Args:
        epsilon: regularization relative to the standard deviation of the cost matrix.
        warm_start: start each solve from the previous call's potential (same batch size).
        per_class: with labels, pairs never cross classes.
        **options: ``max_iter``, ``tol``, ``cost``, ``backend``, ``precision``, ... (``SinkhornOptions``).

    Example:
        >>> pairs = sdfm.Sinkhorn(epsilon=0.05)(torch.randn(256, 2), data[:256])
        >>> pairs.index  # (256,) the partner of each row of x0 in x1
    """

    def __init__(self, epsilon: float = 0.05, *, warm_start: bool = False, per_class: bool = False, **options):
        super().__init__(SinkhornOptions(epsilon=epsilon, **options), warm_start=warm_start, per_class=per_class)
