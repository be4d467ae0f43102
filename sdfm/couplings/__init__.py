"""Couplings: how a batch of noise is paired with data (independent, exact OT, entropic Sinkhorn)."""

from __future__ import annotations

from sdfm.config import CouplingConfig
from sdfm.couplings.base import Coupling, Pairs
from sdfm.couplings.exact import ExactOTCoupling
from sdfm.couplings.independent import IndependentCoupling
from sdfm.couplings.sinkhorn import SinkhornCoupling, SinkhornResult, sinkhorn
from sdfm.errors import UserError

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

KINDS = ("independent", "exact", "sinkhorn")


def build_coupling(cfg: CouplingConfig, per_class: bool) -> Coupling:
    """The coupling that ``cfg.kind`` names; ``per_class`` keeps pairs within a class."""
    if cfg.kind == "independent":
        return IndependentCoupling(per_class=per_class)
    if cfg.kind == "exact":
        return ExactOTCoupling(cost=cfg.cost, per_class=per_class)
    if cfg.kind == "sinkhorn":
        return SinkhornCoupling(
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
