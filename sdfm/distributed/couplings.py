"""The data-parallel form of every coupling, decided in one place: ``rank_coupling``.

Each rank holds its rows of the global batch (rank r: rows [r b, (r + 1) b), b = batch / ranks).

- ``ReplicatedCoupling`` (independent, exact OT): every rank gathers all rows, runs the single-process
  coupling on the whole batch with the step's shared generator, and keeps the pairs of its own rows,
  so the pairs are exactly those of a single process. Each rank repeats the same small solve
  (exact OT is for n up to a few thousand).
- ``ShardedSinkhornCoupling`` (Sinkhorn, ``sdfm.distributed.sinkhorn``): the ranks solve the global
  problem jointly, each for its own rows, when the global batch has more than
  ``coupling.shard_above`` rows; smaller Sinkhorn solves are replicated like exact OT (they are bound
  by the collectives' latency, not by compute).
- ``SharedPotentialCoupling`` (semidiscrete): rows are matched locally against the whole dataset (or
  a sharded index, ``potential.shard_index``); only rank 0 is given new potentials (by
  ``sdfm.potential_sources``: the worker's snapshots), and a new one is broadcast to all ranks at a
  step boundary, so the worker needs no shared filesystem with the other nodes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from sdfm.config import Config
from sdfm.couplings import Coupling, MinibatchCoupling, Pairs, SinkhornCoupling, build_coupling
from sdfm.couplings.base import CouplingWrapper
from sdfm.couplings.semidiscrete import SemidiscreteCoupling
from sdfm.data import Dataset
from sdfm.distributed.collectives import GroupCollectives, share
from sdfm.distributed.env import ProcessGroup, potential_device
from sdfm.distributed.matching import ShardedMatchIndex
from sdfm.distributed.sinkhorn import ShardedSinkhornCoupling

__all__ = ["ReplicatedCoupling", "SharedPotentialCoupling", "rank_coupling"]


def rank_coupling(cfg: Config, data: Dataset, pg: ProcessGroup, device: torch.device) -> Coupling:
    """This rank's coupling of the global batch: the single-process coupling of ``cfg.coupling`` for
    one process, else its data-parallel form (see the module docstring). The trainer's one call."""
    kind, conditional = cfg.coupling.kind, cfg.data.conditional
    index = None
    index_device = potential_device(pg.env, cfg) if kind == "semidiscrete" else device
    if kind == "semidiscrete" and cfg.potential.shard_index and pg.env.distributed:
        rows = share(len(data), pg.env.rank, pg.env.world_size)
        labels = data.labels[rows] if conditional else None
        p = cfg.potential
        sharded = ShardedMatchIndex(
            data.x[rows].flatten(1),
            labels=labels,
            backend=p.index,
            device=index_device,
            precision=None if p.precision == "auto" else p.precision,
            candidates=p.candidates,
        )
        index = ShardedIndexView(sharded)
    coupling = build_coupling(
        cfg.coupling,
        per_class=conditional,
        dataset=data,
        potential=cfg.potential,
        device=index_device,
        index=index,
    )
    if not pg.env.distributed:
        return coupling
    if isinstance(coupling, SemidiscreteCoupling):
        return SharedPotentialCoupling(coupling, pg)
    if isinstance(coupling, SinkhornCoupling) and cfg.train.batch_size > cfg.coupling.shard_above:
        return ShardedSinkhornCoupling(coupling, GroupCollectives(None, pg.flag_device))
    if isinstance(coupling, MinibatchCoupling):
        return ReplicatedCoupling(coupling, pg.env.rank, device)
    raise TypeError(f"no data-parallel form for {type(coupling).__name__}")


