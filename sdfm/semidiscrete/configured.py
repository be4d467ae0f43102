"""The config glue of a potential fit: what a run's config says about its potential problem
(``fit_setup``), the step budget it implies (``step_cap``), and the one "fit, then save with metadata"
of ``sdfm fit-potential`` and of the fit before training (``fit_and_save``)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from sdfm.config import Config
from sdfm.data import Dataset
from sdfm.ot.collectives import LOCAL, Collectives
from sdfm.semidiscrete.fit import FitBudget, FitResult, fit_potential
from sdfm.semidiscrete.fitter import FitterOptions, PotentialFitter
from sdfm.semidiscrete.potential_file import save_potential
from sdfm.semidiscrete.problem import SampleSource

__all__ = ["DEFAULT_STEPS", "FitSetup", "fit_and_save", "fit_setup", "step_cap"]


@dataclass
class FitSetup:
    """The potential problem a run's config describes (shared by the worker, the fit before training
    and ``sdfm fit-potential``, so all three solve the same problem).

    Attributes:
        options: the fitter's settings ([potential] section; seed = train.seed + 1).
        budget: the fit's budget (potential.max_steps, target_chi2, max_seconds).
        labels: (N,) classes for a conditional run, else None.
        sample_source: the source distribution when it is not standard normal, else None.
    """

    options: FitterOptions
    budget: FitBudget
    labels: Tensor | None
    sample_source: SampleSource | None

    def fitter(
        self, y: Tensor, device: torch.device | str | None = None, comm: Collectives = LOCAL
    ) -> PotentialFitter:
        """A fresh ``PotentialFitter`` of this problem over the points y (N, d), on ``device``, with
        every step shared by the ranks of ``comm``."""
        return PotentialFitter(
            y, self.options, labels=self.labels, sample_source=self.sample_source, device=device, comm=comm
        )


DEFAULT_STEPS = 5000
"""The step cap of a fit given neither a step nor a time budget."""


def step_cap(max_steps: int | None, max_seconds: float | None) -> int:
    """The fit's step budget: ``max_steps`` when given; none (a time budget alone binds) when only
    ``max_seconds`` is; else ``DEFAULT_STEPS``. So ``--potential.max-seconds 30`` runs for 30 s."""
    if max_steps:
        return max_steps
    return sys.maxsize if max_seconds else DEFAULT_STEPS


def fit_setup(cfg: Config, data: Dataset) -> FitSetup:
    """The ``FitSetup`` of a run's config and its data."""
    p = cfg.potential
    source = None
    if cfg.data.source != "normal":

        def source(n: int, gen: torch.Generator) -> Tensor:
            return data.source.draw(n, data.shape, gen).flatten(1)

    options = FitterOptions(
        epsilon=p.epsilon,
        method=p.method,
        batch_size=p.batch_size,
        lr=p.lr or None,
        pca_dim=p.pca_dim,
        backend=p.index,
        seed=cfg.train.seed + 1,
        precision=None if p.precision == "auto" else p.precision,
        candidates=p.candidates,
    )
    max_seconds = p.max_seconds or None
    budget = FitBudget(
        max_steps=step_cap(p.max_steps, max_seconds), target_chi2=p.target_chi2, max_seconds=max_seconds
    )
    return FitSetup(options, budget, data.labels if cfg.data.conditional else None, source)


def fit_and_save(
    cfg: Config,
    data: Dataset,
    path: Path,
    *,
    device: torch.device | str | None = None,
    log: Callable[[str], None] | None = print,
    state_path: Path | None = None,
) -> FitResult:
    """Fit the potential of a run's config over its data on ``device`` (the index, the noise draws and
    the SGD on g) and save it at ``path`` (version 1, with its χ̂², ε, PCA dimension and the data's
    fingerprint): ``sdfm fit-potential`` and the fit before training. ``state_path``: where SIGTERM
    saves an interrupted fit, and where the next call continues it from (deleted once saved)."""
    setup = fit_setup(cfg, data)
    result = fit_potential(
        data.x.flat(),
        setup.options,
        setup.budget,
        labels=setup.labels,
        sample_source=setup.sample_source,
        device=device,
        progress=log is not None,
        log=log,
        state_path=state_path,
    )
    save_potential(
        path,
        result.g,
        version=1,
        step=result.steps,
        epsilon=setup.options.epsilon,
        chi2=result.chi2,
        fingerprint=data.fingerprint,
        pca_dim=setup.options.pca_dim,
    )
    if state_path is not None:
        Path(state_path).unlink(missing_ok=True)
    return result
