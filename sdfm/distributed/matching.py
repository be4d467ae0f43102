"""Semidiscrete matching (docs/design.md §7, §9) against a dataset split across the ranks of a process group.

Rank r holds a contiguous shard of the N data points, global ids offset_r .. offset_r + N_r - 1 in
rank order, and the matching slice of the dual potential g, in a ``MatchIndex`` over its shard
(memory O(N d / W) per rank). ``search(x_local)`` answers k*(x) = argmax_j <x, y_j> + g_j over all N
points for this rank's queries:

1. all-gather the queries of every rank (and their labels);
2. each rank searches its shard for all of them: its best id per query and that candidate's score,
   recomputed in float64 from the fp32 point (so the comparison across shards does not depend on how
   a shard's matrix product was blocked);
3. two all-reduces over the B queries: MAX of the scores, then MIN of the global ids of the
   candidates that reach it, so the best wins and ties go to the smallest global id (as in one
   unsharded argmax, which keeps the first of equal scores);
4. every rank now knows every winner and its owner, so one ``all_to_all_single`` with uneven splits
   sends each winning point from its owner to the rank that asked (O(B_r d) received per rank).

gloo on the CPU supports ``all_to_all_single`` (and ``all_to_all``) with uneven splits in torch 2.13
(checked with 2 and 3 ranks), so no all-gather/broadcast fallback is needed; ``all_gather`` does
need equal sizes, hence the padding in ``all_gather_rows``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from sdfm.distributed.collectives import GroupCollectives, agree
from sdfm.errors import UserError
from sdfm.semidiscrete.index import Backend, MatchIndex, Precision

__all__ = ["ShardedMatch", "ShardedMatchIndex"]

_NO_ID = torch.iinfo(torch.int64).max


@dataclass
class ShardedMatch:
    """The matches of this rank's queries.

    Attributes:
        index: (B_r,) int64 global ids of the winning data points.
        points: (B_r, *shape) the winning data points (fetched from the ranks that hold them).
        comm_s: seconds spent inside collectives during the search.
    """

    index: Tensor
    points: Tensor
    comm_s: float


class ShardedMatchIndex:
    """Exact argmax_j <x, y_j> + g_j over N points held in shards by the ranks of a process group.

    Args:
        y_shard: (N_r, *shape) this rank's data points (global ids offset .. offset + N_r - 1, the
            shards concatenated in rank order); N_r may be 0.
        group: the process group (default: the default group).
        labels: (N_r,) int64 classes of this shard's points for per-class matching (a query then
            searches only its class); given on every rank or on none.
        backend, device, chunk_size, precision, candidates: as in ``MatchIndex``, for the shard's index.

    Attributes:
        n: global number of points N.
        dim: query dimension d = prod(shape).
        counts: N_r of every rank; offsets: global id of every shard's first point.
        offset: global id of this shard's first point.
        index: this shard's ``MatchIndex`` (None for an empty shard).
    """

    def __init__(
        self,
        y_shard: Tensor,
        *,
        group: dist.ProcessGroup | None = None,
        labels: Tensor | None = None,
        backend: Backend = "torch",
        device: torch.device | str | None = None,
        chunk_size: int = 8192,
        precision: Precision | None = None,
        candidates: int = 16,
    ):
        self.group = group
        self.device = torch.device(device) if device is not None else y_shard.device
        problem = None
        if y_shard.dim() < 2:
            problem = (
                f"ShardedMatchIndex needs data points of shape (N_r, *shape); got {tuple(y_shard.shape)}"
            )
        elif labels is not None and tuple(labels.shape) != (y_shard.shape[0],):
            problem = f"labels have shape {tuple(labels.shape)} but the shard has {y_shard.shape[0]} points"
        dim = y_shard.flatten(1).shape[1] if problem is None else -1
        comm = GroupCollectives(group, y_shard.device)
        table = comm.exchange(
            [y_shard.shape[0] if problem is None else 0, dim, labels is not None], problem, UserError
        )
        agree(table, 1, "the dimension of the data points", UserError)
        agree(table, 2, "whether the data has labels", UserError)
        self.counts = [int(c) for c in table[:, 0].tolist()]
        self.offsets = [sum(self.counts[:r]) for r in range(len(self.counts))]
        self.rank = dist.get_rank(group)
        self.offset = self.offsets[self.rank]
        self.n, self.dim = sum(self.counts), dim
        if self.n == 0:
            raise UserError("ShardedMatchIndex has no data points on any rank")
        self.point_shape = tuple(y_shard.shape[1:])
        self.labeled = labels is not None
        # Kept (not copied) to fetch winners and rescore them; on a CPU the fp32 index shares it.
        self._points = y_shard
        self._flat = y_shard.flatten(1)
        self.index: MatchIndex | None = None
        if y_shard.shape[0] > 0:
            self.index = MatchIndex(
                self._flat,
                backend=backend,
                labels=labels,
                device=self.device,
                chunk_size=chunk_size,
                precision=precision,
                candidates=candidates,
            )
        self._classes = torch.tensor(
            self.index.classes if self.index and self.labeled else [], dtype=torch.long
        )

    def set_potential(self, g: Tensor) -> None:
        """Use the potential g from now on: the full (N,) vector (this rank keeps its slice) or this
        shard's (N_r,) slice. Only the shard's bias changes (in place); no collective.

        Raises:
            UserError: g has neither shape, or non-finite entries in this shard's slice.
        """
        n_r = self.counts[self.rank]
        if g.ndim == 1 and g.shape[0] == self.n:
            g = g[self.offset : self.offset + n_r]
        elif g.ndim != 1 or g.shape[0] != n_r:
            raise UserError(
                f"potential g has shape {tuple(g.shape)}; pass the full ({self.n},) potential or this "
                f"rank's ({n_r},) slice (global ids {self.offset}..{self.offset + n_r - 1})"
            )
        if self.index is not None:
            self.index.set_potential(g)

    def _local_best(self, q: Tensor, query_labels: Tensor | None) -> tuple[Tensor, Tensor]:
        """This shard's best candidate for each query (B, d): float64 scores (-inf where the shard has
        nothing to offer) and global ids (``_NO_ID`` there)."""
        scores = torch.full((q.shape[0],), -torch.inf, dtype=torch.float64, device=self.device)
        ids = torch.full((q.shape[0],), _NO_ID, dtype=torch.long, device=self.device)
        if self.index is None or q.shape[0] == 0:
            return scores, ids
        if query_labels is None:
            pos = torch.arange(q.shape[0], device=self.device)
            local = self.index.search(q)
        else:
            pos = torch.nonzero(torch.isin(query_labels, self._classes.to(query_labels.device))).flatten()
            local = self.index.search(q[pos], query_labels[pos])
            pos = pos.to(self.device)
        local = local.to(self.device)
        keys = self._flat[local].to(self.device, torch.float64)
        bias = self.index.potential[local].double()
        rescored = (q[pos].to(self.device, torch.float64) * keys).sum(1) + bias
        scores[pos], ids[pos] = rescored, local + self.offset
        return scores, ids

    def search(self, x_local: Tensor, query_labels: Tensor | None = None) -> ShardedMatch:
        """Match this rank's queries against all N points. Every rank of the group must call it.

        Args:
            x_local: (B_r, d) this rank's queries (B_r may differ between ranks, and be 0).
            query_labels: (B_r,) class of each query; required exactly when the index has labels.

        Returns:
            ShardedMatch with the winners' global ids (B_r,) and the points themselves (B_r, *shape).

        Raises:
            UserError: on every rank, when any rank's queries are malformed or a query's class has no
                point on any rank.
        """
        comm = GroupCollectives(self.group, x_local.device)
        device = x_local.device
        problem = None
        if x_local.dim() != 2 or x_local.shape[1] != self.dim:
            problem = f"queries have shape {tuple(x_local.shape)}; the index expects (B, {self.dim})"
        elif self.labeled and query_labels is None:
            problem = "this index was built with labels; pass query_labels (the class of each query)"
        elif not self.labeled and query_labels is not None:
            problem = "query_labels given but the index was built without labels"
        elif query_labels is not None and tuple(query_labels.shape) != (x_local.shape[0],):
            problem = f"query_labels have shape {tuple(query_labels.shape)}; expected ({x_local.shape[0]},)"
        comm.exchange([], problem, UserError)
        queries = comm.gather_rows(x_local.float())
        q = queries.rows
        ql = comm.gather_rows(query_labels).rows if self.labeled else None

        scores, ids = self._local_best(q, ql)
        best = scores.clone()
        with comm.timed(best.device):
            dist.all_reduce(best, op=dist.ReduceOp.MAX, group=self.group)
        winner = torch.where(scores == best, ids, _NO_ID)
        with comm.timed(winner.device):
            dist.all_reduce(winner, op=dist.ReduceOp.MIN, group=self.group)
        lost = torch.nonzero(winner == _NO_ID).flatten()
        if lost.numel():  # every rank holds the same winners, so every rank raises
            i = int(lost[0])
            what = f"class {int(ql[i])} has no point on any rank" if ql is not None else "no finite score"
            raise UserError(f"query {i} of the gathered batch has no match: {what}")

        # Owner of each winner; rank s sends rank r, in query order, the winners of r's queries it owns.
        ends = torch.tensor(self.offsets[1:] + [self.n], device=winner.device)
        owner = torch.searchsorted(ends, winner, right=True)
        world = len(self.counts)
        send_counts, recv_counts = [], []
        mine = queries.local
        for r in range(world):
            block = slice(queries.offsets[r], queries.offsets[r] + queries.counts[r])
            send_counts.append(int((owner[block] == self.rank).sum()))
            recv_counts.append(int((owner[mine] == r).sum()))
        sent = owner == self.rank
        send = self._flat[(winner[sent] - self.offset).to(self._flat.device)].contiguous()
        recv = send.new_empty(queries.counts[self.rank], self._flat.shape[1])
        with comm.timed(recv.device):
            dist.all_to_all_single(recv, send, recv_counts, send_counts, group=self.group)
        # recv holds my winners grouped by owner (in rank order), each group in query order.
        order = torch.argsort(owner[mine], stable=True)
        points = torch.empty_like(recv)
        points[order.to(points.device)] = recv
        return ShardedMatch(
            index=winner[mine].to(device),
            points=points.view(-1, *self.point_shape).to(device),
            comm_s=comm.comm_s,
        )
