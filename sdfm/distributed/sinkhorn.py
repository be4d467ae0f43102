"""Entropic Sinkhorn on a global batch whose rows are split across the ranks of a process group.

Rank r owns rows X_r (n_r of them; ranks may hold different counts, even none) of the global batch
X = [X_0; X_1; ...] and all columns Y (all-gathered once per batch with ``all_gather_rows``). In the
units of ``sdfm.couplings.sinkhorn`` (DESIGN.md §4):

- f-update: F_i = log m - lse_j (G_j - hy_j + <xs_i, ys_j>) + hx_i needs only the rank's rows: local.
- g-update: G_j = log n - lse_i (F_i - hx_i + <ys_j, xs_i>) + hy_j runs over all rows. Each rank
  reduces over its own rows to L_r,j = lse_{i in X_r}(...), which is the per-column pair
  (max_r,j, sumexp_r,j) folded into one number (L = max + log sumexp), using the single-process
  reductions (blocked torch or KeOps) unchanged. Then two all-reduces over m floats give the exact
  global value: M_j = max_r L_r,j (MAX), S_j = sum_r exp(L_r,j - M_j) (SUM), lse_j = M_j + log S_j.
- eps = epsilon * std(C) with the global std(C), from moments reduced over ranks (``_global_cost_std``).
- The row-marginal error is a global mean, so every rank stops at the same iteration.

Small reductions (moments, the error, validation headers) are all-gathers of one value per rank,
summed in rank order: bit-identical on every rank whatever the backend's all-reduce algorithm, so
no rank can decide to stop while another goes on. Inputs are validated jointly: a rank whose input
is bad, or ranks that disagree about m, d or the options, make every rank raise the same one-line
ValueError instead of leaving the others waiting in a collective.

This module and ``matching`` are the only solvers that take a process group (DESIGN.md §2).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from sdfm.couplings.base import Pairs
from sdfm.couplings.sinkhorn import (
    ANNEAL_FACTOR,
    BACKENDS,
    COSTS,
    Backend,
    Cost,
    SinkhornCoupling,
    SinkhornResult,
    _reducer,
    _scaled,
    sample_rows,
)

__all__ = [
    "GatheredRows",
    "ShardedSinkhornCoupling",
    "ShardedSinkhornResult",
    "all_gather_rows",
    "sharded_sinkhorn",
]

_MAX_DIMS = 6
"""Trailing dimensions a row may have in ``all_gather_rows`` (images: (C, H, W))."""

_DTYPES = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
)


class CommClock:
    """Wall time since creation, split into time inside collectives and the rest.

    Collectives wait for the slowest rank, so ``comm_s`` includes load imbalance, not only transfer.
    On CUDA the device is synchronized around each collective so that pending kernels count as compute.
    """

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.comm_s = 0.0

    @contextmanager
    def comm(self, device: torch.device) -> Iterator[None]:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.comm_s += time.perf_counter() - t0

    @property
    def total_s(self) -> float:
        return time.perf_counter() - self.start


def _exchange(
    values: Sequence[float],
    problem: str | None,
    group: dist.ProcessGroup | None,
    device: torch.device,
    clock: CommClock | None = None,
    error: type[Exception] = ValueError,
) -> Tensor:
    """All-gather a few numbers per rank, failing on every rank if any rank reports a problem.

    Args:
        values: k numbers from this rank (ints must be below 2^53).
        problem: this rank's one-line complaint about its input, or None.
        error: the exception type to raise.

    Returns:
        (W, k) float64 table on the CPU, row r from rank r.

    Raises:
        error: on every rank, with the first complaining rank's message, if any rank complained.
    """
    world = dist.get_world_size(group)
    row = torch.tensor([float(problem is not None), *map(float, values)], dtype=torch.float64, device=device)
    table = row.new_empty(world * row.shape[0])  # gloo wants the concatenated (not stacked) form
    with clock.comm(device) if clock is not None else _nothing():
        dist.all_gather_single(table, row, group=group)
    table = table.view(world, -1).cpu()
    if bool(table[:, 0].any()):
        messages: list[str | None] = [None] * world
        dist.all_gather_object(messages, problem, group=group)
        rank = next(r for r, m in enumerate(messages) if m is not None)
        raise error(f"rank {rank}: {messages[rank]}")
    return table[:, 1:]


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _agree(
    table: Tensor, column: int, what: str, error: type[Exception] = ValueError, rtol: float = 0.0
) -> None:
    """Raise (on every rank: they all hold the same table) unless all ranks gave the same value (up
    to ``rtol``, for checksums whose float sum may be ordered differently on different ranks)."""
    values = table[:, column]
    same = (values == values[0]) | ((values - values[0]).abs() <= rtol * values[0].abs())
    if not bool(same.all()):
        shown = [int(v) if float(v).is_integer() else float(v) for v in values.tolist()]
        raise error(f"ranks disagree about {what}: {shown} (rank order)")


def _sum_over_ranks(t: Tensor, group: dist.ProcessGroup | None, clock: CommClock) -> Tensor:
    """Sum of t over ranks, added in rank order after an all-gather: identical bits on every rank."""
    out = t.new_empty(dist.get_world_size(group) * t.shape[0], *t.shape[1:])
    with clock.comm(t.device):
        dist.all_gather_single(out, t.contiguous(), group=group)
    return out.view(-1, *t.shape).sum(0)


@dataclass
class GatheredRows:
    """The rows of every rank, concatenated in rank order.

    Attributes:
        rows: (sum_r n_r, *shape) all rows; rank r's rows are rows[offsets[r] : offsets[r] + counts[r]].
        counts: n_r of every rank.
        offsets: global id of every rank's first row.
        rank: this process's rank in the group.
    """

    rows: Tensor
    counts: list[int]
    offsets: list[int]
    rank: int

    @property
    def offset(self) -> int:
        """Global id of this rank's first row."""
        return self.offsets[self.rank]

    @property
    def local(self) -> slice:
        """Where this rank's own rows are in ``rows``."""
        return slice(self.offset, self.offset + self.counts[self.rank])