def gather_rows(x: Tensor) -> Tensor:
    """All ranks' equal-sized (b, ...) row blocks concatenated in rank order: (W b, ...)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class ShardedIndexView:
    """The part of ``MatchIndex`` that ``SemidiscreteCoupling`` uses (``search``, ``set_potential``),
    over a ``ShardedMatchIndex``: each rank holds a contiguous N / W of the points, and every search
    is a collective of all ranks."""

    def __init__(self, sharded: ShardedMatchIndex):
        self.sharded = sharded

    def search(self, x: Tensor, query_labels: Tensor | None = None) -> Tensor:
        """(B,) global ids of the matches of this rank's queries x (B, d)."""
        return self.sharded.search(x, query_labels).index

    def set_potential(self, g: Tensor) -> None:
        """g: (N,) the full potential (each rank keeps its shard's part)."""
        self.sharded.set_potential(g)


class ReplicatedCoupling(CouplingWrapper):
    """A minibatch coupling solved on the gathered global batch by every rank (module docstring).

    Args:
        inner: the single-process coupling.
        rank: this rank; its rows are [rank b, (rank + 1) b) of the global batch.
        device: where to gather (CUDA tensors for NCCL, CPU for gloo).
    """

    def __init__(self, inner: MinibatchCoupling, rank: int, device: torch.device):
        super().__init__(inner)
        self.rank, self.device = rank, device

    def pair(self, x0: Tensor, x1: Tensor, labels: Tensor | None, generator: torch.Generator) -> Pairs:
        b, home = x0.shape[0], x0.device
        X0 = gather_rows(x0.to(self.device)).to(home)
        X1 = gather_rows(x1.to(self.device)).to(home)
        L = None if labels is None else gather_rows(labels.to(self.device)).to(home)
        full = self.inner.pair(X0, X1, L, generator)
        rows = slice(self.rank * b, (self.rank + 1) * b)
        return Pairs(
            x0=x0,
            x1=full.x1[rows],
            labels=None if full.labels is None else full.labels[rows],
            index=full.index[rows],
        )


class SharedPotentialCoupling(CouplingWrapper):
    """The semidiscrete coupling of one rank, with the potential kept equal on all ranks.

    Offers the potential interface of ``SemidiscreteCoupling`` (``set_potential``, ``watch``, ``g``,
    ``version``, ``chi2``): rank 0 sets or watches the potential, and ``poll`` (every step boundary,
    and once after the potential is first set) gives every rank rank 0's potential whenever its
    version changed.

    Args:
        inner: this rank's ``SemidiscreteCoupling`` (full dataset, full potential).
        pg: the job's process groups; rank 0 is the one that watches the worker's snapshots.
    """

    def __init__(self, inner: SemidiscreteCoupling, pg: ProcessGroup):
        super().__init__(inner)
        self.pg = pg
        self._shared_version = inner.version

    @property
    def g(self) -> Tensor:
        return self.inner.g

    @property
    def version(self) -> int:
        return self.inner.version

    @property
    def chi2(self) -> float:
        return self.inner.chi2

    def set_potential(
        self, g: Tensor, version: int, chi2: float = float("nan"), published_at: float | None = None
    ) -> None:
        """This rank's potential (call it on rank 0; ``poll`` shares it)."""
        self.inner.set_potential(g, version, chi2, published_at)

    @property
    def prefetchable(self) -> bool:
        return self.inner.prefetchable  # pairing is local; only poll (main thread) is a collective

    def pair(self, x0: Tensor, x1: Tensor, labels: Tensor | None, generator: torch.Generator) -> Pairs:
        return self.inner.pair(x0, x1, labels, generator)

    @property
    def published_at(self) -> float:
        return self.inner.published_at

    def poll(self) -> bool:
        """A potential that rank 0 was given since the last call (by ``sdfm.potential_sources``) reaches
        every rank (a collective)."""
        changed = False
        if self.pg.env.is_main:
            changed = self.inner.version != self._shared_version
        if not self.pg.any(changed):
            return False
        inner = self.inner
        msg = (inner.g, inner.version, inner.chi2, inner.published_at) if self.pg.env.is_main else None
        g, version, chi2, published_at = self.pg.broadcast_object(msg)
        if not self.pg.env.is_main:
            inner.set_potential(g, version, chi2, published_at)
        self._shared_version = version
        return True

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.inner.load_state_dict(state)
        self._shared_version = self.inner.version
