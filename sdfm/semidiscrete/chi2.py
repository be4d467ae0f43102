"""χ̂² as a yardstick: ``Chi2Evaluator`` (the same fixed noise every call, for benchmarks and tests),
how many samples can confirm a target (``confirming_samples``, ``bound_width``), and the one phrase
that states a confirmed χ̂² (``describe_chi2``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sdfm.semidiscrete.problem import SampleSource, SemidiscreteProblem

__all__ = ["Z_ONE_SIDED_95", "Chi2Evaluator", "bound_width", "confirming_samples", "describe_chi2"]


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
        self.problem = SemidiscreteProblem(
            y,
            labels=labels,
            pca_dim=pca_dim,
            backend="torch",
            device=device,
            batch_size=batch_size,
            sample_source=sample_source,
        )
        self.epsilon, self.num_samples, self.seed = float(epsilon), num_samples, seed
        self.n = self.problem.n

    def __call__(self, g: Tensor) -> float:
        """χ̂² of g (N,)."""
        generator = torch.Generator(device=self.problem.device).manual_seed(self.seed)
        return self.problem.evaluate(g, self.epsilon, self.num_samples, generator)


def bound_width(n: int, samples: int, groups: int = 8) -> float:
    """1.645 SE of a converged potential's χ̂² from ``evaluate_with_error`` on ``samples`` samples at
    N = n: one group of samples / groups estimates χ̂² with noise about sqrt(2N) groups / samples, so
    SE ≈ sqrt(groups) sqrt(2N) / samples. No target below this can be confirmed with that many."""
    return Z_ONE_SIDED_95 * math.sqrt(groups) * math.sqrt(2 * n) / samples


def confirming_samples(n: int, target: float, batch: int = 1024) -> int:
    """Noise samples of a confirming evaluation at N = n points: enough that the one-sided 95% bound
    can reach the target at all, and at most 64 batches (one check must not cost more than a few
    dozen steps, nor keep a SIGTERM waiting). Asking ``bound_width`` <= target / 2 gives
    M >= 3.29 sqrt(8) sqrt(2N) / target (N = 20,000, target 0.05: 37,000 samples; the fixed 8,192
    used before could never confirm 0.05 above N of about 1,000), and at least 8,192. A target that
    needs more than the cap cannot be confirmed: ``fit_potential`` says so and runs its budget."""
    need = 2 * bound_width(n, 1) / target
    return int(min(max(8192, math.ceil(need)), max(8192, 64 * batch)))


Z_ONE_SIDED_95 = 1.645
"""Standard-normal quantile of the one-sided 95% upper bound used by the stop rule."""


def describe_chi2(chi2: float, se: float, target: float) -> str:
    """One phrase stating the confirmed χ̂², its standard error and whether the target was met,
    in words that cannot contradict each other (the rule is the one-sided 95% bound)."""
    if math.isnan(se):
        return f"chi2 {chi2:.4f} (windowed mean of the fit's own batches, not confirmed: eval_samples = 0)"
    bound = chi2 + Z_ONE_SIDED_95 * se
    verdict = "target met" if bound <= target else "target not met"
    return f"chi2 {chi2:.4f} ± {se:.4f} (95% upper bound {bound:.4f}; {verdict}: target {target})"