def all_gather_rows(
    x_local: Tensor, group: dist.ProcessGroup | None = None, clock: CommClock | None = None
) -> GatheredRows:
    """All-gather rows whose count differs between ranks (gloo's all_gather needs equal sizes).

    One all-gather of a small header (count, trailing shape, dtype), then one of the rows padded to
    the largest count. Ranks that disagree about the trailing shape or the dtype all raise.

    Args:
        x_local: (n_r, *shape) this rank's rows, n_r >= 0.
        group: the process group (default: the default group).
        clock: where to count the communication time (optional).

    Returns:
        GatheredRows with rows (sum_r n_r, *shape) in x_local's dtype and device.
    """
    device = x_local.device
    problem = None
    if x_local.dim() < 1 or x_local.dim() - 1 > _MAX_DIMS:
        problem = f"rows must have shape (n, *shape) with at most {_MAX_DIMS} trailing dims, got {tuple(x_local.shape)}"
    elif x_local.dtype not in _DTYPES:
        problem = f"cannot gather rows of dtype {x_local.dtype}"
    shape = list(x_local.shape[1:]) if problem is None else []
    dtype_code = _DTYPES.index(x_local.dtype) if problem is None else -1
    header = [x_local.shape[0] if x_local.dim() else 0, len(shape), dtype_code]
    header += shape + [-1] * (_MAX_DIMS - len(shape))
    table = _exchange(header, problem, group, device, clock)
    _agree(table, 1, "the number of dimensions of the gathered rows")
    for k in range(_MAX_DIMS):
        _agree(table, 3 + k, f"dimension {k + 1} of the gathered rows")
    if not bool((table[:, 2] == table[0, 2]).all()):
        names = [str(_DTYPES[int(c)]) for c in table[:, 2].tolist()]
        raise ValueError(f"ranks disagree about the dtype of the gathered rows: {names} (rank order)")
    counts = [int(c) for c in table[:, 0].tolist()]
    offsets = [sum(counts[:r]) for r in range(len(counts))]
    rank = dist.get_rank(group)
    width = max(counts)
    if width == 0:  # nothing to gather (and no zero-size collective)
        return GatheredRows(rows=x_local.detach().clone(), counts=counts, offsets=offsets, rank=rank)
    padded = x_local.new_zeros(width, *x_local.shape[1:])
    padded[: x_local.shape[0]] = x_local
    everything = padded.new_empty(len(counts) * width, *x_local.shape[1:])
    with clock.comm(device) if clock is not None else _nothing():
        dist.all_gather_single(everything, padded, group=group)
    rows = torch.cat([everything[r * width : r * width + c] for r, c in enumerate(counts)])
    return GatheredRows(rows=rows, counts=counts, offsets=offsets, rank=rank)


