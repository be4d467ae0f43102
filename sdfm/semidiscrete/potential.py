"""Fitting the dual potential g of semidiscrete OT, its convergence monitor, and its file format.

Problem (DESIGN.md §5): source μ (standard normal unless ``sample_source`` says otherwise), target
ν = uniform on y_1..y_N, dot cost c(x, y) = -<x, y>. The semi-dual

    F(g) = E_{x~μ}[f_{g,ε}(x)] + <b, g>,   f_{g,ε}(x) = -ε log Σ_j b_j exp((g_j + <x, y_j>)/ε)

is concave in g ∈ R^N; its stochastic gradient (of -F) on a fresh batch x_1..x_B is

    (1/B) Σ_i s(x_i) - b,

with s(x) the one-hot of argmax_j (g_j + <x, y_j>) when ε = 0 (a ``MatchIndex.search``) and the
softmax of (g + Y x)/ε when ε > 0 (computed here exactly over all N points, chunked, no top-k). A
point that receives less than its share b_j gets its g_j raised. Σ_j of the gradient is zero, so the
mean of g never drifts.

Convergence monitor: the unbiased estimate of χ²(m(g) ‖ b), m(g) the marginal that g induces,

    χ̂² = 1/(B(B-1)) Σ_j (1/b_j) [(Σ_i s_ij)² - Σ_i s_ij²] - 1

(E[(Σ_i s_ij)² - Σ_i s_ij²] = B(B-1) m_j² for i.i.d. rows). For ε = 0, Σ_i s_ij² = Σ_i s_ij (counts).
One batch's χ̂² is noisy: with B << N its standard deviation is about sqrt(2N)/B (0.34 for N = 60,000,
B = 1,024), so ``fit_potential`` stops on a windowed mean and confirms on a large fresh sample.

Methods:

- ``sgd_ema`` (as OTT-JAX): plain SGD on g from g0 = 0 with a constant step, and an exponential moving
  average (0.99, bias-corrected) of the iterates is the potential. Default step:
  lr = min(0.5 B, 0.1 N) δ, with δ the score width of a typical cell (``_scales``). Why: SGD's
  stationary noise gives the raw iterate χ̂² ≈ lr / (2 B δ_eff) (measured δ_eff ≈ 0.5-1 δ on digits,
  Fashion-MNIST 10k/PCA-64 and 2-D data), so 0.5 B δ keeps the raw iterate near χ̂² ≈ 0.3-0.5 and its
  EMA far lower, whatever N; the curvature of F per coordinate is ~1/(N δ), so 0.1 N δ keeps small
  problems well inside stability (10 steps to relax). A never-matched point gains lr/N per step:
  with N >> B the transient, not the noise, is what limits a short fit (raise lr there).
- ``averaged_sgd`` (as POT's ``ot.semidiscrete.solve_semidiscrete``): lr_t = lr0 t^(-2/3),
  lr0 = min(2 sqrt(N B), 2 N) δ (POT's sqrt(N B) is for costs of unit scale; in units of δ the
  factor 2 was near the best on digits and Fashion-MNIST 10k/PCA-64, and the 2 N cap avoids a long
  unstable start on tiny problems), a decreasing regularization ε_t = max(ε, ε0 / sqrt(t)) with
  ε0 = δ (POT: 0.1 in cost units), and the uniform (Polyak) average of the iterates as the
  potential. Because ε_t > 0 always, every step is a softmax over all N points (about twice the cost
  of an argmax step on a CPU).

With labels, each class c is its own problem (one block of g, b_j = 1/N_c within the class) solved on
its own share B_c ≈ B N_c / N of the batch (at least 2; a stratified draw of the class of each noise
sample): the gradient of block c is (N_c/N)((1/B_c) Σ_i s(x_i) - 1/N_c), i.e. the gradient of the
joint problem in which the class of a noise sample is drawn proportionally to the class sizes, and
the reported χ̂² is the class-weighted mean Σ_c (N_c/N) χ̂²_c.

With ``pca_dim = p``, the problem is solved in the PCA space of ``MatchIndex`` (keys (y - m) V); the
default standard-normal noise is drawn directly as N(0, I_p), which is exactly x V for x ~ N(0, I_d)
because V has orthonormal columns.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from sdfm.checkpoint import write_atomic
from sdfm.errors import UserError
from sdfm.semidiscrete.index import Backend, MatchIndex, class_partition

Method = Literal["sgd_ema", "averaged_sgd"]
METHODS = ("sgd_ema", "averaged_sgd")
SampleSource = Callable[[int, torch.Generator], Tensor]
"""``sample_source(n, generator) -> (n, d)`` noise samples drawn with ``generator`` (a generator on
the fitter's device; return the samples on any device)."""

COARSE_BELOW = 0.01
"""init='auto' starts from the coarse problem when δ (cell score width) < COARSE_BELOW * s (spread)."""
FORMAT = "sdfm.potential/1"
FITTER_FORMAT = "sdfm.potential_fitter/1"
_SOFTMAX_BLOCK = 1 << 24
"""Scores held at once by the ε > 0 reduction (64 MB in fp32); more than that is done in two passes."""

__all__ = [
    "FitResult",
    "Potential",
    "PotentialFitter",
    "Chi2Evaluator",
    "fit_potential",
    "save_potential",
    "load_potential",
]


def _softmax_sums(q: Tensor, keys: Tensor, g: Tensor, epsilon: float) -> tuple[Tensor, Tensor]:
    """Column sums of s and s² for s_i = softmax((g + keys q_i) / ε) over all n points.

    Exact over all n (no top-k). When whole rows fit the memory block (n up to 2^24/64 = 262,144),
    queries are taken a block of rows at a time and each row's softmax is done in one pass: one
    matrix product per step. Otherwise the work is chunked over N in two passes (a running
    logsumexp for the row normalizers, then the normalized columns), which computes the products
    twice. (A first version always chunked over N: at N = 60,000, B = 1,024 that made a step 4.6x
    slower than an argmax step; blocks of rows brought it to about the cost of one.)

    Args:
        q: (b, p) float32 queries.
        keys: (n, p) float32 points.
        g: (n,) float32 potential.

    Returns:
        (n,) Σ_i s_ij and (n,) Σ_i s_ij², float32.
    """
    b, n = q.shape[0], keys.shape[0]
    scaled = g / epsilon

    def logits(rows: slice, cols: slice) -> Tensor:
        # (g + keys q) / ε in one fused matmul-plus-bias.
        return torch.addmm(scaled[None, cols], q[rows], keys[cols].T, alpha=1.0 / epsilon)

    col_sum = torch.zeros(n, device=q.device)
    col_sq = torch.zeros(n, device=q.device)
    every = slice(None)
    rows_per_block = _SOFTMAX_BLOCK // n
    if rows_per_block >= min(b, 64):
        for start in range(0, b, rows_per_block):
            s = torch.softmax(logits(slice(start, start + rows_per_block), every), dim=1)
            col_sum += s.sum(0)
            col_sq += s.mul_(s).sum(0)
        return col_sum, col_sq
    chunk = max(1, _SOFTMAX_BLOCK // b)
    top = torch.full((b,), -torch.inf, device=q.device)
    acc = torch.zeros(b, device=q.device)
    for start in range(0, n, chunk):
        z = logits(every, slice(start, start + chunk))
        new_top = torch.maximum(top, z.max(1).values)
        acc = acc * torch.exp(top - new_top) + torch.exp(z - new_top[:, None]).sum(1)
        top = new_top
    lse = top + torch.log(acc)
    for start in range(0, n, chunk):
        s = torch.exp(logits(every, slice(start, start + chunk)) - lse[:, None])
        col_sum[start : start + chunk] = s.sum(0)
        col_sq[start : start + chunk] = s.mul_(s).sum(0)
    return col_sum, col_sq


def _scales(keys: Tensor, sample: int = 512) -> tuple[float, float]:
    """Scales of the scores of a problem with keys (N, p), for x ~ N(0, I).

    Returns:
        s: RMS norm of the centered keys, the spread of <x, y_j> over j.
        delta: score width of a typical cell, mean(r_j²) / s with r_j the distance from y_j to its
            nearest other key (over up to ``sample`` keys chosen with a fixed seed). Why: a cell of the
            Laguerre diagram is ~r/s wide in x-space (the keys' spacing r relative to their spread s,
            mapped onto the unit-scale noise), and moving across it changes <x, y_j - y_k> by about
            that width times r. Measured on digits, Fashion-MNIST 10k (PCA 64) and 2-D data, the step
            size at which SGD's noise reaches a given χ̂² is proportional to delta within a factor 2,
            while it varies 10x relative to s. Exact duplicates are ignored.
    """
    centered = keys - keys.mean(0)
    s = float(centered.square().sum(1).mean().sqrt())
    n = keys.shape[0]
    if n < 2 or s == 0:
        return max(s, 1e-12), max(s, 1e-12)
    gen = torch.Generator().manual_seed(0)
    pick = torch.randperm(n, generator=gen)[:sample].to(keys.device)
    probe = keys[pick]
    nearest = torch.full((len(pick),), torch.inf, device=keys.device)
    for start in range(0, n, 8192):
        dist = torch.cdist(probe, keys[start : start + 8192])
        dist = dist.masked_fill(dist <= 1e-6 * s, torch.inf)  # itself and exact duplicates
        nearest = torch.minimum(nearest, dist.min(1).values)
    nearest = nearest[torch.isfinite(nearest)]
    delta = float(nearest.square().mean()) / s if len(nearest) else s
    return s, max(delta, 1e-12 * s)


def _nearest(points: Tensor, centers: Tensor, chunk: int = 8192) -> Tensor:
    """(n,) index of the nearest center of each point, in chunks of points."""
    return torch.cat(
        [torch.cdist(points[i : i + chunk], centers).argmin(1) for i in range(0, len(points), chunk)]
    )


def coarse_start(
    keys: Tensor,
    draw: Callable[[], Tensor],
    generator: torch.Generator,
    *,
    clusters: int,
    steps: int = 500,
    lloyd_rounds: int = 10,
) -> Tensor:
    """A starting potential from a coarse version of the problem (multiscale initialization).

    SGD from g = 0 spends most of a short fit on its transient: with the dot cost, g = 0 sends the
    noise to the points of largest norm, and a point that is never matched gains only lr / N per step.
    In low dimension, where a cell's score width δ is tiny next to the spread of the scores, that
    transient is millions of steps (2-D, N = 20,000: χ̂² ≈ 40 after a minute). Instead:

    1. k-means (Lloyd) on the keys into K clusters c_k with masses w_k;
    2. the semidiscrete problem between the noise and the K weighted centers, by plain SGD with an
       EMA (K is small, so it converges in a few hundred steps);
    3. each point inherits its cluster's potential, corrected to first order: the dual potential g(y)
       has gradient -x̄_k near c_k, x̄_k being the mean of the noise in cell k (the point that the OT
       map sends to c_k), so g_j = g_k - <x̄_k, y_j - c_k>.

    On 2-D data this brings χ̂² from ~100 (g = 0) to ~30 before the first fine step, and the fine fit
    from χ̂² ≈ 40 to ≈ 0.2 in the same minute.

    Args:
        keys: (n, p) points in the matching space.
        draw: () -> (B, p) fresh noise in the matching space.
        generator: for the k-means seeding.
        clusters: K (fewer when n is small: at least 4 points per cluster; none below 2 clusters).
        steps: SGD steps of the coarse problem.
        lloyd_rounds: k-means iterations.

    Returns:
        (n,) float32 potential with mean 0 (zeros when the problem is too small to coarsen).
    """
    n = keys.shape[0]
    k = min(clusters, n // 4)
    if k < 2:
        return keys.new_zeros(n)
    pick = torch.randperm(n, generator=generator, device=generator.device)[:k].to(keys.device)
    centers = keys[pick].clone()
    for _ in range(lloyd_rounds):
        assign = _nearest(keys, centers)
        counts = torch.bincount(assign, minlength=k).float()
        sums = torch.zeros_like(centers).index_add_(0, assign, keys)
        filled = counts > 0
        centers[filled] = sums[filled] / counts[filled, None]
    assign = _nearest(keys, centers)
    mass = torch.bincount(assign, minlength=k).float() / n
    spread = float((centers - centers.mean(0)).square().sum(1).mean().sqrt())
    lr = 0.5 * max(spread, 1e-12)  # in score units; measured to converge in ~500 steps on 2-D and image data
    g = keys.new_zeros(k)
    avg = keys.new_zeros(k)
    for _ in range(steps):
        q = draw()
        hit = torch.addmm(g[None, :], q, centers.T).argmax(1)
        g -= lr * (torch.bincount(hit, minlength=k).float() / q.shape[0] - mass)
        avg.mul_(0.99).add_(g, alpha=0.01)
    g = avg / (1 - 0.99**steps)
    # x̄_k: the mean noise sample of each coarse cell.
    xbar, seen = torch.zeros_like(centers), keys.new_zeros(k)
    for _ in range(8):
        q = draw()
        hit = torch.addmm(g[None, :], q, centers.T).argmax(1)
        xbar.index_add_(0, hit, q)
        seen += torch.bincount(hit, minlength=k).float()
    xbar /= seen.clamp(min=1)[:, None]
    out = g[assign] - ((keys - centers[assign]) * xbar[assign]).sum(1)
    return out - out.mean()


class _Problem:
    """The data side of the fit: matching index, class blocks, their batch shares, noise, χ̂²."""

    def __init__(
        self,
        y: Tensor,
        *,
        labels: Tensor | None,
        pca_dim: int,
        backend: Backend,
        device: torch.device | str | None,
        batch_size: int,
        sample_source: SampleSource | None,
    ):
        self.index = MatchIndex(y, backend=backend, labels=labels, pca_dim=pca_dim, device=device)
        self.device = self.index.device
        self.n = self.index.n
        self.sample_source = sample_source
        self._y = y
        groups = class_partition(labels) if labels is not None else [(0, torch.arange(self.n))]
        sizes = [len(rows) for _, rows in groups]
        if batch_size < 2 * len(groups):
            raise UserError(
                f"batch_size={batch_size} is too small for {len(groups)} classes (each needs 2 noise "
                f"samples per step for the χ² estimate); use batch_size >= {2 * len(groups)}"
            )
        # Largest-remainder split of the batch in proportion to the class sizes, at least 2 each.
        quotas = [batch_size * s / self.n for s in sizes]
        shares = [max(2, math.floor(v)) for v in quotas]
        order = sorted(range(len(groups)), key=lambda i: quotas[i] - math.floor(quotas[i]), reverse=True)
        for i in order[: max(0, batch_size - sum(shares))]:
            shares[i] += 1
        self.rows = [rows.to(self.device) for _, rows in groups]
        self.shares = shares
        self.total_batch = sum(shares)
        self.query_labels = (
            None
            if labels is None
            else torch.repeat_interleave(torch.tensor([c for c, _ in groups]), torch.tensor(shares)).to(
                self.device
            )
        )
        # Per-point constants: gradient = grad_scale * Σ_i s_ij - 1/N (see the module docstring).
        self.grad_scale = torch.empty(self.n, device=self.device)
        self.class_size = torch.empty(self.n, device=self.device)
        self.class_share = torch.empty(self.n, device=self.device)
        for rows, size, share in zip(self.rows, sizes, shares, strict=True):
            self.grad_scale[rows] = size / self.n / share
            self.class_size[rows] = float(size)
            self.class_share[rows] = float(share)
        keys = self.index.pca.keys(y.to(self.device)) if self.index.pca else y.to(self.device, torch.float32)
        self.score_scale, self.cell_scale = _scales(keys)
        self._soft_keys: list[Tensor] | None = None

    def soft_keys(self) -> list[Tensor]:
        """(n_c, p) float32 keys of each class for the ε > 0 softmax, built on first use."""
        if self._soft_keys is None:
            y = self._y.to(self.device)
            keys = self.index.pca.keys(y) if self.index.pca else y.to(torch.float32)
            self._soft_keys = [keys[rows].contiguous() for rows in self.rows]
        return self._soft_keys

    def draw(self, generator: torch.Generator) -> Tensor:
        """(total_batch, match_dim) noise in the matching space."""
        if self.sample_source is None:
            q = torch.randn(
                self.total_batch, self.index.match_dim, generator=generator, device=generator.device
            )
            return q.to(self.device)
        x = self.sample_source(self.total_batch, generator)
        if x.ndim != 2 or x.shape != (self.total_batch, self.index.dim):
            raise UserError(
                f"sample_source returned shape {tuple(x.shape)}; it must return (n, {self.index.dim}) for n requested"
            )
        return self.index.project(x)

    def sums(self, q: Tensor, g: Tensor, epsilon: float) -> tuple[Tensor, Tensor]:
        """Σ_i s_ij and Σ_i s_ij² (N,) of the batch q under g at regularization ε."""
        if epsilon <= 0:
            self.index.set_potential(g)
            k = self.index.search(q, self.query_labels, projected=True)
            counts = torch.bincount(k, minlength=self.n).float()
            return counts, counts
        col_sum = torch.empty(self.n, device=self.device)
        col_sq = torch.empty(self.n, device=self.device)
        start = 0
        for rows, share, keys in zip(self.rows, self.shares, self.soft_keys(), strict=True):
            s, s2 = _softmax_sums(q[start : start + share], keys, g[rows], epsilon)
            col_sum[rows], col_sq[rows] = s, s2
            start += share
        return col_sum, col_sq

    def gradient(self, col_sum: Tensor) -> Tensor:
        """(N,) stochastic gradient of -F from one batch's column sums."""
        return self.grad_scale * col_sum - 1.0 / self.n

    def chi2(self, col_sum: Tensor, col_sq: Tensor, rounds: int = 1) -> float:
        """Class-weighted χ̂² from column sums accumulated over ``rounds`` batches."""
        m = self.class_share * rounds
        weight = self.class_size.square() / (self.n * m * (m - 1))
        return float((weight * (col_sum.square() - col_sq)).sum()) - 1.0


class PotentialFitter:
    """Stateful stochastic solver of the semi-dual (see the module docstring for the math).

    Args:
        y: (N, d) data points (flattened).
        epsilon: entropic regularization of the target problem (0: the hard, Laguerre-cell problem).
        method: 'sgd_ema' (constant step, EMA of the iterates) or 'averaged_sgd' (POT's schedule).
        batch_size: noise samples per step (with labels, split across classes, at least 2 each).
        lr: step size (sgd_ema) or lr0 (averaged_sgd); default: see the module docstring (``.lr``
            holds the value used).
        ema: decay of the iterate average for sgd_ema.
        labels: (N,) classes: one independent block of g per class.
        pca_dim: fit in the top principal components (0: full dimension).
        backend: MatchIndex backend for the ε = 0 assignments.
        sample_source: ``(n, generator) -> (n, d)`` noise; default standard normal.
        seed: seed of the fitter's generator (all noise comes from it).
        device: where to compute (default: y's device).
        eps0: initial regularization of averaged_sgd's schedule (default δ, the cell score width).
        init: 'coarse' (start from ``coarse_start`` of each class block, computed at the first step),
            'zero' (g = 0), or 'auto': coarse when a cell's score width is under 1% of the spread of
            the scores (δ / s: ~1e-4 for 20,000 2-D points, where it turns a minute's χ̂² from ~40
            into ~1; ~0.2 for digits and Fashion-MNIST, where g = 0 is as good and the coarse start
            only costs time).
        clusters: K of the coarse start (default min(1024, N / 16)).
    """

    def __init__(
        self,
        y: Tensor,
        *,
        epsilon: float = 0.0,
        method: Method = "sgd_ema",
        batch_size: int = 1024,
        lr: float | None = None,
        ema: float = 0.99,
        labels: Tensor | None = None,
        pca_dim: int = 0,
        backend: Backend = "torch",
        sample_source: SampleSource | None = None,
        seed: int = 0,
        device: torch.device | str | None = None,
        eps0: float | None = None,
        init: Literal["auto", "coarse", "zero"] = "auto",
        clusters: int | None = None,
    ):
        if init not in ("auto", "coarse", "zero"):
            raise UserError(f"unknown potential init '{init}'; use 'auto', 'coarse' or 'zero'")
        if method not in METHODS:
            raise UserError(f"unknown potential fitting method '{method}'; use one of {', '.join(METHODS)}")
        if not (epsilon >= 0 and math.isfinite(epsilon)):
            raise UserError(f"epsilon={epsilon} must be a finite number >= 0 (0: unregularized matching)")
        if not 0 <= ema < 1:
            raise UserError(f"ema={ema} must be in [0, 1)")
        if lr is not None and not lr > 0:
            raise UserError(f"lr={lr} must be positive (or None for the default)")
        self.problem = _Problem(
            y,
            labels=labels,
            pca_dim=pca_dim,
            backend=backend,
            device=device,
            batch_size=batch_size,
            sample_source=sample_source,
        )
        p = self.problem
        self.n, self.method, self.epsilon, self.ema = p.n, method, float(epsilon), ema
        self.batch_size = p.total_batch
        delta = p.cell_scale
        if lr is None:
            if method == "sgd_ema":
                lr = min(0.5 * p.total_batch, 0.1 * p.n) * delta
            else:
                lr = min(2.0 * math.sqrt(p.n * p.total_batch), 2.0 * p.n) * delta
        self.lr = float(lr)
        self.eps0 = delta if eps0 is None else float(eps0)
        self.generator = torch.Generator(device=p.device).manual_seed(seed)
        self.g = torch.zeros(p.n, device=p.device)
        self.g_avg = torch.zeros(p.n, device=p.device)
        self.t = 0
        self.clusters = min(1024, p.n // 16) if clusters is None else clusters
        if init == "auto":
            init = "coarse" if p.cell_scale < COARSE_BELOW * p.score_scale else "zero"
        self.init = init
        self._coarse_pending = init == "coarse"  # done at the first step, not for a resumed fitter

    def _coarse_start(self) -> None:
        """g <- ``coarse_start`` of each class block (the blocks are independent problems)."""
        p = self.problem
        y = p._y.to(p.device)
        keys = p.index.pca.keys(y) if p.index.pca else y.to(torch.float32)
        gen = torch.Generator(device=self.generator.device).manual_seed(
            int(self.generator.initial_seed()) + 1
        )
        for rows in p.rows:
            self.g[rows] = coarse_start(
                keys[rows], lambda: p.draw(gen), gen, clusters=max(1, round(self.clusters * len(rows) / p.n))
            )

    @property
    def index(self) -> MatchIndex:
        """The matching index of the fit (its bias is the last iterate used for an ε = 0 step)."""
        return self.problem.index

    def epsilon_at(self, t: int) -> float:
        """Regularization used at step t (1-based)."""
        if self.method == "averaged_sgd":
            return max(self.epsilon, self.eps0 / math.sqrt(t))
        return self.epsilon

    def lr_at(self, t: int) -> float:
        """Step size at step t (1-based)."""
        return self.lr * t ** (-2.0 / 3.0) if self.method == "averaged_sgd" else self.lr

    def step(self) -> dict[str, float]:
        """One SGD step on a fresh noise batch.

        Returns:
            dict with 'step', 'chi2' (χ̂² of the iterate the gradient was taken at, on this batch),
            'epsilon' and 'lr' used.
        """
        if self._coarse_pending:
            self._coarse_start()
            self._coarse_pending = False
        t = self.t + 1
        eps, lr = self.epsilon_at(t), self.lr_at(t)
        q = self.problem.draw(self.generator)
        col_sum, col_sq = self.problem.sums(q, self.g, eps)
        chi2 = self.problem.chi2(col_sum, col_sq)
        self.g.sub_(lr * self.problem.gradient(col_sum))
        if self.method == "sgd_ema":
            self.g_avg.mul_(self.ema).add_(self.g, alpha=1 - self.ema)
        else:
            self.g_avg.add_((self.g - self.g_avg) / t)
        self.t = t
        return {"step": t, "chi2": chi2, "epsilon": eps, "lr": lr}

    def potential(self) -> Tensor:
        """(N,) float32 potential to use: the EMA (sgd_ema) or the uniform average (averaged_sgd).

        The EMA is bias-corrected (divided by 1 - ema^t, as Adam does): started at g0 = 0 it is then
        the weighted average of the iterates so far instead of being pulled towards 0 for the first
        ~1/(1 - ema) steps.
        """
        if self.method == "sgd_ema" and self.t > 0:
            return self.g_avg / (1 - self.ema**self.t)
        return self.g_avg.clone()

    def state_dict(self) -> dict:
        """Everything needed to continue exactly: iterates, step count and the generator's state."""
        return {
            "format": FITTER_FORMAT,
            "method": self.method,
            "epsilon": self.epsilon,
            "n": self.n,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "eps0": self.eps0,
            "step": self.t,
            "g": self.g.cpu().clone(),
            "g_avg": self.g_avg.cpu().clone(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state_dict()`` of a fitter on the same data and settings."""
        if state.get("format") != FITTER_FORMAT:
            raise UserError(f"fitter state has format {state.get('format')!r}, expected {FITTER_FORMAT!r}")
        for key in ("method", "epsilon", "n", "batch_size"):
            if state[key] != getattr(self, key):
                raise UserError(
                    f"fitter state was saved with {key}={state[key]!r} but this fitter has {getattr(self, key)!r}; "
                    "resume with the same data and settings, or start a new fit"
                )
        self.lr, self.eps0, self.t = float(state["lr"]), float(state["eps0"]), int(state["step"])
        self.g.copy_(state["g"])
        self.g_avg.copy_(state["g_avg"])
        self._coarse_pending = False
        self.generator.set_state(state["generator"])

    def evaluate(self, num_samples: int, generator: torch.Generator, g: Tensor | None = None) -> float:
        """χ̂² of ``g`` (default: ``potential()``) at the target ε on about ``num_samples`` fresh noise
        samples (whole batches), all pooled into one estimate."""
        g = self.potential() if g is None else g.to(self.problem.device, torch.float32)
        rounds = max(1, math.ceil(num_samples / self.batch_size))
        col_sum = torch.zeros(self.n, device=self.problem.device)
        col_sq = torch.zeros(self.n, device=self.problem.device)
        for _ in range(rounds):
            s, s2 = self.problem.sums(self.problem.draw(generator), g, self.epsilon)
            col_sum += s
            col_sq += s2
        return self.problem.chi2(col_sum, col_sq, rounds)


class Chi2Evaluator:
    """One fixed yardstick for potentials: χ̂² on the same ``num_samples`` noise draws every call
    (reseeded each time), so differences between potentials are not noise differences.

    Args:
        y, labels, pca_dim, sample_source, device: as for ``PotentialFitter``.
        epsilon: regularization the potentials are evaluated at.
        num_samples: noise samples per evaluation (std of χ̂² about sqrt(2N)/num_samples).
        batch_size: samples scored at a time.
        seed: seed of the evaluation noise.
    """

    def __init__(
        self,
        y: Tensor,
        *,
        epsilon: float = 0.0,
        labels: Tensor | None = None,
        pca_dim: int = 0,
        num_samples: int = 8192,
        batch_size: int = 1024,
        seed: int = 1_000_003,
        sample_source: SampleSource | None = None,
        device: torch.device | str | None = None,
    ):
        self._fitter = PotentialFitter(
            y,
            epsilon=epsilon,
            batch_size=batch_size,
            labels=labels,
            pca_dim=pca_dim,
            sample_source=sample_source,
            device=device,
            lr=1.0,
        )
        self.num_samples, self.seed = num_samples, seed
        self.n = self._fitter.n

    def __call__(self, g: Tensor) -> float:
        """χ̂² of g (N,)."""
        generator = torch.Generator(device=self._fitter.problem.device).manual_seed(self.seed)
        return self._fitter.evaluate(self.num_samples, generator, g)


@dataclass
class FitResult:
    """Outcome of ``fit_potential``.

    Attributes:
        g: (N,) float32 fitted potential (``PotentialFitter.potential()``).
        steps: SGD steps taken.
        chi2: χ̂² of g on a fresh evaluation sample (``eval_samples``), or the windowed mean of the
            per-step χ̂² when ``eval_samples=0``.
        seconds: wall time of the fit (evaluations included).
        history: (step, seconds, windowed mean of the per-step χ̂²) every ``log_every`` steps.
        converged: whether the target χ̂² was reached (confirmed on the evaluation sample).
    """

    g: Tensor
    steps: int
    chi2: float
    seconds: float
    history: list[tuple[int, float, float]] = field(default_factory=list)
    converged: bool = False


def _default_window(n: int, batch: int, target: float) -> int:
    """Steps averaged for the stop test: enough that the mean's noise (about sqrt(2N)/(B sqrt(W)))
    is a quarter of the target, within [20, 200] so the mean does not lag the fit by too much."""
    need = (4 * math.sqrt(2 * n) / (batch * max(target, 1e-6))) ** 2
    return int(min(200, max(20, math.ceil(need))))


def fit_potential(
    y: Tensor,
    *,
    epsilon: float = 0.0,
    method: Method = "sgd_ema",
    batch_size: int = 1024,
    lr: float | None = None,
    ema: float = 0.99,
    labels: Tensor | None = None,
    pca_dim: int = 0,
    backend: Backend = "torch",
    sample_source: SampleSource | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    max_steps: int = 10_000,
    target_chi2: float = 0.05,
    max_seconds: float | None = None,
    window: int | None = None,
    eval_samples: int = 8192,
    log_every: int = 100,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> FitResult:
    """Fit g until χ̂² <= ``target_chi2``, ``max_steps`` or ``max_seconds``.

    Stop rule: the per-step χ̂² is noisy (module docstring), so the trigger is its mean over the last
    ``window`` steps (default: ``_default_window``) falling to the target; the potential actually
    returned (the EMA or the average, not the last iterate) is then evaluated on ``eval_samples``
    fresh noise samples from a separate generator and the fit stops only if that confirms the target.
    After a failed confirmation the next one waits another ``window`` steps.

    Args:
        y: (N, d) points; the other fitter arguments as in ``PotentialFitter``.
        max_steps: most SGD steps.
        target_chi2: stop when χ̂² of the returned potential is at most this (0.05: where the SD-FM
            paper saw generation quality saturate).
        max_seconds: wall-time budget (None: no limit).
        window: steps in the windowed mean (None: automatic).
        eval_samples: noise samples of the confirming evaluation (0: trust the windowed mean).
        log_every: steps between log lines and history entries.
        progress: show a tqdm bar (only when stderr is a terminal).
        log: where log lines go (None: nowhere).

    Returns:
        FitResult.
    """
    if max_steps < 1:
        raise UserError(f"max_steps={max_steps} must be at least 1")
    fitter = PotentialFitter(
        y,
        epsilon=epsilon,
        method=method,
        batch_size=batch_size,
        lr=lr,
        ema=ema,
        labels=labels,
        pca_dim=pca_dim,
        backend=backend,
        sample_source=sample_source,
        seed=seed,
        device=device,
    )
    window = window or _default_window(fitter.n, fitter.batch_size, target_chi2)
    eval_generator = torch.Generator(device=fitter.problem.device).manual_seed(seed + 7_919)
    recent: deque[float] = deque(maxlen=window)
    history: list[tuple[int, float, float]] = []
    bar = None
    if progress and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=max_steps, desc="potential", leave=False)
    start = time.perf_counter()
    next_check, final_chi2, converged = window, math.nan, False
    while fitter.t < max_steps:
        info = fitter.step()
        recent.append(info["chi2"])
        mean = sum(recent) / len(recent)
        seconds = time.perf_counter() - start
        if bar is not None:
            bar.update(1)
            bar.set_postfix(chi2=f"{mean:.4f}")
        if fitter.t % log_every == 0:
            history.append((fitter.t, seconds, mean))
            if log is not None:
                log(
                    f"potential step {fitter.t} chi2 {info['chi2']:.4f} chi2_mean{window} {mean:.4f} "
                    f"eps {info['epsilon']:.3g} lr {info['lr']:.3g} {fitter.t / seconds:.1f} steps/s"
                )
        if len(recent) == window and mean <= target_chi2 and fitter.t >= next_check:
            if eval_samples <= 0:
                final_chi2, converged = mean, True
                break
            final_chi2 = fitter.evaluate(eval_samples, eval_generator)
            if final_chi2 <= target_chi2:
                converged = True
                break
            next_check = fitter.t + window
        if max_seconds is not None and seconds >= max_seconds:
            break
    if bar is not None:
        bar.close()
    if not converged:
        final_chi2 = fitter.evaluate(eval_samples, eval_generator) if eval_samples > 0 else mean
    seconds = time.perf_counter() - start
    if not history or history[-1][0] != fitter.t:
        history.append((fitter.t, seconds, mean))
    if log is not None:
        log(
            f"potential fit: {fitter.t} steps in {seconds:.1f} s, chi2 {final_chi2:.4f} "
            f"({'reached' if converged else 'not reached'}: target {target_chi2})"
        )
    return FitResult(fitter.potential(), fitter.t, final_chi2, seconds, history, converged)


@dataclass
class Potential:
    """A published potential and where it came from.

    Attributes:
        g: (N,) float32 potential.
        version: publication counter of the worker.
        step: fitter step it was taken at.
        epsilon: regularization it was fitted for.
        chi2: χ̂² reported when it was published.
        fingerprint: ``sdfm.data.fingerprint`` of the data it was fitted on.
        n: number of points N.
        pca_dim: PCA dimension of the fit (0: none).
        created: Unix time of writing.
        extra: further string metadata.
    """

    g: Tensor
    version: int
    step: int
    epsilon: float
    chi2: float
    fingerprint: str
    n: int
    pca_dim: int = 0
    created: float = 0.0
    extra: dict[str, str] = field(default_factory=dict)


def save_potential(
    path: str | os.PathLike,
    g: Tensor,
    *,
    version: int,
    step: int,
    epsilon: float,
    chi2: float,
    fingerprint: str,
    pca_dim: int = 0,
    extra: dict[str, str] | None = None,
) -> Path:
    """Write g (N,) and its metadata as safetensors, atomically: a temporary file in the same folder,
    fsync, os.replace, fsync of the folder. A reader sees the old file or the new one, never a torn one.

    Returns:
        The path written.
    """
    from safetensors.torch import save

    path = Path(path)
    g = g.detach().to("cpu", torch.float32).contiguous()
    metadata = {
        "format": FORMAT,
        "version": str(int(version)),
        "step": str(int(step)),
        "epsilon": repr(float(epsilon)),
        "chi2": repr(float(chi2)),
        "fingerprint": str(fingerprint),
        "n": str(g.shape[0]),
        "pca_dim": str(int(pca_dim)),
        "created": repr(time.time()),
        "extra": json.dumps(extra or {}),
    }
    write_atomic(path, save({"g": g}, metadata=metadata))
    return path


def load_potential(
    path: str | os.PathLike,
    *,
    expected_fingerprint: str | None = None,
    expected_n: int | None = None,
) -> Potential:
    """Read a potential written by ``save_potential`` and check it.

    Raises:
        UserError: the file is missing, unreadable (truncated, not safetensors), of another format,
            has NaN/Inf in g, or does not match ``expected_n`` / ``expected_fingerprint``.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"potential file {path} does not exist; check the path or let the potential worker publish one"
        )
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            names = set(fh.keys())
            g = fh.get_tensor("g") if "g" in names else None
    except Exception as err:  # safetensors raises its own error type (and OSError) for torn files
        raise UserError(
            f"potential file {path} is not a readable safetensors file (truncated or corrupt: {err}); "
            "delete it and publish or fit the potential again"
        ) from err
    if metadata.get("format") != FORMAT or g is None:
        raise UserError(
            f"potential file {path} has format {metadata.get('format')!r} (expected {FORMAT!r} with a tensor 'g'); "
            "point at a file written by sdfm's save_potential"
        )
    g = g.to(torch.float32)
    if g.ndim != 1 or str(g.shape[0]) != metadata.get("n"):
        raise UserError(
            f"potential file {path} holds g of shape {tuple(g.shape)} but says n={metadata.get('n')}; "
            "the file is inconsistent, publish it again"
        )
    if not bool(torch.isfinite(g).all()):
        raise UserError(
            f"potential file {path} has {int((~torch.isfinite(g)).sum())} NaN/Inf entries in g; "
            "use an earlier version or refit (lower the learning rate if it diverged)"
        )
    if expected_n is not None and g.shape[0] != expected_n:
        raise UserError(
            f"potential file {path} has {g.shape[0]} entries but the dataset has {expected_n} points; "
            "use a potential fitted on this dataset"
        )
    if expected_fingerprint is not None and metadata.get("fingerprint") != expected_fingerprint:
        raise UserError(
            f"potential file {path} was fitted on data with fingerprint {metadata.get('fingerprint')} but this "
            f"dataset's is {expected_fingerprint}; use the potential of this dataset or refit it"
        )
    try:
        extra = json.loads(metadata.get("extra", "{}"))
        return Potential(
            g=g,
            version=int(metadata["version"]),
            step=int(metadata["step"]),
            epsilon=float(metadata["epsilon"]),
            chi2=float(metadata["chi2"]),
            fingerprint=metadata["fingerprint"],
            n=g.shape[0],
            pca_dim=int(metadata.get("pca_dim", "0")),
            created=float(metadata.get("created", "0")),
            extra={str(k): str(v) for k, v in extra.items()},
        )
    except (KeyError, ValueError) as err:
        raise UserError(
            f"potential file {path} has missing or malformed metadata ({err}); publish it again"
        ) from err
