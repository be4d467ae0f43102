"""Entropic optimal transport on a batch: log-domain Sinkhorn and exact row sampling of its plan.

Convention (DESIGN.md §4): uniform weights a = 1/n, b = 1/m and

    P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps),
    f_i = -eps log sum_j b_j exp((g_j - C_ij) / eps),
    g_j = -eps log sum_i a_i exp((f_i - C_ij) / eps),

with C_ij = 0.5 |x_i - y_j|^2 ('sqeuclidean') or -<x_i, y_j> ('dot'). The user's epsilon is relative
to the spread of the cost: the solver uses eps = epsilon * std(C).

Everything is computed in units of eps: with x~ = x / sqrt(eps), y~ = y / sqrt(eps), F = f / eps and
G = g / eps, every reduction is

    L_i = logsumexp_j (h_j + <x~_i, y~_j>)        (h_j = G_j - |y~_j|^2 / 2, or G_j for 'dot')

followed by subtracting |x~_i|^2 / 2 for 'sqeuclidean': a matrix product, a bias and a logsumexp. The
formula never contains eps, so KeOps compiles it once per dimension, whatever eps, the cost or the
direction of the update (the g-update is the same reduction with the roles of x and y swapped).
The squared norms are taken after shifting x and y by the mean of y (the cost is translation
invariant), which keeps them small and the fp32 expansion accurate.

Library code: single device, no torch.distributed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from sdfm import kernels
from sdfm.couplings.base import Coupling

Cost = Literal["sqeuclidean", "dot"]
Backend = Literal["torch", "keops", "triton", "auto"]

COSTS = ("sqeuclidean", "dot")
BACKENDS = ("torch", "keops", "triton", "auto")
"""torch: blocked matmul + logsumexp; keops: LazyTensors; triton: the fused kernels of sdfm.kernels (CUDA,
or TRITON_INTERPRET=1); auto: on CUDA, whichever of triton and torch measures faster, else torch."""

ANNEAL_FACTOR = 0.5
"""With annealing, the relative epsilon is multiplied by this every ``check_every`` iterations."""

_MASK32 = 0xFFFFFFFF


@dataclass
class SinkhornResult:
    """Dual potentials of an entropic OT problem and how they were reached.

    Attributes:
        f: (n,) float32 potential of the rows (sources x).
        g: (m,) float32 potential of the columns (targets y).
        eps: absolute epsilon the potentials belong to (relative epsilon times std(C)).
        err: L1 error of the row marginal, sum_i |sum_j P_ij - 1/n|, of (f, g); the column marginal
            is exact up to rounding because g was updated last.
        iters: completed Sinkhorn iterations (one f-update and one g-update each).
    """

    f: Tensor
    g: Tensor
    eps: float
    err: float
    iters: int


def _check_inputs(x: Tensor, y: Tensor, cost: str) -> None:
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        shapes = f"{tuple(x.shape)} and {tuple(y.shape)}"
        raise ValueError(f"x and y must be (n, d) and (m, d) with the same d, got {shapes}")
    if x.shape[0] == 0 or y.shape[0] == 0:
        raise ValueError("x and y must have at least one row each")


def cost_std(x: Tensor, y: Tensor, cost: Cost = "sqeuclidean") -> float:
    """Exact standard deviation of C_ij over all n*m pairs, without forming C.

    With mx, my the means and x~_i = x_i - mx, y~_j = y_j - my, the cost splits as
    C_ij = alpha_i + beta_j - <x~_i, y~_j> + const, where

        dot:          alpha_i = -<x_i, my>,               beta_j = -<mx, y_j>
        sqeuclidean:  alpha_i = |x_i|^2 / 2 - <x_i, my>,  beta_j = |y_j|^2 / 2 - <mx, y_j>.

    For (i, j) uniform on the product, i and j are independent and <x~_i, y~_j> has mean zero over i
    for every j and over j for every i, so the three terms are uncorrelated and

        Var C = Var_i alpha + Var_j beta + E <x~_i, y~_j>^2,   E <x~_i, y~_j>^2 = tr(Sx Sy),

    with Sx, Sy the (biased) covariance matrices: O((n + m) d^2) work in float64.

    Args:
        x: (n, d) rows.
        y: (m, d) columns.
        cost: 'sqeuclidean' (0.5 |x - y|^2) or 'dot' (-<x, y>).

    Returns:
        std(C) as a Python float (0.0 when C is constant).
    """
    _check_inputs(x, y, cost)
    x = x.detach().double()
    y = y.detach().double()
    if cost == "sqeuclidean":
        # The cost is translation invariant; shifting both clouds to near the origin avoids
        # cancellation between large |x|^2 terms.
        shift = y.mean(0)
        x, y = x - shift, y - shift
    mx, my = x.mean(0), y.mean(0)
    alpha, beta = -(x @ my), -(y @ mx)
    if cost == "sqeuclidean":
        alpha = alpha + 0.5 * x.square().sum(1)
        beta = beta + 0.5 * y.square().sum(1)
    xc, yc = x - mx, y - my
    sx = xc.T @ xc / x.shape[0]
    sy = yc.T @ yc / y.shape[0]
    var = alpha.var(correction=0) + beta.var(correction=0) + (sx * sy).sum()
    return math.sqrt(max(float(var), 0.0))


def _scaled(x: Tensor, y: Tensor, eps: float, cost: Cost) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Points in units of eps and their half squared norms (zeros for the dot cost).

    Returns:
        xs (n, d), ys (m, d) float32 with C_ij / eps = hx_i + hy_j - <xs_i, ys_j>, and hx (n,), hy (m,).
    """
    x = x.detach().float()
    y = y.detach().float()
    if cost == "sqeuclidean":
        # Shift by the mean of y only: rows are then scaled independently of which other rows are in
        # the batch, so a shard of rows gets bit-identical scores (see ``sample_rows``).
        shift = y.mean(0)
        x, y = x - shift, y - shift
    scale = 1.0 / math.sqrt(eps)
    xs, ys = x * scale, y * scale
    if cost == "sqeuclidean":
        return xs, ys, 0.5 * xs.square().sum(1), 0.5 * ys.square().sum(1)
    return xs, ys, xs.new_zeros(xs.shape[0]), ys.new_zeros(ys.shape[0])