@dataclass
class ShardedSinkhornResult:
    """Potentials of a sharded Sinkhorn solve, as seen by one rank.

    Attributes:
        f_local: (n_r,) float32 row potential of this rank's rows (absolute units).
        g: (m,) float32 column potential (the same on every rank).
        eps: absolute epsilon (relative epsilon times the global std(C)).
        err: global L1 row-marginal error sum_i |sum_j P_ij - 1/n| over all n rows.
        iters: completed iterations (the same on every rank).
        n: global number of rows.
        row_offset: global id of this rank's first row.
        comm_s: seconds this rank spent inside collectives (including waiting for other ranks).
        compute_s: the rest of the call's wall time.
    """

    f_local: Tensor
    g: Tensor
    eps: float
    err: float
    iters: int
    n: int
    row_offset: int
    comm_s: float
    compute_s: float

    def local(self) -> SinkhornResult:
        """This rank's rows as a single-process result (for ``sample_rows`` with ``row_offset``)."""
        return SinkhornResult(f=self.f_local, g=self.g, eps=self.eps, err=self.err, iters=self.iters)


def _global_cost_std(
    x_local: Tensor, y: Tensor, n: int, cost: Cost, group: dist.ProcessGroup | None, clock: CommClock
) -> float:
    """std(C) over all n * m pairs, as ``sdfm.couplings.sinkhorn.cost_std`` on the concatenated rows.

    The same decomposition Var C = Var_i alpha + Var_j beta + tr(Sx Sy), with the row terms reduced
    over ranks in two passes (means, then centered sums) so that nothing cancels catastrophically:
    pass 1 sums x and alpha (d + 1 floats), pass 2 sums (alpha_i - mean)^2 and
    xc_i^T Sy xc_i (2 floats; Sy is known to every rank, so Sx itself is never reduced).
    """
    x = x_local.detach().double()
    y = y.detach().double()
    if cost == "sqeuclidean":
        shift = y.mean(0)
        x, y = x - shift, y - shift
    my = y.mean(0)
    alpha = -(x @ my)
    if cost == "sqeuclidean":
        alpha = alpha + 0.5 * x.square().sum(1)
    sums = _sum_over_ranks(torch.cat([x.sum(0), alpha.sum()[None]]), group, clock)
    mx, alpha_mean = sums[:-1] / n, sums[-1] / n
    xc, yc = x - mx, y - my
    sy = yc.T @ yc / y.shape[0]
    local = torch.stack([(alpha - alpha_mean).square().sum(), ((xc @ sy) * xc).sum()])
    var_alpha, trace = (_sum_over_ranks(local, group, clock) / n).tolist()
    beta = -(y @ mx)
    if cost == "sqeuclidean":
        beta = beta + 0.5 * y.square().sum(1)
    var = var_alpha + float(beta.var(correction=0)) + trace
    return math.sqrt(max(var, 0.0))


