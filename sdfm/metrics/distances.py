"""Distances between two samples: exact W2, kernel MMD and the Fréchet distance of Gaussian fits.

All of them compute in float64 on the CPU: they are evaluation metrics on a few thousand points, where
a float32 round-off of a cost or a covariance would be larger than the differences being measured.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

ArrayLike = Tensor | np.ndarray

# Largest n*m for the dense cost matrices below: 25e6 float64 entries is 200 MB, and the network
# simplex behind exact W2 takes minutes past that.
MAX_PAIRS = 25_000_000


def _as_float64_rows(name: str, x: ArrayLike) -> np.ndarray:
    """(n, *shape) tensor or array -> (n, prod(shape)) float64 array, rejecting empty or 1-D input."""
    if isinstance(x, Tensor):
        x = x.detach().cpu().to(torch.float64).numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must have shape (n, d) or (n, *shape) with n >= 1, got {x.shape}")
    return x.reshape(x.shape[0], -1)


def _check_pair(x: np.ndarray, y: np.ndarray, what: str) -> None:
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x has {x.shape[1]} features per point but y has {y.shape[1]}")
    if x.shape[0] * y.shape[0] > MAX_PAIRS:
        raise ValueError(
            f"{what} of {x.shape[0]} x {y.shape[0]} points needs a dense {x.shape[0]}x{y.shape[0]} cost "
            f"matrix (more than {MAX_PAIRS:.0e} entries); subsample both sets (e.g. 5,000 points each)"
        )


def wasserstein2(x: ArrayLike, y: ArrayLike) -> float:
    """Exact 2-Wasserstein distance between two empirical distributions with uniform weights.

    Solves the discrete OT problem min_P <P, C> with C_ij = |x_i - y_j|^2 exactly (POT's network
    simplex, ``ot.emd2``) in float64 and returns sqrt of the optimal cost. Note that W2 between two
    finite samples overestimates W2 between the underlying distributions, increasingly so in high
    dimension; compare values computed at the same sample sizes.

    Args:
        x: (n, d) or (n, *shape) first sample; trailing dimensions are flattened.
        y: (m, d) or (m, *shape) second sample, same number of features as x.

    Returns:
        W2(x, y) >= 0, in the units of x.

    Raises:
        ValueError: if the feature sizes differ, or n*m exceeds ``MAX_PAIRS`` (subsample first).
    """
    # POT is imported here, not at module level: importing it probes optional GPU backends (KeOps),
    # which every `import sdfm.metrics` would otherwise pay for (``pot`` keeps its notice quiet).
    from sdfm.pot import pot

    ot = pot()

    xs, ys = _as_float64_rows("x", x), _as_float64_rows("y", y)
    _check_pair(xs, ys, "exact W2")
    n, m = xs.shape[0], ys.shape[0]
    cost = ot.dist(xs, ys, metric="sqeuclidean")
    a, b = np.full(n, 1.0 / n), np.full(m, 1.0 / m)
    # The default iteration cap (1e5) stops the network simplex early from a few hundred points on;
    # an unconverged plan gives a cost that is too large, so allow plenty and check.
    value, log = ot.emd2(a, b, cost, numItermax=max(1_000_000, 50 * n * m), log=True)
    if log.get("warning"):
        raise RuntimeError(f"exact W2 did not converge: {log['warning']}")
    return float(np.sqrt(max(float(value), 0.0)))


def _median_bandwidth(x: Tensor, y: Tensor, max_rows: int = 1000) -> float:
    """Median pairwise Euclidean distance over pairs i < j of the pooled rows of x (n, d), y (m, d).

    At most ``max_rows`` evenly spaced rows of each are used: the median of ~2e6 pairs is as good a
    scale as that of all of them, and the full pooled matrix would be 4x the size of the MMD's own.
    """
    z = torch.cat([x[:: max(1, len(x) // max_rows)], y[:: max(1, len(y) // max_rows)]])
    iu = torch.triu_indices(len(z), len(z), offset=1)
    return float(torch.cdist(z, z)[iu[0], iu[1]].median())


def mmd(x: ArrayLike, y: ArrayLike, bandwidths: Sequence[float] | None = None) -> float:
    """Unbiased estimate of the squared maximum mean discrepancy with a sum of Gaussian kernels.

    k(a, b) = sum_s exp(-|a - b|^2 / (2 s^2)) over the bandwidths s, and

        MMD^2 = 1/(n(n-1)) sum_{i != i'} k(x_i, x_i') + 1/(m(m-1)) sum_{j != j'} k(y_j, y_j')
                - 2/(nm) sum_{i, j} k(x_i, y_j).

    The estimate is unbiased, so it scatters around 0 (and can be slightly negative) when x and y
    come from the same distribution.

    Args:
        x: (n, d) or (n, *shape) first sample, n >= 2; trailing dimensions are flattened.
        y: (m, d) or (m, *shape) second sample, m >= 2.
        bandwidths: kernel widths s (in the units of x). Default: the median pairwise distance of
            the pooled sample times (0.5, 1, 2), so the value does not depend on the data's scale
            choice; pass fixed widths to compare values across runs on the same data.

    Returns:
        The squared MMD estimate.
    """
    xs = torch.from_numpy(_as_float64_rows("x", x))
    ys = torch.from_numpy(_as_float64_rows("y", y))
    if len(xs) < 2 or len(ys) < 2:
        raise ValueError(f"mmd needs at least 2 points per sample, got {len(xs)} and {len(ys)}")
    _check_pair(xs.numpy(), ys.numpy(), "mmd")
    if bandwidths is None:
        base = _median_bandwidth(xs, ys)
        if base == 0.0:  # more than half the pairs coincide: any width separates nothing better
            base = 1.0
        bandwidths = [0.5 * base, base, 2.0 * base]
    if len(bandwidths) == 0 or min(bandwidths) <= 0:
        raise ValueError(f"bandwidths must be a non-empty list of positive widths, got {list(bandwidths)}")

    def kernel(a: Tensor, b: Tensor) -> Tensor:
        dist2 = torch.cdist(a, b).pow(2)
        return sum(torch.exp(-dist2 / (2.0 * s * s)) for s in bandwidths)

    n, m = len(xs), len(ys)
    k_xx, k_yy, k_xy = kernel(xs, xs), kernel(ys, ys), kernel(xs, ys)
    # Dropping the diagonal (k(x, x) = number of kernels) is what makes the estimate unbiased.
    term_xx = (k_xx.sum() - k_xx.diagonal().sum()) / (n * (n - 1))
    term_yy = (k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return float(term_xx + term_yy - 2.0 * k_xy.mean())


def gaussian_stats(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of a set of feature vectors, in float64.

    Args:
        features: (n, d) feature vectors, n >= 2 (trailing dimensions are flattened).

    Returns:
        mu: (d,) mean.
        cov: (d, d) unbiased sample covariance (divides by n - 1).
    """
    f = _as_float64_rows("features", features)
    if len(f) < 2:
        raise ValueError(f"gaussian_stats needs at least 2 feature vectors, got {len(f)}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def frechet_distance(mu1: ArrayLike, cov1: ArrayLike, mu2: ArrayLike, cov2: ArrayLike) -> float:
    """Fréchet distance (squared W2) between the Gaussians N(mu1, cov1) and N(mu2, cov2).

    FD = |mu1 - mu2|^2 + tr(cov1) + tr(cov2) - 2 tr((cov1 cov2)^{1/2}), computed as in the reference
    FID code (pytorch-fid): ``scipy.linalg.sqrtm`` of cov1 @ cov2; if that is not finite (singular
    product, e.g. fewer samples than features) the covariances get 1e-6 added to their diagonals; a
    complex result with a negligible imaginary part (round-off) is replaced by its real part.

    Args:
        mu1: (d,) mean of the first Gaussian.
        cov1: (d, d) covariance of the first Gaussian.
        mu2: (d,) mean of the second Gaussian.
        cov2: (d, d) covariance of the second Gaussian.

    Returns:
        The Fréchet distance, clipped at 0 (it is >= 0 in exact arithmetic; a tiny negative value is
        round-off).

    Raises:
        ValueError: on mismatched shapes, or when the matrix square root has a large imaginary part
            (the covariances are not symmetric positive semi-definite).
    """
    mu1, mu2 = (np.atleast_1d(np.asarray(_to_numpy(m), dtype=np.float64)) for m in (mu1, mu2))
    cov1, cov2 = (np.atleast_2d(np.asarray(_to_numpy(c), dtype=np.float64)) for c in (cov1, cov2))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or cov1.shape != (d, d) or cov2.shape != (d, d):
        raise ValueError(
            f"frechet_distance needs means (d,) and covariances (d, d); got {mu1.shape}, {cov1.shape}, "
            f"{mu2.shape}, {cov2.shape}"
        )
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(cov1 @ cov2)
    if not np.isfinite(covmean).all():
        offset = np.eye(d) * 1e-6
        covmean = scipy.linalg.sqrtm((cov1 + offset) @ (cov2 + offset))
    if np.iscomplexobj(covmean):
        # Same tolerance as pytorch-fid: round-off gives imaginary parts of order 1e-8 or so.
        if not np.allclose(np.diagonal(covmean).imag, 0.0, atol=1e-3):
            raise ValueError(
                f"sqrt(cov1 @ cov2) has imaginary parts up to {np.abs(covmean.imag).max():.3g}; "
                "are both covariances symmetric positive semi-definite?"
            )
        covmean = covmean.real
    value = diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(covmean)
    return float(max(value, 0.0))


def _to_numpy(a: ArrayLike) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, Tensor) else a
