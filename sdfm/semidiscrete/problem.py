"""The semidiscrete OT problem between a source and the data, and its χ̂² convergence monitor.

Problem (docs/design.md §7): source μ (standard normal unless ``sample_source`` says otherwise),
target ν = uniform on y_1..y_N, dot cost c(x, y) = -<x, y>. The semi-dual

    F(g) = E_{x~μ}[f_{g,ε}(x)] + <b, g>,   f_{g,ε}(x) = -ε log Σ_j b_j exp((g_j + <x, y_j>)/ε)

is concave in g ∈ R^N; its stochastic gradient (of -F) on a fresh batch x_1..x_B is

    (1/B) Σ_i s(x_i) - b,

with s(x) the one-hot of argmax_j (g_j + <x, y_j>) when ε = 0 (a ``MatchIndex.search``) and the
softmax of (g + Y x)/ε when ε > 0 (exactly over all N points, ``softmax_sums``). A point that
receives less than its share b_j gets its g_j raised. Σ_j of the gradient is zero, so the mean of g
never drifts.

Convergence monitor: the unbiased estimate of χ²(m(g) ‖ b), m(g) the marginal that g induces,

    χ̂² = 1/(B(B-1)) Σ_j (1/b_j) [(Σ_i s_ij)² - Σ_i s_ij²] - 1

(E[(Σ_i s_ij)² - Σ_i s_ij²] = B(B-1) m_j² for i.i.d. rows). For ε = 0, Σ_i s_ij² = Σ_i s_ij (counts).
One batch's χ̂² is noisy: with B << N its standard deviation is about sqrt(2N)/B (0.34 for N = 60,000,
B = 1,024).

With labels, each class c is its own problem (one block of g, b_j = 1/N_c within the class) solved on
its own share B_c ≈ B N_c / N of the batch (at least 2; a stratified draw of the class of each noise
sample): the gradient of block c is (N_c/N)((1/B_c) Σ_i s(x_i) - 1/N_c), i.e. the gradient of the
joint problem in which the class of a noise sample is drawn proportionally to the class sizes, and
the reported χ̂² is the class-weighted mean Σ_c (N_c/N) χ̂²_c.

With ``pca_dim = p``, the problem is solved in the PCA space of ``MatchIndex`` (keys (y - m) V); the
default standard-normal noise is drawn directly as N(0, I_p), which is exactly x V for x ~ N(0, I_d)
because V has orthonormal columns.

Library code: single device.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from sdfm.errors import UserError
from sdfm.semidiscrete.backends import StoredKeys
from sdfm.semidiscrete.index import Backend, MatchIndex, Precision, class_partition
from sdfm.semidiscrete.softmax import softmax_sums

SampleSource = Callable[[int, torch.Generator], Tensor]
"""``sample_source(n, generator) -> (n, d)`` noise samples drawn with ``generator`` (a generator on
the problem's device; return the samples on any device)."""

__all__ = ["SampleSource", "SemidiscreteProblem", "problem_scales"]


def problem_scales(keys: Tensor | StoredKeys, sample: int = 512) -> tuple[float, float]:
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
    n = keys.shape[0]
    # Chunked: keys of a large dataset have no room for a centered copy beside them (and may be
    # StoredKeys, read as fp32 slice by slice).
    mean = sum(keys[i : i + 65536].double().sum(0) for i in range(0, n, 65536)).float() / max(n, 1)
    sq = sum(float((keys[i : i + 65536] - mean).square().sum(1).double().sum()) for i in range(0, n, 65536))
    s = math.sqrt(sq / max(n, 1))
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


class SemidiscreteProblem:
    """The data side of a fit: matching index, class blocks, their batch shares, noise, χ̂².

    Args:
        y: (N, d) data points (flattened).
        labels: (N,) classes: one independent block of g per class (None: one block).
        pca_dim: solve in the top principal components (0: full dimension).
        backend: ``MatchIndex`` backend for the ε = 0 assignments.
        device: where to compute (default: y's device).
        batch_size: noise samples per batch (with labels, split across classes, at least 2 each).
        sample_source: ``(n, generator) -> (n, d)`` noise; default standard normal.
        precision, candidates: of the matching index (``MatchIndex``; default precision: 16-bit for
            the torch index on CUDA, fp32 elsewhere, 16-bit answers certified exact).

    Attributes:
        index: the matching index (its bias is the last potential scored at ε = 0).
        n: N; total_batch: the batch actually drawn (the class shares summed).
        score_scale, cell_scale: s and δ of ``problem_scales``.
    """

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
        precision: Precision | None = None,
        candidates: int = 16,
    ):
        self.index = MatchIndex(
            y,
            backend=backend,
            labels=labels,
            pca_dim=pca_dim,
            device=device,
            precision=precision,
            candidates=candidates,
        )
        self.device = self.index.device
        self.n = self.index.n
        self.sample_source = sample_source
        self.y = y
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
        self.score_scale, self.cell_scale = problem_scales(self.index.data_keys(y))
        self._soft_keys: list[Tensor] | None = None

    def soft_keys(self) -> list[Tensor]:
        """(n_c, p) float32 keys of each class for the ε > 0 softmax, built on first use."""
        if self._soft_keys is None:
            keys = self.index.data_keys(self.y)
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

    def sums(self, q: Tensor, g: Tensor, epsilon: float, part: slice | None = None) -> tuple[Tensor, Tensor]:
        """Σ_i s_ij and Σ_i s_ij² (N,) of the batch q under g at regularization ε, over the rows
        ``part`` of the batch only (a rank's share; default: all of them)."""
        part = part or slice(0, q.shape[0])
        if epsilon <= 0:
            self.index.set_potential(g)
            labels = None if self.query_labels is None else self.query_labels[part]
            k = self.index.search(q[part], labels, projected=True)
            counts = torch.bincount(k, minlength=self.n).float()
            return counts, counts
        col_sum = torch.zeros(self.n, device=self.device)
        col_sq = torch.zeros(self.n, device=self.device)
        start = 0
        for rows, share, keys in zip(self.rows, self.shares, self.soft_keys(), strict=True):
            # This class's rows of the batch, [start, start + share), within the part asked for.
            lo, hi = max(start, part.start), min(start + share, part.stop)
            if lo < hi:
                s, s2 = softmax_sums(q[lo:hi], keys, g[rows], epsilon)
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

    def evaluate(self, g: Tensor, epsilon: float, num_samples: int, generator: torch.Generator) -> float:
        """χ̂² of g (N,) at regularization ε on about ``num_samples`` fresh noise samples (whole
        batches drawn from ``generator``), all pooled into one estimate."""
        return self.evaluate_with_error(g, epsilon, num_samples, generator)[0]

    def evaluate_with_error(
        self, g: Tensor, epsilon: float, num_samples: int, generator: torch.Generator, groups: int = 8
    ) -> tuple[float, float]:
        """(χ̂², its standard error) on about ``num_samples`` fresh noise samples.

        The estimate pools every batch. The error comes from ``groups`` disjoint groups of batches,
        each pooled into its own estimate: std(group estimates) / sqrt(groups). That overstates the
        error of the pooled estimate (whose pair-count noise falls like 1/M², not 1/M, in the number
        M of samples near convergence), so a bound built on it is conservative. With fewer than two
        batches, the null-hypothesis size sqrt(2N)/M stands in.
        """
        g = g.to(self.device, torch.float32)
        rounds = max(1, math.ceil(num_samples / self.total_batch))
        k = max(1, min(groups, rounds))
        sums = torch.zeros(k, self.n, device=self.device)
        sqs = torch.zeros(k, self.n, device=self.device)
        counts = [0] * k
        for r in range(rounds):
            s, s2 = self.sums(self.draw(generator), g, epsilon)
            sums[r % k] += s
            sqs[r % k] += s2
            counts[r % k] += 1
        chi2 = self.chi2(sums.sum(0), sqs.sum(0), rounds)
        if k < 2:
            return chi2, math.sqrt(2 * self.n) / (rounds * self.total_batch)
        parts = torch.tensor([self.chi2(sums[i], sqs[i], counts[i]) for i in range(k)], dtype=torch.float64)
        return chi2, float(parts.std() / math.sqrt(k))
