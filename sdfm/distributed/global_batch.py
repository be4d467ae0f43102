"""``GlobalBatch``: the coupling of the global batch inside a user's own ``torch.distributed`` job.

Each rank passes its own rows (x0, x1, labels) of equal size b; every rank gets the pairs of its rows
in the coupling of all W b rows, the pairs one process would get on the concatenated batch (rank r's
rows are [r b, (r + 1) b)). Exact OT and the independent coupling gather the batch and solve it on
every rank (``ReplicatedCoupling``); Sinkhorn above ``shard_above`` rows is solved jointly by the
ranks, each for its own rows (``ShardedSinkhornCoupling``). The same code as sdfm's trainer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from sdfm.couplings.base import Coupling, MinibatchCoupling, Pairs
from sdfm.couplings.sinkhorn import SinkhornCoupling
from sdfm.distributed.collectives import GroupCollectives
from sdfm.distributed.couplings import ReplicatedCoupling
from sdfm.distributed.sinkhorn import ShardedSinkhornCoupling

__all__ = ["GlobalBatch"]


class GlobalBatch:
    """A minibatch coupling of the global batch across the ranks of the default process group.

    Args:
        coupling: ``Independent()``, ``ExactOT()`` or ``Sinkhorn(...)`` (its settings and per-class
            matching carry over).
        shard_above: a Sinkhorn batch of more global rows is solved sharded, a smaller one on every rank.
        device: where the rows are gathered: the CPU for gloo, this rank's GPU for NCCL (default:
            x0's device).

    Call it with this rank's x0 (b, *shape), x1 (b, *shape), labels (b,) and a generator seeded the
    same on every rank (None: rank 0 draws a seed from torch's global generator and broadcasts it).
    ``Pairs.index`` holds positions in the global batch.

    Example:
        >>> coupling = sdfm.GlobalBatch(sdfm.ExactOT())   # after dist.init_process_group(...)
        >>> pairs = coupling(x0, x1)                       # this rank's rows, paired globally
    """

    def __init__(self, coupling: Coupling, *, shard_above: int = 4096, device: torch.device | str | None = None):
        if not isinstance(coupling, MinibatchCoupling):
            raise TypeError(
                f"GlobalBatch couples minibatches; {type(coupling).__name__} is not a minibatch coupling "
                "(a semidiscrete coupling pairs each rank's rows against the whole dataset already)"
            )
        self.coupling, self.shard_above, self.device = coupling, shard_above, device

    def __call__(
        self,
        x0: Tensor,
        x1: Tensor,
        labels: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> Pairs:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("GlobalBatch needs torch.distributed.init_process_group() first")
        device = torch.device(self.device) if self.device is not None else x0.device
        if generator is None:
            seed = torch.randint(0, 2**62, (1,)).to(device)
            dist.broadcast(seed, 0)
            generator = torch.Generator().manual_seed(int(seed))
        world, rank = dist.get_world_size(), dist.get_rank()
        if isinstance(self.coupling, SinkhornCoupling) and world * x0.shape[0] > self.shard_above:
            wrapped: Coupling = ShardedSinkhornCoupling(self.coupling, GroupCollectives(None, device))
        else:
            wrapped = ReplicatedCoupling(self.coupling, rank, device)
        return wrapped.pair(x0, x1, labels, generator)