def _lse_torch(a: Tensor, b: Tensor, h: Tensor, block_size: int) -> Tensor:
    """out_i = logsumexp_j (h_j + <a_i, b_j>) in blocks, with O(block_size^2) memory.

    Args:
        a: (n, d), b: (m, d), h: (m,) float32.

    Returns:
        (n,) float32.
    """
    out = a.new_empty(a.shape[0])
    for i0 in range(0, a.shape[0], block_size):
        ai = a[i0 : i0 + block_size]
        acc = None
        for j0 in range(0, b.shape[0], block_size):
            # One block: GEMM + bias, then a logsumexp merged into the running one (streaming).
            # In place rather than torch.logsumexp, which allocates more block-sized temporaries
            # (about 2x slower on CPU).
            s = torch.addmm(h[j0 : j0 + block_size], ai, b[j0 : j0 + block_size].T)
            top = s.amax(dim=1, keepdim=True)
            part = s.sub_(top).exp_().sum(dim=1).log_().add_(top.squeeze(1))
            acc = part if acc is None else torch.logaddexp(acc, part)
        out[i0 : i0 + block_size] = acc
    return out


DENSE_SCORES = 1 << 24
"""Batches with n m up to this many scores (64 MB in fp32, n = m = 4,096) keep them in memory."""


class _DenseReducer:
    """``_lse_torch`` for batches whose n x m scores fit in memory: the product <a_i, b_j> of each
    orientation is computed once per epsilon instead of at every iteration (the iterations then cost
    one pass of add, exp and sum; on a CPU at d = 256 the product was most of an iteration)."""

    def __init__(self) -> None:
        self._cache: list[tuple[Tensor, Tensor, Tensor]] = []
        self._buffer: Tensor | None = None

    def __call__(self, a: Tensor, b: Tensor, h: Tensor) -> Tensor:
        scores = next((s for ka, kb, s in self._cache if ka is a and kb is b), None)
        if scores is None:
            if len(self._cache) == 2:  # annealing rescaled the points: both products are stale
                self._cache.clear()
            scores = a @ b.T
            self._cache.append((a, b, scores))
        if self._buffer is None or self._buffer.shape != scores.shape:
            self._buffer = torch.empty_like(scores)
        s = torch.add(scores, h, out=self._buffer)
        top = s.amax(dim=1, keepdim=True)
        return s.sub_(top).exp_().sum(dim=1).log_().add_(top.squeeze(1))


def _lse_keops(a: Tensor, b: Tensor, h: Tensor) -> Tensor:
    """Same reduction as ``_lse_torch`` with KeOps LazyTensors (one formula per dimension d)."""
    from pykeops.torch import LazyTensor

    a_i = LazyTensor(a[:, None, :].contiguous())
    b_j = LazyTensor(b[None, :, :].contiguous())
    h_j = LazyTensor(h[None, :, None].contiguous())
    return ((a_i | b_j) + h_j).logsumexp(dim=1).view(-1)


