"""Principal components of the data: semidiscrete matching and fitting can run in the top p of them.

With ``pca_dim = p > 0``, the keys are the top-p principal components of the centered data,
(y_j - m) V, and the queries are projected as x V. Since <x, y_j> = <x, m> + <x, y_j - m> and the
first term does not depend on j, centering changes no argmax; the projection does: matching happens
in the PCA space, i.e. it maximizes <x V, (y_j - m) V> + g_j, and a potential must be fitted in the
same space (``PotentialFitter(pca_dim=p)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sdfm.data.points import Points

__all__ = ["FIT_COST", "FIT_ROWS", "PCA", "fit_rows"]

FIT_ROWS = 65_536
"""Most points a PCA is fitted on (see ``PCA.fit``)."""
FIT_COST = 4e10
"""Multiply-adds of the covariance a PCA fit may spend (rows x d²) before it samples fewer rows: about
10 s on one CPU core. Fashion-MNIST's 60,000 x 784 fits whole (3.7e10); at d = 3,072 (32 x 32 RGB)
8,192 sampled rows."""


def fit_rows(n: int, d: int) -> int:
    """How many of n points of dimension d a PCA is fitted on: all up to the cost ``FIT_COST`` and at
    most ``FIT_ROWS``, at least 8,192 (or n)."""
    return min(n, FIT_ROWS, max(8192, int(FIT_COST // max(1, d * d))))


@dataclass
class PCA:
    """Top-p principal directions of the data: matching happens in this p-dimensional space.

    Attributes:
        mean: (d,) float32 mean m of the data.
        components: (d, p) float32 orthonormal principal directions V, by decreasing variance.
        explained: fraction of the data's variance kept by the p directions.
    """

    mean: Tensor
    components: Tensor
    explained: float

    @classmethod
    def fit(cls, y: Tensor | Points, p: int, device: torch.device | str | None = None) -> PCA:
        """Fit on y (N, d) by an eigendecomposition of the float64 covariance on the CPU (deterministic,
        and cheaper than an SVD of the (N, d) matrix when N >> d). Each direction's sign is fixed so
        that its largest entry is positive, so the same data always gives the same V. Above
        ``fit_rows`` points the covariance is that of that many of them chosen with a fixed seed:
        its cost is rows x d² (a million images at d = 3,072 would take hours in full), so it is
        capped (``fit_rows``); the top directions of thousands of points are those of the data to
        within sampling noise. ``device``: where the result lives (default: y's; the host for ``Points``)."""
        n = len(y)
        rows = fit_rows(n, y.shape[1])
        if rows < n:
            pick = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:rows].sort().values
            sample = y.take(pick) if isinstance(y, Points) else y[pick.to(y.device)]
        else:
            sample = y.dense() if isinstance(y, Points) else y
        device = device if device is not None else (torch.device("cpu") if isinstance(y, Points) else y.device)
        y64 = sample.detach().to("cpu", torch.float64)
        mean = y64.mean(0)
        centered = y64 - mean
        cov = centered.T @ centered / max(len(y64) - 1, 1)
        values, vectors = torch.linalg.eigh(cov)  # ascending
        order = torch.argsort(values, descending=True)[:p]
        v = vectors[:, order]
        sign = torch.sign(v.gather(0, v.abs().argmax(0, keepdim=True)))
        v = v * torch.where(sign == 0, 1.0, sign)
        total = values.clamp_min(0).sum().item()
        explained = values[order].clamp_min(0).sum().item() / total if total > 0 else 1.0
        return cls(mean=mean.float().to(device), components=v.float().to(device), explained=explained)

    def keys(self, y: Tensor) -> Tensor:
        """Project data points: (N, d) -> (N, p) = (y - m) V."""
        return (y.float() - self.mean.to(y.device)) @ self.components.to(y.device)

    def queries(self, x: Tensor) -> Tensor:
        """Project queries: (B, d) -> (B, p) = x V (the <x, m> term is the same for every j)."""
        return x.float() @ self.components.to(x.device)
