"""``Collectives`` over a torch.distributed process group, and the joint input checks of sharded solvers.

``GroupCollectives`` implements the interface of ``sdfm.ot.collectives`` (whose no-op, ``LOCAL``,
serves a single process) for the ranks of a group, timing every collective:

- ``sum``: an all-gather of the per-rank tensors summed in rank order, so every rank holds the same
  bits whatever the backend's all-reduce algorithm, and no rank can decide to stop while another
  goes on (used for means and errors: a few numbers);
- ``lse``: the exact global logsumexp of per-rank partial logsumexps, in one all-gather of the
  partials combined in rank order (max, then the sum of the rescaled exponentials);
- ``counts``, ``broadcast``, ``gather_rows`` (rows whose count differs between ranks).

``exchange`` and ``agree`` validate inputs jointly: a rank whose input is bad, or ranks that disagree
about shapes or options, make every rank raise the same one-line error instead of leaving the
others waiting in a collective.

On CUDA the device is synchronized around each collective so that pending kernels count as compute.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor

from sdfm.ot.collectives import LOCAL, Collectives, GatheredRows, LocalCollectives, share

__all__ = [
    "LOCAL",
    "Collectives",
    "GatheredRows",
    "GroupCollectives",
    "LocalCollectives",
    "agree",
    "all_gather_rows",
    "share",
]

_MAX_DIMS = 6
"""Trailing dimensions a row may have in ``all_gather_rows`` (images: (C, H, W))."""

_DTYPES = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
)


class GroupCollectives:
    """``Collectives`` of the ranks of ``group``.

    Args:
        group: the process group (None: the default group).
        device: where small agreement tensors live (CPU for gloo, this rank's GPU for NCCL).

    Attributes:
        rank, world: this rank and the group size.
        comm_s: seconds spent inside this object's collectives (waiting for slower ranks included).
    """

    def __init__(self, group: dist.ProcessGroup | None = None, device: torch.device | str = "cpu"):
        self.group = group
        self.device = torch.device(device)
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.comm_s = 0.0

    @contextmanager
    def timed(self, device: torch.device) -> Iterator[None]:
        """Count the enclosed collective's wall time in ``comm_s``."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.comm_s += time.perf_counter() - t0

    def sum(self, t: Tensor) -> Tensor:
        out = t.new_empty(self.world * t.shape[0], *t.shape[1:])
        with self.timed(t.device):
            dist.all_gather_single(out, t.contiguous(), group=self.group)
        return out.view(-1, *t.shape).sum(0)

    def lse(self, part: Tensor) -> Tensor:
        """Global logsumexp of per-rank partials in one collective: an all-gather of the W partials,
        then M = max_r part_r and M + log sum_r exp(part_r - M), summed in rank order (the same bits
        on every rank). One collective instead of an all-reduce MAX and an all-reduce SUM: the
        g-update is latency-bound for small batches, and W m floats are little next to the scores."""
        parts = part.new_empty(self.world * part.shape[0])
        with self.timed(part.device):
            dist.all_gather_single(parts, part.contiguous(), group=self.group)
        parts = parts.view(self.world, -1)
        top = parts.amax(0)
        safe = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # -inf: no rank has rows
        total = (parts[0] - safe).exp_()
        for r in range(1, self.world):
            total += (parts[r] - safe).exp_()
        return total.log_().add_(safe)

    def reduce_sum(self, t: Tensor) -> Tensor:
        out = t.clone()
        with self.timed(t.device):
            dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out

    def counts(self, n: int) -> list[int]:
        mine = torch.tensor([n], dtype=torch.int64, device=self.device)
        out = mine.new_empty(self.world)
        with self.timed(self.device):
            dist.all_gather_single(out, mine, group=self.group)
        return [int(c) for c in out.tolist()]

    def broadcast(self, t: Tensor) -> Tensor:
        t = t.clone()
        with self.timed(t.device):
            dist.broadcast(t, group=self.group, group_src=0)
        return t

    def gather_rows(self, x: Tensor) -> GatheredRows:
        return all_gather_rows(x, self.group, self)

    def exchange(
        self, values: Sequence[float], problem: str | None, error: type[Exception] = ValueError
    ) -> Tensor:
        """All-gather a few numbers per rank, failing on every rank if any rank reports a problem.

        Args:
            values: k numbers from this rank (ints must be below 2^53).
            problem: this rank's one-line complaint about its input, or None.
            error: the exception type to raise.

        Returns:
            (W, k) float64 table on the CPU, row r from rank r.

        Raises:
            error: on every rank, with the first complaining rank's message, if any rank complained.
        """
        row = torch.tensor(
            [float(problem is not None), *map(float, values)], dtype=torch.float64, device=self.device
        )
        table = row.new_empty(self.world * row.shape[0])  # gloo wants the concatenated (not stacked) form
        with self.timed(self.device):
            dist.all_gather_single(table, row, group=self.group)
        table = table.view(self.world, -1).cpu()
        if bool(table[:, 0].any()):
            messages: list[str | None] = [None] * self.world
            dist.all_gather_object(messages, problem, group=self.group)
            rank = next(r for r, m in enumerate(messages) if m is not None)
            raise error(f"rank {rank}: {messages[rank]}")
        return table[:, 1:]


def agree(
    table: Tensor, column: int, what: str, error: type[Exception] = ValueError, rtol: float = 0.0
) -> None:
    """Raise (on every rank: they all hold the same ``exchange`` table) unless all ranks gave the same
    value (up to ``rtol``, for checksums whose float sum may be ordered differently on different ranks)."""
    values = table[:, column]
    same = (values == values[0]) | ((values - values[0]).abs() <= rtol * values[0].abs())
    if not bool(same.all()):
        shown = [int(v) if float(v).is_integer() else float(v) for v in values.tolist()]
        raise error(f"ranks disagree about {what}: {shown} (rank order)")


def all_gather_rows(
    x_local: Tensor, group: dist.ProcessGroup | None = None, comm: GroupCollectives | None = None
) -> GatheredRows:
    """All-gather rows whose count differs between ranks (gloo's all_gather needs equal sizes).

    One all-gather of a small header (count, trailing shape, dtype), then one of the rows padded to
    the largest count. Ranks that disagree about the trailing shape or the dtype all raise.

    Args:
        x_local: (n_r, *shape) this rank's rows, n_r >= 0.
        group: the process group (default: the default group), when no ``comm`` is given.
        comm: the group's collectives, which count the communication time.

    Returns:
        GatheredRows with rows (sum_r n_r, *shape) in x_local's dtype and device.
    """
    comm = comm if comm is not None else GroupCollectives(group, x_local.device)
    group = comm.group
    problem = None
    if x_local.dim() < 1 or x_local.dim() - 1 > _MAX_DIMS:
        problem = f"rows must have shape (n, *shape) with at most {_MAX_DIMS} trailing dims, got {tuple(x_local.shape)}"
    elif x_local.dtype not in _DTYPES:
        problem = f"cannot gather rows of dtype {x_local.dtype}"
    shape = list(x_local.shape[1:]) if problem is None else []
    dtype_code = _DTYPES.index(x_local.dtype) if problem is None else -1
    header = [x_local.shape[0] if x_local.dim() else 0, len(shape), dtype_code]
    header += shape + [-1] * (_MAX_DIMS - len(shape))
    table = comm.exchange(header, problem)
    agree(table, 1, "the number of dimensions of the gathered rows")
    for k in range(_MAX_DIMS):
        agree(table, 3 + k, f"dimension {k + 1} of the gathered rows")
    if not bool((table[:, 2] == table[0, 2]).all()):
        names = [str(_DTYPES[int(c)]) for c in table[:, 2].tolist()]
        raise ValueError(f"ranks disagree about the dtype of the gathered rows: {names} (rank order)")
    counts = [int(c) for c in table[:, 0].tolist()]
    offsets = [sum(counts[:r]) for r in range(len(counts))]
    width = max(counts)
    if width == 0:  # nothing to gather (and no zero-size collective)
        return GatheredRows(rows=x_local.detach().clone(), counts=counts, offsets=offsets, rank=comm.rank)
    padded = x_local.new_zeros(width, *x_local.shape[1:])
    padded[: x_local.shape[0]] = x_local
    everything = padded.new_empty(len(counts) * width, *x_local.shape[1:])
    with comm.timed(x_local.device):
        dist.all_gather_single(everything, padded, group=group)
    rows = torch.cat([everything[r * width : r * width + c] for r, c in enumerate(counts)])
    return GatheredRows(rows=rows, counts=counts, offsets=offsets, rank=comm.rank)
