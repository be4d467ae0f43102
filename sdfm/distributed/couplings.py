"""Couplings of the global batch of a data-parallel step.

Each rank holds its rows of the global batch (rank r: rows [r b, (r + 1) b), b = batch / ranks).

- ``GatheredCoupling`` (independent, exact OT): every rank gathers all rows, runs the single-process
  coupling on the whole batch with the step's shared generator, and keeps the pairs of its own rows,
  so the pairs are exactly those of a single process. Each rank repeats the same small solve
  (exact OT is for n up to a few thousand); the large-batch case is ``ShardedSinkhornCoupling``.
- ``SharedPotentialCoupling`` (semidiscrete): rows are matched locally against the whole dataset; only
  rank 0 watches for potentials published by the worker, and a new one is broadcast to all ranks at
  a step boundary, so the worker needs no shared filesystem with the other nodes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from sdfm.couplings.base import Coupling, Pairs
from sdfm.distributed.env import ProcessGroup


def gather_rows(x: Tensor) -> Tensor:
    """All ranks' equal-sized (b, ...) row blocks concatenated in rank order: (W b, ...)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class ShardedIndexView:
    """The part of ``MatchIndex`` that ``SemidiscreteCoupling`` uses (``search``, ``set_potential``),
    over a ``ShardedMatchIndex``: each rank holds a contiguous N / W of the points, and every search
    is a collective of all ranks."""

    def __init__(self, sharded):
        self.sharded = sharded

    def search(self, x: Tensor, query_labels: Tensor | None = None) -> Tensor:
        """(B,) global ids of the matches of this rank's queries x (B, d)."""
        return self.sharded.search(x, query_labels).index

    def set_potential(self, g: Tensor) -> None:
        """g: (N,) the full potential (each rank keeps its shard's part)."""
        self.sharded.set_potential(g)


def shard_rows(n: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s contiguous share of n rows (the first n % world ranks get one more)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


class _RankCoupling(Coupling):
    """A rank's view of a single-process coupling ``inner``: diagnostics and state are the inner's."""

    def __init__(self, inner: Coupling):
        self.inner = inner
        self.per_class = inner.per_class

    def stats(self) -> dict[str, float]:
        return self.inner.stats()

    def state_dict(self) -> dict[str, Tensor]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.inner.load_state_dict(state)


class GatheredCoupling(_RankCoupling):
    """A minibatch coupling solved on the gathered global batch (see the module docstring).

    Args:
        inner: the single-process coupling.
        rank: this rank; its rows are [rank b, (rank + 1) b) of the global batch.
        device: where to gather (CUDA tensors for NCCL, CPU for gloo).
    """

    def __init__(self, inner: Coupling, rank: int, device: torch.device):
        super().__init__(inner)
        self.rank, self.device = rank, device

    def match(self, x0: Tensor, x1: Tensor, generator: torch.Generator) -> Tensor:
        raise NotImplementedError("GatheredCoupling pairs the global batch: use pair()")

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


class SharedPotentialCoupling(_RankCoupling):
    """The semidiscrete coupling of one rank, with the potential kept equal on all ranks.

    Args:
        inner: this rank's ``SemidiscreteCoupling`` (full dataset, full potential).
        pg: the job's process groups; rank 0 is the one that watches the worker's snapshots.
    """

    def __init__(self, inner: Coupling, pg: ProcessGroup):
        super().__init__(inner)
        self.pg = pg

    def __getattr__(self, name: str):
        # watch, set_potential, g, version, ... of the semidiscrete coupling
        return getattr(self.inner, name)

    def match(self, x0: Tensor, x1: Tensor, generator: torch.Generator) -> Tensor:
        return self.inner.match(x0, x1, generator)

    def pair(self, x0: Tensor, x1: Tensor, labels: Tensor | None, generator: torch.Generator) -> Pairs:
        return self.inner.pair(x0, x1, labels, generator)

    def poll(self) -> bool:
        """Rank 0 polls the worker's snapshot; a new potential reaches every rank (a collective)."""
        changed = self.pg.any(self.inner.poll() if self.pg.env.is_main else False)
        if changed:
            self.share()
        return changed

    def share(self) -> None:
        """Give every rank rank 0's potential."""
        inner = self.inner
        msg = (inner.g, inner.version, inner.chi2, inner.published_at) if self.pg.env.is_main else None
        g, version, chi2, published_at = self.pg.broadcast_object(msg)
        if not self.pg.env.is_main:
            inner.set_potential(g, version, chi2, published_at)
