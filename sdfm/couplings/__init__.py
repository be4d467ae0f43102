"""Couplings: how a batch of noise is paired with data (independent, exact OT, entropic Sinkhorn,
semidiscrete OT against the whole dataset)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from sdfm.config import CouplingConfig, PotentialConfig
from sdfm.couplings.base import Coupling, Pairs
from sdfm.couplings.exact import ExactOTCoupling
from sdfm.couplings.independent import IndependentCoupling
from sdfm.couplings.sinkhorn import SinkhornCoupling, SinkhornResult, sinkhorn
from sdfm.errors import UserError

if TYPE_CHECKING:
    from sdfm.data import Dataset

__all__ = [
    "Coupling",
    "ExactOTCoupling",
    "IndependentCoupling",
    "Pairs",
    "SinkhornCoupling",
    "SinkhornResult",
    "build_coupling",
    "sinkhorn",
]

KINDS = ("independent", "exact", "sinkhorn", "semidiscrete")


def build_coupling(
    cfg: CouplingConfig,
    per_class: bool,
    *,
    dataset: Dataset | None = None,
    potential: PotentialConfig | None = None,
    warn: Callable[[str], None] = print,
    sharded: bool = False,
    device: torch.device | None = None,
    index=None,
) -> Coupling:
    """The coupling that ``cfg.kind`` names; ``per_class`` keeps pairs within a class.

    The semidiscrete coupling matches against the whole ``dataset`` with the ``potential`` settings
    (both required for it); ``warn`` receives its one-line warnings (stale or rejected snapshots).
    ``sharded``: the Sinkhorn coupling of the global batch of a data-parallel job, solved jointly by
    the ranks of the default process group (``sdfm.distributed.sinkhorn``). ``device``: where the
    semidiscrete coupling's matching index lives (default: the dataset's device); ``index``: a
    prebuilt matching index for it (the sharded one of a data-parallel job).
    """
    if cfg.kind == "semidiscrete":
        if dataset is None or potential is None:
            raise ValueError("the semidiscrete coupling needs the dataset and the [potential] config")
        from sdfm.couplings.semidiscrete import SemidiscreteCoupling

        return SemidiscreteCoupling(
            dataset.x,
            dataset.labels,
            potential,
            dataset.fingerprint,
            per_class=per_class,
            warn=warn,
            device=device,
            index=index,
        )
    if cfg.kind == "independent":
        return IndependentCoupling(per_class=per_class)
    if cfg.kind == "exact":
        return ExactOTCoupling(cost=cfg.cost, per_class=per_class)
    if cfg.kind == "sinkhorn":
        if sharded:
            from sdfm.distributed.sinkhorn import ShardedSinkhornCoupling as cls
        else:
            cls = SinkhornCoupling
        return cls(
            epsilon=cfg.epsilon,
            cost=cfg.cost,
            backend=cfg.backend,
            max_iter=cfg.max_iter,
            tol=cfg.tol,
            check_every=cfg.check_every,
            warm_start=cfg.warm_start,
            anneal_from=cfg.anneal_from,
            block_size=cfg.block_size,
            per_class=per_class,
        )
    choices = ", ".join(repr(k) for k in KINDS)
    raise UserError(f"coupling.kind = {cfg.kind!r} is not a known choice; use one of {choices}")