def _global_lse(part: Tensor, group: dist.ProcessGroup | None, clock: CommClock) -> Tensor:
    """lse over ranks of per-rank partial logsumexps (m,): MAX all-reduce, then SUM of rescaled partials."""
    top = part.clone()
    with clock.comm(part.device):
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    scaled = (part - top).exp_()  # a rank without rows has part = -inf and contributes 0
    with clock.comm(part.device):
        dist.all_reduce(scaled, op=dist.ReduceOp.SUM, group=group)
    return scaled.log_().add_(top)


def sharded_sinkhorn(
    x_local: Tensor,
    y: Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    epsilon: float = 0.05,
    cost: Cost = "sqeuclidean",
    backend: Backend = "torch",
    max_iter: int = 500,
    tol: float = 1e-3,
    check_every: int = 10,
    f_init: Tensor | None = None,
    g_init: Tensor | None = None,
    anneal_from: float = 0.0,
    block_size: int = 4096,
) -> ShardedSinkhornResult:
    """``sdfm.couplings.sinkhorn.sinkhorn`` on the rows of all ranks, solved jointly.

    Every rank of ``group`` must call this with its own rows and the same columns and options; the
    result equals (up to float rounding of the reduction order) ``sinkhorn`` on the concatenation of
    the ranks' rows in rank order, with the same stopping iteration on every rank.

    Args:
        x_local: (n_r, d) this rank's rows (n_r may be 0 when another rank has rows).
        y: (m, d) all columns, identical on every rank (``all_gather_rows(x1_local).rows``).
        group: the process group (default: the default group).
        epsilon, cost, backend, max_iter, tol, check_every, anneal_from, block_size: as in ``sinkhorn``.
        f_init: (n_r,) warm-start potential of this rank's rows (used when no g_init is given).
        g_init: (m,) warm-start column potential, identical on every rank.

    Returns:
        ShardedSinkhornResult with f_local (n_r,), g (m,), eps, the global err, iters and the split of
        the call's wall time into communication and compute.

    Raises:
        ValueError: on every rank, when any rank's input is invalid or the ranks disagree about m, d,
            the options, the columns y or g_init.
    """
    clock = CommClock()
    device = x_local.device
    problem = None
    if cost not in COSTS:
        problem = f"cost must be one of {COSTS}, got {cost!r}"
    elif backend not in BACKENDS:
        problem = f"backend must be one of {BACKENDS}, got {backend!r}"
    elif x_local.dim() != 2 or y.dim() != 2 or x_local.shape[1] != y.shape[1]:
        problem = f"x_local and y must be (n_r, d) and (m, d) with the same d, got {tuple(x_local.shape)} and {tuple(y.shape)}"
    elif y.shape[0] == 0:
        problem = "y must have at least one row"
    elif not epsilon > 0:
        problem = f"epsilon must be > 0, got {epsilon}"
    elif max_iter < 1 or check_every < 1 or block_size < 1:
        problem = "max_iter, check_every and block_size must be >= 1"
    elif f_init is not None and tuple(f_init.shape) != (x_local.shape[0],):
        problem = f"f_init must have shape ({x_local.shape[0]},), got {tuple(f_init.shape)}"
    elif g_init is not None and tuple(g_init.shape) != (y.shape[0],):
        problem = f"g_init must have shape ({y.shape[0]},), got {tuple(g_init.shape)}"
    ok = problem is None
    yd = y.detach().double()
    g_sum = float(g_init.detach().double().sum()) if ok and g_init is not None else 0.0
    header = [
        x_local.shape[0] if ok else 0,
        y.shape[0] if ok else 0,
        y.shape[1] if ok else 0,
        epsilon if ok else 0.0,
        COSTS.index(cost) if ok else 0,
        BACKENDS.index(backend) if ok else 0,
        max_iter,
        tol,
        check_every,
        anneal_from,
        g_init is not None,
        g_sum,
        f_init is not None,
        float(yd.sum()) if ok else 0.0,  # a cheap fingerprint of y: the caller must pass the same columns
        float(yd.square().sum()) if ok else 0.0,
    ]
    table = _exchange(header, problem, group, device, clock)
    names = ("m", "d", "epsilon", "cost", "backend", "max_iter", "tol", "check_every", "anneal_from")
    for column, name in enumerate(names, start=1):
        _agree(table, column, name)
    _agree(table, 10, "whether g_init is given")
    _agree(table, 11, "g_init (its sum)", rtol=1e-9)
    _agree(table, 12, "whether f_init is given (warm start)")
    _agree(table, 13, "y (the sum of the columns; pass the same all-gathered batch on every rank)", rtol=1e-9)
    _agree(table, 14, "y (the sum of squares of the columns)", rtol=1e-9)
    counts = [int(c) for c in table[:, 0].tolist()]
    rank = dist.get_rank(group)
    n, m, n_r = sum(counts), y.shape[0], x_local.shape[0]
    if n == 0:
        raise ValueError("no rank has any rows: the global batch is empty")

    reduce = _reducer(backend, block_size)

    def local_lse(a: Tensor, b: Tensor, h: Tensor) -> Tensor:
        if b.shape[0] == 0:  # no rows here: an empty sum
            return a.new_full((a.shape[0],), -math.inf)
        if a.shape[0] == 0:
            return a.new_empty(0)
        return reduce(a, b, h)

    std = _global_cost_std(x_local, y, n, cost, group, clock)
    scale = std if std > 0 else 1.0
    log_n, log_m = math.log(n), math.log(m)

    rel = max(epsilon, anneal_from)
    eps = rel * scale
    xs, ys, hx, hy = _scaled(x_local, y, eps, cost)
    F = xs.new_zeros(n_r)
    if g_init is not None:
        G = g_init.detach().to(xs) / eps
    elif f_init is not None:
        F = f_init.detach().to(xs) / eps
        G = log_n - (_global_lse(local_lse(ys, xs, F - hx), group, clock) - hy)
    else:
        G = ys.new_zeros(m)

    # The loop is ``sinkhorn``'s, with the g-update's lse and the error's mean taken over all ranks.
    it = 0
    while True:
        F_new = log_m - (local_lse(xs, ys, G - hy) - hx)
        if it == max_iter or (it > 0 and it % check_every == 0):
            local_err = torch.expm1(F - F_new).abs().double().sum()
            err = float(_sum_over_ranks(local_err[None], group, clock)) / n
            if it == max_iter or (rel == epsilon and err < tol):
                break
        F = F_new
        if rel > epsilon and (it + 1) % check_every == 0:
            new_rel = max(epsilon, rel * ANNEAL_FACTOR)
            F = F * (rel / new_rel)
            rel, eps = new_rel, new_rel * scale
            xs, ys, hx, hy = _scaled(x_local, y, eps, cost)
        G = log_n - (_global_lse(local_lse(ys, xs, F - hx), group, clock) - hy)
        it += 1
    total = clock.total_s
    return ShardedSinkhornResult(
        f_local=F * eps,
        g=G * eps,
        eps=eps,
        err=err,
        iters=it,
        n=n,
        row_offset=sum(counts[:rank]),
        comm_s=clock.comm_s,
        compute_s=total - clock.comm_s,
    )


