"""Couplings: how a batch of noise is paired with data (independent, exact OT, entropic Sinkhorn,
semidiscrete OT against the whole dataset). Single-process library code: the data-parallel form of
each coupling is decided in one place, ``sdfm.distributed.couplings.rank_coupling``."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from sdfm.config import CouplingConfig, PotentialConfig
from sdfm.couplings.base import Coupling, CouplingWrapper, MinibatchCoupling, Pairs, class_blocks
from sdfm.couplings.exact import ExactOTCoupling
from sdfm.couplings.independent import IndependentCoupling
from sdfm.couplings.semidiscrete import SemidiscreteCoupling
from sdfm.couplings.sinkhorn import SinkhornCoupling
from sdfm.errors import UserError
from sdfm.ot.reductions import SUPPORTED
from sdfm.ot.sinkhorn import SinkhornOptions

if TYPE_CHECKING:
    from sdfm.data import Dataset

__all__ = [
    "Coupling",
    "CouplingWrapper",
    "ExactOTCoupling",
    "IndependentCoupling",
    "MinibatchCoupling",
    "Pairs",
    "SemidiscreteCoupling",
    "SinkhornCoupling",
    "build_coupling",
    "check_coupling_config",
    "class_blocks",
    "sinkhorn_options",
]

KINDS = ("independent", "exact", "sinkhorn", "semidiscrete")


def sinkhorn_options(cfg: CouplingConfig) -> SinkhornOptions:
    """The solver settings of a [coupling] config: every ``SinkhornOptions`` field the config has, by
    name (so a new solver setting is one field here and one documented key in the config)."""
    names = [f.name for f in dataclasses.fields(SinkhornOptions) if hasattr(cfg, f.name)]
    return SinkhornOptions(**{name: getattr(cfg, name) for name in names})


def check_coupling_config(cfg: CouplingConfig) -> None:
    """Raise UserError (one line naming the keys and the fix) for [coupling] settings that no batch
    can run with, before anything is built or written."""
    if cfg.kind != "sinkhorn":
        return
    problem = sinkhorn_options(cfg).problem()
    if problem is None:
        return
    if cfg.precision not in SUPPORTED[cfg.backend]:
        able = " or ".join(repr(b) for b, p in SUPPORTED.items() if cfg.precision in p)
        raise UserError(
            f"coupling.precision = {cfg.precision!r} cannot be computed by coupling.backend = {cfg.backend!r} "
            f"(it computes in {', '.join(SUPPORTED[cfg.backend])}); use coupling.backend = {able}, "
            "or coupling.precision = 'fp32'"
        )
    raise UserError(
        f"[coupling] settings are invalid: {problem}; fix them in the config or with --coupling.*"
    )


def build_coupling(
    cfg: CouplingConfig,
    per_class: bool,
    *,
    dataset: Dataset | None = None,
    potential: PotentialConfig | None = None,
    device: torch.device | None = None,
    index=None,
) -> Coupling:
    """The single-process coupling that ``cfg.kind`` names; ``per_class`` keeps pairs within a class.

    The semidiscrete coupling matches against the whole ``dataset`` with the ``potential`` settings
    (both required for it). ``device``: where the semidiscrete coupling's matching index lives (default: the dataset's
    device); ``index``: a prebuilt matching index for it (the sharded one of a data-parallel job).
    """
    if cfg.kind == "semidiscrete":
        if dataset is None or potential is None:
            raise ValueError("the semidiscrete coupling needs the dataset and the [potential] config")
        return SemidiscreteCoupling(
            dataset.x,
            dataset.labels,
            potential,
            dataset.fingerprint,
            per_class=per_class,
            device=device,
            index=index,
        )
    if cfg.kind == "independent":
        return IndependentCoupling(per_class=per_class)
    if cfg.kind == "exact":
        return ExactOTCoupling(cost=cfg.cost, solver=cfg.exact_solver, per_class=per_class)
    if cfg.kind == "sinkhorn":
        return SinkhornCoupling(sinkhorn_options(cfg), warm_start=cfg.warm_start, per_class=per_class)
    choices = ", ".join(repr(k) for k in KINDS)
    raise UserError(f"coupling.kind = {cfg.kind!r} is not a known choice; use one of {choices}")
