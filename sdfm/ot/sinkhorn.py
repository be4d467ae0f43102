"""Entropic optimal transport on a batch: one log-domain Sinkhorn loop, single-process or sharded.

Convention (docs/design.md §5): uniform weights a = 1/n, b = 1/m and

    P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps),
    f_i = -eps log sum_j b_j exp((g_j - C_ij) / eps),
    g_j = -eps log sum_i a_i exp((f_i - C_ij) / eps),

with C_ij = 0.5 |x_i - y_j|^2 ('sqeuclidean') or -<x_i, y_j> ('dot'). The user's epsilon is relative
to the spread of the cost: the solver uses eps = epsilon * std(C).

Everything is computed in units of eps: with x~ = x / sqrt(eps), y~ = y / sqrt(eps), F = f / eps and
G = g / eps, every reduction is

    L_i = logsumexp_j (h_j + <x~_i, y~_j>)        (h_j = G_j - |y~_j|^2 / 2, or G_j for 'dot')

followed by subtracting |x~_i|^2 / 2 for 'sqeuclidean': a matrix product, a bias and a logsumexp
(``sdfm.ot.reductions``). The formula never contains eps, so KeOps compiles it once per dimension,
whatever eps, the cost or the direction of the update (the g-update is the same reduction with the
roles of x and y swapped). The squared norms are taken after shifting x and y by the mean of y (the
cost is translation invariant), which keeps them small and the fp32 expansion accurate.

Rows split over ranks. ``sinkhorn_loop`` runs on this rank's rows X_r (all rows for one process)
against all columns Y, and asks its ``Collectives`` for the only two things that need other ranks:

- the g-update's logsumexp over all rows: each rank reduces over its own rows to L_r,j, then
  ``comm.lse`` combines them exactly (max over ranks, then the sum of the rescaled partials; one
  collective);
- global means: std(C) from moments summed over ranks, and the row-marginal error, so every rank
  stops at the same iteration.

The f-update is local. With ``LOCAL`` (one process) every collective is the identity: the
single-process solver (``sinkhorn``) and the sharded one (``sdfm.distributed.sinkhorn``) are this
one loop.

Library code: single device; the loop only talks to other ranks through the ``comm`` it is given.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from sdfm.ot.collectives import LOCAL, Collectives
from sdfm.ot.reductions import (
    BACKENDS,
    DENSE_SCORES,
    PRECISIONS,
    SUPPORTED,
    Backend,
    Precision,
    lse_blocked,
    reducer,
)

Cost = Literal["sqeuclidean", "dot"]
COSTS = ("sqeuclidean", "dot")

ANNEAL_FACTOR = 0.5
"""With annealing, the relative epsilon is multiplied by this every ``check_every`` iterations."""

_MOMENT_CHUNK = 1 << 22
"""Entries of a row chunk converted to float64 at a time by ``cost_std`` (32 MB)."""

__all__ = [
    "ANNEAL_FACTOR",
    "BACKENDS",
    "COSTS",
    "DENSE_SCORES",
    "Backend",
    "Cost",
    "SinkhornOptions",
    "SinkhornResult",
    "check_problem",
    "cost_std",
    "marginal_errors",
    "scaled",
    "sinkhorn",
    "sinkhorn_loop",
]


@dataclass(frozen=True, kw_only=True)
class SinkhornOptions:
    """Settings of one Sinkhorn solve (the [coupling] config's solver settings carry the same names).

    Attributes:
        epsilon: regularization relative to std(C); the solver uses eps = epsilon * std(C) (or
            eps = epsilon when C is constant, where every eps gives the same, uniform, plan).
        cost: 'sqeuclidean' (0.5 |x - y|^2) or 'dot' (-<x, y>).
        backend: 'torch' (blocked matmul + logsumexp; when n m <= DENSE_SCORES the scores are kept in
            memory instead of recomputed), 'keops' (LazyTensors), 'triton' (fused kernel, CUDA or
            TRITON_INTERPRET=1) or 'auto' (the faster of triton and torch on CUDA, torch elsewhere).
        max_iter: iteration budget.
        tol: stopping threshold on the L1 row-marginal error.
        check_every: iterations between marginal checks (and annealing steps).
        anneal_from: starting relative epsilon for annealing (no annealing when <= epsilon).
        block_size: rows/columns per block of the torch backend (memory O(block_size^2)).
        precision: of the score products, 'fp32', 'tf32', 'bf16' or 'bf16x3' (``sdfm.ot.reductions``;
            the potentials, logsumexps and the marginal error stay fp32), or 'fp64' for float64
            references (torch backend only).
    """

    epsilon: float = 0.05
    cost: Cost = "sqeuclidean"
    backend: Backend = "torch"
    max_iter: int = 500
    tol: float = 1e-3
    check_every: int = 10
    anneal_from: float = 0.0
    block_size: int = 4096
    precision: Precision = "fp32"

    def problem(self) -> str | None:
        """What is wrong with these settings (one line), or None."""
        if self.cost not in COSTS:
            return f"cost must be one of {COSTS}, got {self.cost!r}"
        if self.backend not in BACKENDS:
            return f"backend must be one of {BACKENDS}, got {self.backend!r}"
        if self.precision not in PRECISIONS:
            return f"precision must be one of {PRECISIONS}, got {self.precision!r}"
        if self.precision not in SUPPORTED[self.backend]:
            able = ", ".join(b for b, p in SUPPORTED.items() if self.precision in p)
            return f"precision {self.precision!r} needs backend {able}; backend {self.backend!r} computes in {', '.join(SUPPORTED[self.backend])}"
        if not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            return f"epsilon must be > 0, got {self.epsilon}"
        if self.max_iter < 1 or self.check_every < 1 or self.block_size < 1:
            return "max_iter, check_every and block_size must be >= 1"
        if not self.tol >= 0 or not self.anneal_from >= 0:
            return f"tol and anneal_from must be >= 0, got {self.tol} and {self.anneal_from}"
        return None

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the scaled points and the potentials."""
        return torch.float64 if self.precision == "fp64" else torch.float32


@dataclass
class SinkhornResult:
    """Dual potentials of an entropic OT problem and how they were reached.

    Attributes:
        f: (n_r,) potential of this rank's rows (all n rows for one process), absolute units.
        g: (m,) potential of the columns (targets y), the same on every rank.
        eps: absolute epsilon the potentials belong to (relative epsilon times std(C)).
        err: L1 error of the row marginal, sum_i |sum_j P_ij - 1/n| over all n rows, of (f, g); the
            column marginal is exact up to rounding because g was updated last.
        iters: completed Sinkhorn iterations (one f-update and one g-update each).
        n: number of rows over all ranks.
        row_offset: global id of this rank's first row (0 for one process).
        comm_s: seconds spent inside collectives (0 for one process).
        compute_s: the rest of the call's wall time.
    """

    f: Tensor
    g: Tensor
    eps: float
    err: float
    iters: int
    n: int = 0
    row_offset: int = 0
    comm_s: float = 0.0
    compute_s: float = 0.0


def check_problem(
    x: Tensor,
    y: Tensor,
    options: SinkhornOptions,
    f_init: Tensor | None = None,
    g_init: Tensor | None = None,
    *,
    rows_may_be_empty: bool = False,
) -> str | None:
    """What is wrong with one rank's inputs (one line), or None: the checks of ``sinkhorn`` and of
    ``sdfm.distributed.sinkhorn.sharded_sinkhorn`` (where a rank may hold no rows)."""
    if (problem := options.problem()) is not None:
        return problem
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        return f"x and y must be (n, d) and (m, d) with the same d, got {tuple(x.shape)} and {tuple(y.shape)}"
    if y.shape[0] == 0 or (x.shape[0] == 0 and not rows_may_be_empty):
        return "x and y must have at least one row each"
    for name, init, size in (("f_init", f_init, x.shape[0]), ("g_init", g_init, y.shape[0])):
        if init is not None and tuple(init.shape) != (size,):
            return f"{name} must have shape ({size},), got {tuple(init.shape)}"
    return None


def _chunks(t: Tensor):
    """Row chunks of t (k, d) in float64, a bounded number of entries at a time (no float64 copy of t)."""
    rows = max(1, _MOMENT_CHUNK // max(1, t.shape[1]))
    for start in range(0, t.shape[0], rows):
        yield t[start : start + rows].detach().double()


def cost_std(x: Tensor, y: Tensor, cost: Cost = "sqeuclidean", comm: Collectives = LOCAL) -> float:
    """Exact standard deviation of C_ij over all n*m pairs, without forming C.

    With mx, my the means and x~_i = x_i - mx, y~_j = y_j - my, the cost splits as
    C_ij = alpha_i + beta_j - <x~_i, y~_j> + const, where

        dot:          alpha_i = -<x_i, my>,               beta_j = -<mx, y_j>
        sqeuclidean:  alpha_i = |x_i|^2 / 2 - <x_i, my>,  beta_j = |y_j|^2 / 2 - <mx, y_j>.

    For (i, j) uniform on the product, i and j are independent and <x~_i, y~_j> has mean zero over i
    for every j and over j for every i, so the three terms are uncorrelated and

        Var C = Var_i alpha + Var_j beta + E <x~_i, y~_j>^2,   E <x~_i, y~_j>^2 = tr(Sx Sy),

    with Sx, Sy the (biased) covariance matrices: O((n + m) d^2) work, accumulated in float64 over row
    chunks. For the sqeuclidean cost both clouds are first shifted by the mean of y (the cost is
    translation invariant), so nothing cancels catastrophically. The row terms are reduced over the
    ranks of ``comm`` in two passes (means, then centered sums); Sx itself is never formed.

    Args:
        x: (n_r, d) this rank's rows (all n rows for one process).
        y: (m, d) all columns.
        cost: 'sqeuclidean' (0.5 |x - y|^2) or 'dot' (-<x, y>).
        comm: the ranks that hold the rows (``LOCAL``: one process).

    Returns:
        std(C) as a Python float (0.0 when C is constant).
    """
    m, d = y.shape
    n = sum(comm.counts(x.shape[0]))
    sqeuclidean = cost == "sqeuclidean"
    ymean = sum(c.sum(0) for c in _chunks(y)) / m
    shift = ymean if sqeuclidean else torch.zeros_like(ymean)
    my = ymean - shift

    def alpha(c: Tensor) -> Tensor:
        c = c - shift
        return -(c @ my) + (0.5 * c.square().sum(1) if sqeuclidean else 0.0)

    local = torch.zeros(d + 1, dtype=torch.float64, device=y.device)
    for c in _chunks(x):
        local[:d] += (c - shift).sum(0)
        local[d] += alpha(c).sum()
    sums = comm.sum(local)
    mx, alpha_mean = sums[:d] / n, sums[d] / n
    sy = torch.zeros(d, d, dtype=torch.float64, device=y.device)
    for c in _chunks(y):
        yc = c - shift - my
        sy += yc.T @ yc
    sy /= m
    local = torch.zeros(2, dtype=torch.float64, device=y.device)
    for c in _chunks(x):
        xc = c - shift - mx
        local[0] += (alpha(c) - alpha_mean).square().sum()
        local[1] += ((xc @ sy) * xc).sum()
    var_alpha, trace = (comm.sum(local) / n).tolist()

    def beta(c: Tensor) -> Tensor:
        c = c - shift
        return -(c @ mx) + (0.5 * c.square().sum(1) if sqeuclidean else 0.0)

    beta_mean = sum(float(beta(c).sum()) for c in _chunks(y)) / m
    var_beta = sum(float((beta(c) - beta_mean).square().sum()) for c in _chunks(y)) / m
    return math.sqrt(max(var_alpha + var_beta + trace, 0.0))


def scaled(
    x: Tensor, y: Tensor, eps: float, cost: Cost, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Points in units of eps and their half squared norms (zeros for the dot cost).

    Returns:
        xs (n, d), ys (m, d) in ``dtype`` with C_ij / eps = hx_i + hy_j - <xs_i, ys_j>, and hx (n,), hy (m,).
    """
    x = x.detach().to(dtype)
    y = y.detach().to(dtype)
    if cost == "sqeuclidean":
        # Shift by the mean of y only: rows are then scaled independently of which other rows are in
        # the batch, so a shard of rows gets bit-identical scores (see ``sdfm.ot.gumbel.sample_rows``).
        shift = y.mean(0)
        x, y = x - shift, y - shift
    scale = 1.0 / math.sqrt(eps)
    xs, ys = x * scale, y * scale
    if cost == "sqeuclidean":
        return xs, ys, 0.5 * xs.square().sum(1), 0.5 * ys.square().sum(1)
    return xs, ys, xs.new_zeros(xs.shape[0]), ys.new_zeros(ys.shape[0])


def sinkhorn_loop(
    x: Tensor,
    y: Tensor,
    options: SinkhornOptions,
    *,
    comm: Collectives = LOCAL,
    f_init: Tensor | None = None,
    g_init: Tensor | None = None,
) -> SinkhornResult:
    """The Sinkhorn iteration on this rank's rows x (n_r, d) against all columns y (m, d).

    Each iteration updates f then g, so after it the column marginal is exact and the row marginal
    error sum_i |sum_j P_ij - 1/n| measures convergence. It is checked every ``check_every``
    iterations at no extra cost (it falls out of the next f-update's reduction), and the loop stops
    once it is below ``tol`` at the target epsilon, or after ``max_iter`` iterations.

    Annealing: if ``anneal_from > epsilon`` the relative epsilon starts at ``anneal_from`` and is
    multiplied by ``ANNEAL_FACTOR`` (0.5) every ``check_every`` iterations until it reaches
    ``epsilon``; the potentials are carried over in absolute units. The stopping test only applies at
    the target epsilon.

    The inputs must already be checked (``check_problem``; jointly over the ranks when sharded):
    call it through ``sinkhorn`` or ``sdfm.distributed.sinkhorn.sharded_sinkhorn``.

    Args:
        x: (n_r, d) this rank's rows (n_r may be 0 when another rank has rows).
        y: (m, d) all columns, identical on every rank.
        options: the solver settings.
        comm: the ranks that hold the rows (``LOCAL``: one process).
        f_init: (n_r,) warm-start row potential in absolute units; used only when g_init is not
            given, to compute the first g by a g-update.
        g_init: (m,) warm-start column potential in absolute units (e.g. the previous batch's g).

    Returns:
        SinkhornResult with potentials in ``options.dtype`` on x's device.
    """
    start, comm_start = time.perf_counter(), comm.comm_s
    o = options
    counts = comm.counts(x.shape[0])
    n, m, n_r = sum(counts), y.shape[0], x.shape[0]
    if n == 0:
        raise ValueError("no rank has any rows: the batch is empty")
    dense = o.backend == "torch" and n_r * m <= DENSE_SCORES
    reduce = reducer(o.backend, o.block_size, dense=dense, precision=o.precision)

    def lse(a: Tensor, b: Tensor, h: Tensor) -> Tensor:
        if b.shape[0] == 0:  # no rows on this rank: an empty sum
            return a.new_full((a.shape[0],), -math.inf)
        if a.shape[0] == 0:
            return a.new_empty(0)
        return reduce(a, b, h)

    std = cost_std(x, y, o.cost, comm)
    scale = std if std > 0 else 1.0
    log_n, log_m = math.log(n), math.log(m)

    rel = max(o.epsilon, o.anneal_from)
    eps = rel * scale
    xs, ys, hx, hy = scaled(x, y, eps, o.cost, o.dtype)
    # F, G are the potentials in units of eps (f / eps, g / eps), like xs and ys.
    F = xs.new_zeros(n_r)
    if g_init is not None:
        G = g_init.detach().to(xs) / eps
    elif f_init is not None:
        F = f_init.detach().to(xs) / eps
        G = log_n - (comm.lse(lse(ys, xs, F - hx)) - hy)
    else:
        G = ys.new_zeros(m)

    it = 0
    while True:
        F_new = log_m - (lse(xs, ys, G - hy) - hx)
        if it == o.max_iter or (it > 0 and it % o.check_every == 0):
            # Row marginal of (F, G): r_i = exp(F_i - F_new_i) / n, summed in float64 over all rows.
            local_err = torch.expm1(F - F_new).abs().double().sum()
            err = float(comm.sum(local_err[None])) / n
            if it == o.max_iter or (rel == o.epsilon and err < o.tol):
                break
        F = F_new
        if rel > o.epsilon and (it + 1) % o.check_every == 0:
            # Switch eps between the f- and g-update so that the g-update, and with it the exact
            # column marginal, already belongs to the new eps.
            new_rel = max(o.epsilon, rel * ANNEAL_FACTOR)
            F = F * (rel / new_rel)
            rel, eps = new_rel, new_rel * scale
            xs, ys, hx, hy = scaled(x, y, eps, o.cost, o.dtype)
        G = log_n - (comm.lse(lse(ys, xs, F - hx)) - hy)
        it += 1
    comm_s = comm.comm_s - comm_start
    return SinkhornResult(
        f=F * eps,
        g=G * eps,
        eps=eps,
        err=err,
        iters=it,
        n=n,
        row_offset=sum(counts[: comm.rank]),
        comm_s=comm_s,
        compute_s=time.perf_counter() - start - comm_s,
    )


def sinkhorn(
    x: Tensor,
    y: Tensor,
    options: SinkhornOptions = SinkhornOptions(),
    *,
    f_init: Tensor | None = None,
    g_init: Tensor | None = None,
) -> SinkhornResult:
    """Log-domain Sinkhorn between the uniform measures on x and y (``sinkhorn_loop`` on one process).

    Args:
        x: (n, d) source points (rows).
        y: (m, d) target points (columns).
        options: the solver settings (``SinkhornOptions``).
        f_init: (n,) warm-start row potential in absolute units; used only when g_init is not given.
        g_init: (m,) warm-start column potential in absolute units (e.g. the previous batch's g).

    Raises:
        ValueError: bad shapes or settings (one line naming them).
        UserError: backend 'triton' where it cannot run (no CUDA and no TRITON_INTERPRET=1, or no triton).

    Returns:
        SinkhornResult with potentials f (n,), g (m,) on x's device.
    """
    if (problem := check_problem(x, y, options, f_init, g_init)) is not None:
        raise ValueError(problem)
    return sinkhorn_loop(x, y, options, f_init=f_init, g_init=g_init)


def marginal_errors(
    x: Tensor,
    y: Tensor,
    f: Tensor,
    g: Tensor,
    eps: float,
    *,
    cost: Cost = "sqeuclidean",
    block_size: int = 4096,
) -> tuple[float, float]:
    """L1 errors of both marginals of the plan P_ij = exp((f_i + g_j - C_ij) / eps) / (n m).

    Args:
        x: (n, d), y: (m, d) points; f: (n,), g: (m,) potentials in absolute units; eps: absolute.

    Returns:
        (sum_i |sum_j P_ij - 1/n|, sum_j |sum_i P_ij - 1/m|), computed blockwise (no dense P).
    """
    if (problem := check_problem(x, y, SinkhornOptions(cost=cost))) is not None:
        raise ValueError(problem)
    n, m = x.shape[0], y.shape[0]
    xs, ys, hx, hy = scaled(x, y, eps, cost)
    F, G = f.detach().to(xs) / eps, g.detach().to(xs) / eps
    row = F - hx + lse_blocked(xs, ys, G - hy, block_size) - math.log(m)  # log(n r_i)
    col = G - hy + lse_blocked(ys, xs, F - hx, block_size) - math.log(n)  # log(m c_j)
    return float(torch.expm1(row).abs().mean()), float(torch.expm1(col).abs().mean())