def _reducer(backend: Backend, block_size: int) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """The backend's (a, b, h) -> logsumexp_j (h_j + <a_i, b_j>) reduction (see ``BACKENDS``)."""
    if backend == "torch":
        return lambda a, b, h: _lse_torch(a, b, h, block_size)
    if backend == "keops":
        return _lse_keops
    if backend == "triton":
        return kernels.lse
    if backend == "auto":
        return lambda a, b, h: kernels.auto(
            "lse",
            a,
            (a.shape[0], b.shape[0], a.shape[1]),
            lambda: kernels.lse(a, b, h),
            lambda: _lse_torch(a, b, h, block_size),
        )
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def sinkhorn(
    x: Tensor,
    y: Tensor,
    *,
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
) -> SinkhornResult:
    """Log-domain Sinkhorn between the uniform measures on x and y.

    Each iteration updates f then g, so after it the column marginal is exact and the row marginal
    error sum_i |sum_j P_ij - 1/n| measures convergence. It is checked every ``check_every``
    iterations at no extra cost (it falls out of the next f-update's reduction), and the loop stops
    once it is below ``tol`` at the target epsilon, or after ``max_iter`` iterations.

    Annealing: if ``anneal_from > epsilon`` the relative epsilon starts at ``anneal_from`` and is
    multiplied by ``ANNEAL_FACTOR`` (0.5) every ``check_every`` iterations until it reaches
    ``epsilon``; the potentials are carried over in absolute units. The stopping test only applies at
    the target epsilon.

    Args:
        x: (n, d) source points (rows).
        y: (m, d) target points (columns).
        epsilon: regularization relative to std(C); the solver uses eps = epsilon * std(C) (or
            eps = epsilon when C is constant, where every eps gives the same, uniform, plan).
        cost: 'sqeuclidean' (0.5 |x - y|^2) or 'dot' (-<x, y>).
        backend: 'torch' (blocked matmul + logsumexp; when n m <= DENSE_SCORES the scores are kept
            in memory instead of recomputed), 'keops' (LazyTensors), 'triton' (fused kernel,
            CUDA or TRITON_INTERPRET=1) or 'auto' (the faster of triton and torch on CUDA, torch elsewhere).
        max_iter: iteration budget.
        tol: stopping threshold on the L1 row-marginal error.
        check_every: iterations between marginal checks (and annealing steps).
        f_init: (n,) warm-start row potential in absolute units; used only when g_init is not given,
            to compute the first g by a g-update.
        g_init: (m,) warm-start column potential in absolute units (e.g. the previous batch's g).
        anneal_from: starting relative epsilon for annealing (no annealing when <= epsilon).
        block_size: rows/columns per block of the torch backend (memory O(block_size^2)).

    Raises:
        UserError: backend 'triton' where it cannot run (no CUDA and no TRITON_INTERPRET=1, or no triton).

    Returns:
        SinkhornResult with float32 potentials f (n,), g (m,) on x's device.
    """
    _check_inputs(x, y, cost)
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if max_iter < 1 or check_every < 1 or block_size < 1:
        raise ValueError("max_iter, check_every and block_size must be >= 1")
    n, m = x.shape[0], y.shape[0]
    for name, init, size in (("f_init", f_init, n), ("g_init", g_init, m)):
        if init is not None and tuple(init.shape) != (size,):
            raise ValueError(f"{name} must have shape ({size},), got {tuple(init.shape)}")
    dense = backend == "torch" and n * m <= DENSE_SCORES
    reduce = _DenseReducer() if dense else _reducer(backend, block_size)
    std = cost_std(x, y, cost)
    scale = std if std > 0 else 1.0
    log_n, log_m = math.log(n), math.log(m)

    rel = max(epsilon, anneal_from)
    eps = rel * scale
    xs, ys, hx, hy = _scaled(x, y, eps, cost)
    # F, G are the potentials in units of eps (f / eps, g / eps), like xs and ys.
    F = xs.new_zeros(n)
    if g_init is not None:
        G = g_init.detach().to(xs) / eps
    elif f_init is not None:
        F = f_init.detach().to(xs) / eps
        G = log_n - (reduce(ys, xs, F - hx) - hy)
    else:
        G = ys.new_zeros(m)

    it = 0
    while True:
        F_new = log_m - (reduce(xs, ys, G - hy) - hx)
        if it == max_iter or (it > 0 and it % check_every == 0):
            # Row marginal of (F, G): r_i = exp(F_i - F_new_i) / n.
            err = float(torch.expm1(F - F_new).abs().mean())
            if it == max_iter or (rel == epsilon and err < tol):
                break
        F = F_new
        if rel > epsilon and (it + 1) % check_every == 0:
            # Switch eps between the f- and g-update so that the g-update, and with it the exact
            # column marginal, already belongs to the new eps.
            new_rel = max(epsilon, rel * ANNEAL_FACTOR)
            F = F * (rel / new_rel)
            rel, eps = new_rel, new_rel * scale
            xs, ys, hx, hy = _scaled(x, y, eps, cost)
        G = log_n - (reduce(ys, xs, F - hx) - hy)
        it += 1
    return SinkhornResult(f=F * eps, g=G * eps, eps=eps, err=err, iters=it)


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
    _check_inputs(x, y, cost)
    n, m = x.shape[0], y.shape[0]
    xs, ys, hx, hy = _scaled(x, y, eps, cost)
    F, G = f.detach().to(xs) / eps, g.detach().to(xs) / eps
    row = F - hx + _lse_torch(xs, ys, G - hy, block_size) - math.log(m)  # log(n r_i)
    col = G - hy + _lse_torch(ys, xs, F - hx, block_size) - math.log(n)  # log(m c_j)
    return float(torch.expm1(row).abs().mean()), float(torch.expm1(col).abs().mean())


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32): split x into 16-bit halves so nothing overflows."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + ((hi * (c & 0xFFFF)) << 16)) & _MASK32


