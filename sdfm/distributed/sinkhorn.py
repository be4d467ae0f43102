"""Entropic Sinkhorn on a global batch whose rows are split across the ranks of a process group.

Rank r owns rows X_r (n_r of them; ranks may hold different counts, even none) of the global batch
X = [X_0; X_1; ...] and all columns Y (all-gathered once per batch). ``sharded_sinkhorn`` checks the
inputs of all ranks jointly and then runs the one Sinkhorn loop of ``sdfm.ot.sinkhorn`` with the
group's ``Collectives``: the f-update is local, the g-update's logsumexp and the global means go
through the group (docs/design.md §5). The result equals (up to float rounding of the reduction
order) ``sinkhorn`` on the concatenation of the ranks' rows in rank order, with the same stopping
iteration on every rank.

``ShardedSinkhornCoupling`` is the data-parallel form of ``SinkhornCoupling``: each rank pairs its own
rows of the global batch, and the pairs are those a single process draws for the whole batch.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import Tensor

from sdfm.couplings.base import CouplingWrapper, Pairs, class_blocks
from sdfm.couplings.sinkhorn import SinkhornCoupling
from sdfm.distributed.collectives import GroupCollectives, agree
from sdfm.ot.gumbel import draw_seed
from sdfm.ot.reductions import BACKENDS
from sdfm.ot.sinkhorn import COSTS, SinkhornOptions, SinkhornResult, check_problem, sinkhorn_loop

__all__ = ["ShardedSinkhornCoupling", "sharded_sinkhorn"]


def _fingerprint(y: Tensor) -> tuple[float, float]:
    """(sum, sum of squares) of y in float64 over row chunks: a cheap check that ranks hold the same y."""
    rows = max(1, (1 << 22) // max(1, y.shape[1])) if y.dim() == 2 else 1
    total = squares = 0.0
    for start in range(0, y.shape[0], rows):
        c = y[start : start + rows].detach().double()
        total += float(c.sum())
        squares += float(c.square().sum())
    return total, squares


def sharded_sinkhorn(
    x_local: Tensor,
    y: Tensor,
    options: SinkhornOptions = SinkhornOptions(),
    *,
    group: dist.ProcessGroup | None = None,
    comm: GroupCollectives | None = None,
    f_init: Tensor | None = None,
    g_init: Tensor | None = None,
) -> SinkhornResult:
    """``sdfm.ot.sinkhorn.sinkhorn`` on the rows of all ranks, solved jointly.

    Every rank of the group must call this with its own rows and the same columns and options.

    Args:
        x_local: (n_r, d) this rank's rows (n_r may be 0 when another rank has rows).
        y: (m, d) all columns, identical on every rank (``all_gather_rows(x1_local).rows``).
        options: the solver settings, identical on every rank.
        group: the process group (default: the default group), when no ``comm`` is given.
        comm: the group's collectives (they accumulate the communication time).
        f_init: (n_r,) warm-start potential of this rank's rows (used when no g_init is given).
        g_init: (m,) warm-start column potential, identical on every rank.

    Returns:
        SinkhornResult with f (n_r,) for this rank's rows, g (m,), eps, the global err, iters, n,
        row_offset and the split of the call's wall time into communication and compute.

    Raises:
        ValueError: on every rank, when any rank's input is invalid or the ranks disagree about m, d,
            the options, the columns y or g_init.
    """
    comm = comm if comm is not None else GroupCollectives(group, x_local.device)
    problem = check_problem(x_local, y, options, f_init, g_init, rows_may_be_empty=True)
    ok = problem is None
    o = options
    y_sum, y_squares = _fingerprint(y) if ok else (0.0, 0.0)
    header = [
        x_local.shape[0] if ok else 0,
        y.shape[0] if ok else 0,
        y.shape[1] if ok else 0,
        o.epsilon if ok else 0.0,
        COSTS.index(o.cost) if ok else 0,
        BACKENDS.index(o.backend) if ok else 0,
        o.max_iter,
        o.tol,
        o.check_every,
        o.anneal_from,
        g_init is not None,
        float(g_init.detach().double().sum()) if ok and g_init is not None else 0.0,
        f_init is not None,
        y_sum,  # a cheap fingerprint of y: the caller must pass the same columns
        y_squares,
        o.precision == "fp64",
    ]
    table = comm.exchange(header, problem)
    names = ("m", "d", "epsilon", "cost", "backend", "max_iter", "tol", "check_every", "anneal_from")
    for column, name in enumerate(names, start=1):
        agree(table, column, name)
    agree(table, 10, "whether g_init is given")
    agree(table, 11, "g_init (its sum)", rtol=1e-9)
    agree(table, 12, "whether f_init is given (warm start)")
    agree(table, 13, "y (the sum of the columns; pass the same all-gathered batch on every rank)", rtol=1e-9)
    agree(table, 14, "y (the sum of squares of the columns)", rtol=1e-9)
    agree(table, 15, "precision")
    return sinkhorn_loop(x_local, y, options, comm=comm, f_init=f_init, g_init=g_init)


class ShardedSinkhornCoupling(CouplingWrapper):
    """``SinkhornCoupling`` of the global batch (all ranks' rows), solved jointly by the ranks.

    ``pair`` takes this rank's part of the batch and returns this rank's pairs; with the same seed
    they are the pairs that ``SinkhornCoupling`` draws for these rows on the concatenated batch
    (a pair can differ only where the potentials' rounding, ~1e-6 relative, flips a near-tie of the
    Gumbel argmax), because

    - the potentials are those of the global problem (``sharded_sinkhorn``);
    - rows are scaled by y's mean only, and ``sample_rows`` draws its Gumbel noise from a hash of
      (seed, global row id, column id), so a rank sampling its rows with ``row_offset`` = their
      global id reproduces the single-process draw;
    - the seed is the same on every rank: each rank draws it from its own generator exactly as
      ``SinkhornCoupling`` does (one draw per solve, so every rank's generator advances as a single
      process's would), and group rank 0's draw is broadcast. Per-rank generators may therefore be
      seeded differently; the pairs follow rank 0's generator.

    Labels: with ``per_class`` the matching is within each class of the global batch: the global
    rows whose x1 has class c (in global order) are coupled to those x1, a rank solving with the
    rows of class c it holds (possibly none) at offset = the number of class-c rows on lower ranks.

    ``Pairs.index`` holds positions in the global batch (rank order), not in this rank's x1.

    Args:
        inner: the single-process coupling whose settings and warm-start state {g, n} this one uses.
        comm: the collectives of the ranks that share the batch.
    """

    def __init__(self, inner: SinkhornCoupling, comm: GroupCollectives) -> None:
        super().__init__(inner)
        self.comm = comm
        self._comm_s = self._total_s = 0.0

    def _solve(self, x: Tensor, y: Tensor, options: SinkhornOptions, g_init: Tensor | None):
        return sharded_sinkhorn(x, y, options, comm=self.comm, g_init=g_init)

    def pair(self, x0: Tensor, x1: Tensor, labels: Tensor | None, generator: torch.Generator) -> Pairs:
        """Pair this rank's x0 (B_r, *shape) with partners among all ranks' x1.

        Args:
            x0: (B_r, *shape) this rank's sources.
            x1: (B_r, *shape) this rank's targets (all ranks' are gathered here).
            labels: (B_r,) int64 classes of x1, or None; given on every rank or on none.
            generator: this rank's generator (see the class docstring for how the seed is shared).

        Returns:
            Pairs with x0 (B_r, ...), x1 (B_r, ...) and labels (B_r,) of the partners, and index (B_r,)
            of the partners in the global batch.
        """
        start, comm_start = time.perf_counter(), self.comm.comm_s
        problem = None
        if x0.shape[0] != x1.shape[0]:
            problem = f"x0 has {x0.shape[0]} rows but x1 has {x1.shape[0]}"
        elif labels is not None and tuple(labels.shape) != (x1.shape[0],):
            problem = f"labels have shape {tuple(labels.shape)}, expected ({x1.shape[0]},)"
        table = self.comm.exchange([labels is not None], problem)
        agree(table, 0, "whether labels are given")
        gathered = self.comm.gather_rows(x1)
        y_all, offset, b_local = gathered.rows, gathered.offset, x0.shape[0]
        labels_all = self.comm.gather_rows(labels).rows if labels is not None else None
        xf, yf = x0.flatten(1), y_all.flatten(1)
        blocks = class_blocks(labels_all if self.per_class else None, yf.shape[0])
        # One seed per solve, drawn as SinkhornCoupling.match draws it, and rank 0's for everyone.
        draws = torch.tensor(
            [draw_seed(generator) for _ in blocks], dtype=torch.long, device=self.comm.device
        )
        seeds = self.comm.broadcast(draws).tolist()
        index = torch.empty(b_local, dtype=torch.long, device=x1.device)
        for rows, seed in zip(blocks, seeds, strict=True):
            rows = rows.to(x1.device)  # global ids of this block, increasing
            mine = rows[(rows >= offset) & (rows < offset + b_local)]
            local = self.inner.solve_rows(
                xf[mine - offset],
                yf[rows],
                seed,
                n=rows.shape[0],
                row_offset=int((rows < offset).sum()),
                solve=self._solve,
            )
            index[mine - offset] = rows[local.to(x1.device)]
        self._comm_s = self.comm.comm_s - comm_start
        self._total_s = time.perf_counter() - start
        return Pairs(
            x0=x0,
            x1=y_all[index],
            labels=None if labels_all is None else labels_all[index],
            index=index,
        )

    def stats(self) -> dict[str, float]:
        stats = self.inner.stats()
        if stats:
            stats.update(sinkhorn_comm_ms=1e3 * self._comm_s, sinkhorn_total_ms=1e3 * self._total_s)
        return stats