class ShardedSinkhornCoupling(SinkhornCoupling):
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
      seeded differently (for different noise per rank); the pairs follow rank 0's generator.

    Labels: with ``per_class`` the matching is within each class of the global batch: the global
    rows whose x1 has class c (in global order) are coupled to those x1, a rank solving with the
    rows of class c it holds (possibly none) at offset = the number of class-c rows on lower ranks.

    ``Pairs.index`` holds positions in the global batch (rank order), not in this rank's x1.
    """

    def __init__(self, *, group: dist.ProcessGroup | None = None, **settings) -> None:
        """``group``: the ranks that share the batch (default: the default group); ``settings``: those of
        ``SinkhornCoupling``, whose warm-start state {g, n} (n = global rows) this class shares."""
        super().__init__(**settings)
        self.group = group
        self._last: ShardedSinkhornResult | None = None
        self._comm_s = 0.0
        self._total_s = 0.0

    def match(self, x0: Tensor, x1: Tensor, generator: torch.Generator) -> Tensor:
        raise NotImplementedError("the sharded Sinkhorn coupling pairs the global batch: use pair()")

    def _seeds(
        self, count: int, generator: torch.Generator, device: torch.device, clock: CommClock
    ) -> list[int]:
        """``count`` sampling seeds, drawn like ``SinkhornCoupling`` does and taken from group rank 0."""
        draws = [
            int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device))
            for _ in range(count)
        ]
        seeds = torch.tensor(draws, dtype=torch.long, device=device)
        with clock.comm(device):
            dist.broadcast(seeds, group=self.group, group_src=0)
        return seeds.tolist()

    def _solve(
        self, x: Tensor, y: Tensor, n: int, seed: int, row_offset: int
    ) -> tuple[Tensor, ShardedSinkhornResult]:
        """Solve for this rank's rows x (n_r, d) of a problem with n rows in all against y (m, d),
        warm-started as ``SinkhornCoupling.match`` would, and draw the partners of x's rows."""
        warm = self.warm_start and self._g is not None and self._n == n and self._g.shape[0] == y.shape[0]
        g_init = self._g.to(y.device) if warm else None
        result = sharded_sinkhorn(x, y, group=self.group, g_init=g_init, **self.solver_options())
        self._last = result
        if self.warm_start:
            self._n, self._g = result.n, result.g
        if x.shape[0] == 0:
            return torch.empty(0, dtype=torch.long, device=y.device), result
        index = sample_rows(
            x, y, result.local(), seed=seed, cost=self.cost, block_size=self.block_size, row_offset=row_offset
        )
        return index.to(y.device), result

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
        clock = CommClock()
        device = x1.device
        problem = None
        if x0.shape[0] != x1.shape[0]:
            problem = f"x0 has {x0.shape[0]} rows but x1 has {x1.shape[0]}"
        elif labels is not None and tuple(labels.shape) != (x1.shape[0],):
            problem = f"labels have shape {tuple(labels.shape)}, expected ({x1.shape[0]},)"
        table = _exchange([labels is not None], problem, self.group, device, clock)
        _agree(table, 0, "whether labels are given")
        gathered = all_gather_rows(x1, self.group, clock)
        y_all, offset, b_local = gathered.rows, gathered.offset, x0.shape[0]
        labels_all = all_gather_rows(labels, self.group, clock).rows if labels is not None else None
        xf, yf = x0.flatten(1), y_all.flatten(1)
        self._comm_s = 0.0
        if labels_all is None or not self.per_class:
            (seed,) = self._seeds(1, generator, device, clock)
            index, result = self._solve(xf, yf, yf.shape[0], seed, offset)
            self._comm_s = result.comm_s
        else:
            index = torch.empty(b_local, dtype=torch.long, device=device)
            order = torch.argsort(labels_all, stable=True)
            counts = [c for c in torch.bincount(labels_all[order]).tolist() if c > 0]
            seeds = self._seeds(len(counts), generator, device, clock)
            start = 0
            for count, seed in zip(counts, seeds, strict=True):
                rows = order[start : start + count]  # global ids of this class, increasing
                start += count
                mine = rows[(rows >= offset) & (rows < offset + b_local)]
                class_offset = int((rows < offset).sum())
                local, result = self._solve(xf[mine - offset], yf[rows], count, seed, class_offset)
                index[mine - offset] = rows[local]
                self._comm_s += result.comm_s
        self._comm_s += clock.comm_s  # the gathers and the seed broadcast
        self._total_s = clock.total_s
        return Pairs(
            x0=x0,
            x1=y_all[index],
            labels=None if labels_all is None else labels_all[index],
            index=index,
        )

    def stats(self) -> dict[str, float]:
        stats = super().stats()
        if stats:
            stats.update(sinkhorn_comm_ms=1e3 * self._comm_s, sinkhorn_total_ms=1e3 * self._total_s)
        return stats