def _hash32(x: Tensor) -> Tensor:
    """lowbias32 (Chris Wellons' integer hash): a bijection of [0, 2^32) with good avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _gumbel(row_keys: Tensor, cols: Tensor) -> Tensor:
    """Gumbel noise G_ij = -log(-log(u)), u = (hash(row_key_i + j) + 0.5) / 2^32.

    Args:
        row_keys: (bi,) int64 hash(hash(seed) ^ i) of the global row ids.
        cols: (bj,) int64 global column ids.

    Returns:
        (bi, bj) float32 noise.
    """
    bits = _hash32((row_keys[:, None] + cols[None, :]) & _MASK32)
    # float64: in float32, u would round to 1 for the top 2^-25 of hashes and give G = inf.
    u = bits.double().add_(0.5).mul_(2.0**-32)
    return u.log_().neg_().log_().neg_().float()


def sample_rows(
    x: Tensor,
    y: Tensor,
    result: SinkhornResult,
    *,
    seed: int,
    cost: Cost = "sqeuclidean",
    block_size: int = 4096,
    row_offset: int = 0,
    backend: Backend = "torch",
) -> Tensor:
    """Draw one partner per row from the conditional plan P(j | i) by the Gumbel-max trick.

    j_i = argmax_j [(g_j - C_ij) / eps + G_ij] with G_ij Gumbel noise from a counter-based hash of
    (seed, global row id, column id), so the draw does not depend on the block size or the backend,
    and a shard of rows x = X[row_offset : row_offset + n] gets the same partners as those rows of the
    full batch.

    Args:
        x: (n, d) rows (global ids row_offset .. row_offset + n - 1).
        y: (m, d) all columns.
        result: potentials from ``sinkhorn`` on these columns (only g and eps are used).
        seed: integer seed (taken mod 2^32), drawn by the caller from its torch.Generator.
        cost: the cost ``result`` was computed with.
        block_size: rows/columns per block of the torch path (memory O(block_size^2)).
        row_offset: global id of the first row.
        backend: 'triton' draws with the fused kernel (``sdfm.kernels.gumbel_argmax``: the same noise,
            hence the same partners up to the rounding of the scores), 'auto' with the faster of it and
            torch; 'torch' and 'keops' use the blocked torch path.

    Returns:
        (n,) int64 column indices into y.
    """
    _check_inputs(x, y, cost)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if tuple(result.g.shape) != (y.shape[0],):
        raise ValueError(f"result.g has shape {tuple(result.g.shape)} but y has {y.shape[0]} rows")
    xs, ys, _, hy = _scaled(x, y, result.eps, cost)
    h = result.g.detach().to(xs) / result.eps - hy  # the row term of C only shifts a row's scores
    seed_key = _hash32(torch.tensor(seed & _MASK32, dtype=torch.long, device=xs.device))
    rows = torch.arange(row_offset, row_offset + x.shape[0], device=xs.device)
    row_keys = _hash32((seed_key ^ rows) & _MASK32)
    if backend == "triton":
        return kernels.gumbel_argmax(xs, ys, h, row_keys).index
    if backend == "auto":
        return kernels.auto(
            "gumbel_argmax",
            xs,
            (xs.shape[0], *ys.shape),
            lambda: kernels.gumbel_argmax(xs, ys, h, row_keys).index,
            lambda: _gumbel_argmax_torch(xs, ys, h, row_keys, block_size),
        )
    return _gumbel_argmax_torch(xs, ys, h, row_keys, block_size)


def _gumbel_argmax_torch(xs: Tensor, ys: Tensor, h: Tensor, row_keys: Tensor, block_size: int) -> Tensor:
    """argmax_j (h_j + <xs_i, ys_j> + G_ij) in blocks (the noise of ``_gumbel``), O(block_size^2) memory.

    Args:
        xs: (n, d), ys: (m, d), h: (m,) float32; row_keys: (n,) int64 hashed global row ids.

    Returns:
        (n,) int64 column indices.
    """
    cols_all = torch.arange(ys.shape[0], device=xs.device)
    out = torch.empty(xs.shape[0], dtype=torch.long, device=xs.device)
    for i0 in range(0, xs.shape[0], block_size):
        xi = xs[i0 : i0 + block_size]
        keys = row_keys[i0 : i0 + block_size]
        best = xs.new_full((xi.shape[0],), -math.inf)
        arg = torch.zeros(xi.shape[0], dtype=torch.long, device=xs.device)
        for j0 in range(0, ys.shape[0], block_size):
            cols = cols_all[j0 : j0 + block_size]
            scores = torch.addmm(h[j0 : j0 + block_size], xi, ys[j0 : j0 + block_size].T)
            value, index = (scores + _gumbel(keys, cols)).max(dim=1)
            better = value > best  # strict: on a tie the earlier column wins, as in one big argmax
            best = torch.where(better, value, best)
            arg = torch.where(better, index + j0, arg)
        out[i0 : i0 + block_size] = arg
    return out


class SinkhornCoupling(Coupling):
    """Entropic OT coupling of a minibatch: Sinkhorn potentials, then one row sample per source.

    Each call warm-starts from the previous call's potentials (when ``warm_start`` and the sizes
    match); the potentials are this coupling's state, so a resumed run continues bit-identically.
    """

    def __init__(
        self,
        *,
        epsilon: float = 0.05,
        cost: Cost = "sqeuclidean",
        backend: Backend = "torch",
        max_iter: int = 500,
        tol: float = 1e-3,
        check_every: int = 10,
        warm_start: bool = True,
        anneal_from: float = 0.0,
        block_size: int = 4096,
        per_class: bool = False,
    ) -> None:
        if cost not in COSTS:
            raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.epsilon = epsilon
        self.cost = cost
        self.backend = backend
        self.max_iter = max_iter
        self.tol = tol
        self.check_every = check_every
        self.warm_start = warm_start
        self.anneal_from = anneal_from
        self.block_size = block_size
        self.per_class = per_class
        self._n: int | None = None  # rows of the batch the warm-start g was solved with
        self._g: Tensor | None = None
        self._last: SinkhornResult | None = None

    def solver_options(self) -> dict:
        """This coupling's settings of the Sinkhorn solve (``sinkhorn`` or ``sharded_sinkhorn``)."""
        return dict(
            epsilon=self.epsilon,
            cost=self.cost,
            backend=self.backend,
            max_iter=self.max_iter,
            tol=self.tol,
            check_every=self.check_every,
            anneal_from=self.anneal_from,
            block_size=self.block_size,
        )

    def match(self, x0: Tensor, x1: Tensor, generator: torch.Generator) -> Tensor:
        """Return (B,) int64 partners in x1 (B, D) for the rows of x0 (B, D)."""
        warm = self.warm_start and self._g is not None and self._n == x0.shape[0]
        warm = warm and self._g.shape[0] == x1.shape[0]
        result = sinkhorn(x0, x1, g_init=self._g.to(x0.device) if warm else None, **self.solver_options())
        self._last = result
        if self.warm_start:
            self._n, self._g = x0.shape[0], result.g
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device))
        index = sample_rows(
            x0, x1, result, seed=seed, cost=self.cost, block_size=self.block_size, backend=self.backend
        )
        return index.to(x1.device)

    def stats(self) -> dict[str, float]:
        if self._last is None:
            return {}
        last = self._last
        return {"sinkhorn_iters": float(last.iters), "sinkhorn_err": last.err, "sinkhorn_eps": last.eps}

    def state_dict(self) -> dict[str, Tensor]:
        """The warm-start g (m,) and the row count n it was solved with (the format of
        ``ShardedSinkhornCoupling`` too, so a run resumes on any number of ranks)."""
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
