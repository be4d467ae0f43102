"""The few reductions across ranks that a solver needs, behind one small interface.

A solver whose rows may be split over the ranks of a process group (the Sinkhorn loop of
``sdfm.ot.sinkhorn``) is written once, against ``Collectives``: it asks for a sum over ranks, a
logsumexp over ranks, the row counts of every rank and rank 0's seeds. ``LOCAL`` answers all of them
for a single process without doing anything, so the single-process solver is the same loop with no
communication at all. ``sdfm.distributed.collectives.GroupCollectives`` answers them over a
``torch.distributed`` process group.

The interface is defined here, beside the solvers, and not in ``sdfm.distributed``: library code
never imports the distributed layer; the distributed layer implements what the library asks for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

__all__ = ["LOCAL", "Collectives", "GatheredRows", "LocalCollectives", "share"]


@dataclass
class GatheredRows:
    """The rows of every rank, concatenated in rank order.

    Attributes:
        rows: (sum_r n_r, *shape) all rows; rank r's rows are rows[offsets[r] : offsets[r] + counts[r]].
        counts: n_r of every rank.
        offsets: global id of every rank's first row.
        rank: this process's rank in the group.
    """

    rows: Tensor
    counts: list[int]
    offsets: list[int]
    rank: int

    @property
    def offset(self) -> int:
        """Global id of this rank's first row."""
        return self.offsets[self.rank]

    @property
    def local(self) -> slice:
        """Where this rank's own rows are in ``rows``."""
        return slice(self.offset, self.offset + self.counts[self.rank])


class Collectives(Protocol):
    """Reductions over the ranks that share a problem. Every rank must make the same calls in the
    same order (each one is a collective); results are identical on every rank.

    Attributes:
        rank: this process's rank (0 for one process).
        world: number of ranks (1 for one process).
        comm_s: seconds spent inside collectives so far (waiting for slower ranks included).
    """

    rank: int
    world: int
    comm_s: float

    def sum(self, t: Tensor) -> Tensor:
        """Elementwise sum of t over ranks, added in rank order: the same bits on every rank."""
        ...

    def lse(self, part: Tensor) -> Tensor:
        """Elementwise logsumexp over ranks of per-rank partial logsumexps (-inf: nothing here)."""
        ...

    def reduce_sum(self, t: Tensor) -> Tensor:
        """Elementwise sum of a large t over ranks (an all-reduce): the same on every rank, in an order
        the backend chooses (exact for integer-valued sums such as counts)."""
        ...

    def counts(self, n: int) -> list[int]:
        """Every rank's n, in rank order."""
        ...

    def broadcast(self, t: Tensor) -> Tensor:
        """Rank 0's t (same shape and dtype on every rank)."""
        ...

    def gather_rows(self, x: Tensor) -> GatheredRows:
        """All ranks' rows (counts may differ between ranks), concatenated in rank order."""
        ...


class LocalCollectives:
    """``Collectives`` of a single process: every reduction is the identity."""

    rank = 0
    world = 1
    comm_s = 0.0

    def sum(self, t: Tensor) -> Tensor:
        return t

    def lse(self, part: Tensor) -> Tensor:
        return part

    def reduce_sum(self, t: Tensor) -> Tensor:
        return t

    def counts(self, n: int) -> list[int]:
        return [n]

    def broadcast(self, t: Tensor) -> Tensor:
        return t

    def gather_rows(self, x: Tensor) -> GatheredRows:
        return GatheredRows(rows=x, counts=[x.shape[0]], offsets=[0], rank=0)


def share(n: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s contiguous share of n rows (the first n % world ranks get one more)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


LOCAL = LocalCollectives()
"""The collectives of a single process (stateless, shared)."""
