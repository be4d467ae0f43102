"""Maximum-inner-product search with a bias: the matching step of semidiscrete OT.

For queries x_1..x_B and the N data points y_1..y_N with a dual potential g (DESIGN.md §5),
``MatchIndex.search`` answers

    k*(x) = argmax_j <x, y_j> + g_j

exactly (a flat search, no approximation). g changes all the time (a worker keeps improving it), so
everything that does not depend on g is built once and ``set_potential`` only touches g:

- torch backend: keys y (N, d) plus a separate fp32 bias vector g, copied in place. The search is
  chunked over N (``chunk_size`` rows at a time): a matrix product, the bias, a running argmax (or a
  running top-k). On CUDA the keys and queries are bf16 by default (tensor cores) and the scores are
  cast to fp32 before the bias is added, so a small g is not rounded away; on CPU everything is fp32.
- faiss backend: a flat inner-product index (``IndexFlatIP``) over augmented keys [y_j ; g_j],
  queried with [x ; 1]. On the CPU the g column of the index's stored vectors is overwritten in place
  (a strided write of N floats). A FAISS GPU index cannot be edited in place, so there a new g means
  ``reset()`` + ``add()`` of the augmented keys from a host copy (a rebuild, O(N d) copied to the GPU).
- triton backend: the torch backend's keys and in-place bias, searched by one fused kernel
  (``sdfm.kernels.argmax``: matrix product, bias and running argmax per tile, no score block in
  memory). CUDA only, or any device under TRITON_INTERPRET=1 (tests). ``topk`` is the torch backend's.
- auto backend: the same index; each search runs the faster of the triton kernel and the torch loop,
  measured once per shape class on CUDA; on a CPU it is the torch backend.

With ``labels``, each class has its own sub-index holding that class's rows (and a map back to the
global ids), and a query of class c only searches class c: pairs never cross classes.

With ``pca_dim = p > 0``, the keys are the top-p principal components of the centered data,
(y_j - m) V, and the queries are projected as x V. Since <x, y_j> = <x, m> + <x, y_j - m> and the
first term does not depend on j, centering changes no argmax; the projection does: matching happens
in the PCA space, i.e. it maximizes <x V, (y_j - m) V> + g_j, and a potential must be fitted in the
same space (``PotentialFitter(pca_dim=p)``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

from sdfm import kernels
from sdfm.errors import UserError

Backend = Literal["torch", "faiss", "triton", "auto"]
BACKENDS = ("torch", "faiss", "triton", "auto")

__all__ = ["MatchIndex", "PCA", "TopK", "class_partition", "reference_argmax"]


class TopK(NamedTuple):
    """The k best candidates of each query, best first. A NamedTuple so that both
    ``scores, index = ...`` and ``.scores`` read naturally.

    Attributes:
        scores: (B, k) float32 <x, y_j> + g_j (in the PCA space with ``pca_dim``); -inf in padding.
        index: (B, k) int64 global ids j; -1 in padding (a class with fewer than k points).
    """

    scores: Tensor
    index: Tensor


@dataclass
class PCA:
    """Top-p principal directions of the data: matching happens in this p-dimensional space.

    Attributes:
        mean: (d,) float32 mean m of the data.
        components: (d, p) float32 orthonormal principal directions V, by decreasing variance.
        explained: fraction of the data's variance kept by the p directions.
    """

    mean: Tensor
    components: Tensor
    explained: float

    @classmethod
    def fit(cls, y: Tensor, p: int) -> PCA:
        """Fit on y (N, d) by an eigendecomposition of the float64 covariance on the CPU (deterministic,
        and cheaper than an SVD of the (N, d) matrix when N >> d). Each direction's sign is fixed so
        that its largest entry is positive, so the same data always gives the same V."""
        y64 = y.detach().to("cpu", torch.float64)
        mean = y64.mean(0)
        centered = y64 - mean
        cov = centered.T @ centered / max(len(y64) - 1, 1)
        values, vectors = torch.linalg.eigh(cov)  # ascending
        order = torch.argsort(values, descending=True)[:p]
        v = vectors[:, order]
        sign = torch.sign(v.gather(0, v.abs().argmax(0, keepdim=True)))
        v = v * torch.where(sign == 0, 1.0, sign)
        total = values.clamp_min(0).sum().item()
        explained = values[order].clamp_min(0).sum().item() / total if total > 0 else 1.0
        return cls(mean=mean.float().to(y.device), components=v.float().to(y.device), explained=explained)

    def keys(self, y: Tensor) -> Tensor:
        """Project data points: (N, d) -> (N, p) = (y - m) V."""
        return (y.float() - self.mean.to(y.device)) @ self.components.to(y.device)

    def queries(self, x: Tensor) -> Tensor:
        """Project queries: (B, d) -> (B, p) = x V (the <x, m> term is the same for every j)."""
        return x.float() @ self.components.to(x.device)


def reference_argmax(
    x: Tensor,
    y: Tensor,
    g: Tensor,
    *,
    labels: Tensor | None = None,
    query_labels: Tensor | None = None,
) -> Tensor:
    """Brute-force argmax_j <x_i, y_j> + g_j in float64 on the CPU, for tests and evaluation.

    Args:
        x: (B, d) queries.
        y: (N, d) points.
        g: (N,) potential.
        labels: (N,) classes of the points; with ``query_labels`` (B,), a query only sees its class.

    Returns:
        (B,) int64 indices into y.
    """
    scores = x.detach().cpu().double() @ y.detach().cpu().double().T + g.detach().cpu().double()
    if labels is not None and query_labels is not None:
        same = query_labels.cpu()[:, None] == labels.cpu()[None, :]
        scores = scores.masked_fill(~same, -torch.inf)
    return scores.argmax(1)


def class_partition(labels: Tensor) -> list[tuple[int, Tensor]]:
    """Split point ids by class: [(class value, (n_c,) int64 sorted global ids), ...], by class value."""
    labels = labels.detach().cpu()
    return [(int(c), torch.nonzero(labels == c).flatten()) for c in torch.unique(labels).tolist()]


def _faiss_gpu_available() -> bool:
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


_CPU_SCORES = 1 << 22
"""On a CPU, at most this many scores (16 MB) per chunk: a (B, chunk) block that stays in cache is
written and re-read faster (measured 1.5x at B = 4,096, d = 64 against 8,192-row chunks)."""


class _TorchBlock:
    """Keys of one group of points (all of them, or one class) and their bias, for chunked search."""

    def __init__(self, keys: Tensor, chunk_size: int):
        self.keys = keys.contiguous()  # (n, p) compute dtype
        self.bias = torch.zeros(keys.shape[0], dtype=torch.float32, device=keys.device)
        self.chunk_size = chunk_size

    def _chunk(self, batch: int) -> int:
        if self.keys.device.type == "cuda":
            return self.chunk_size
        return min(self.chunk_size, max(256, _CPU_SCORES // max(batch, 1)))

    def set_bias(self, g: Tensor) -> None:
        self.bias.copy_(g)

    def _scores(self, q: Tensor, start: int, stop: int, out: Tensor | None = None) -> Tensor:
        if self.keys.dtype == torch.float32:
            # One fused pass (BLAS adds the broadcast bias as its C operand) instead of two; into a
            # reused buffer, which on a CPU is about 2x faster than a fresh block per chunk.
            bias, keys = self.bias[None, start:stop], self.keys[start:stop].T
            return torch.addmm(bias, q, keys) if out is None else torch.addmm(bias, q, keys, out=out)
        # The product runs in the compute dtype (bf16 on CUDA); adding g in fp32 afterwards keeps
        # potentials that differ by less than bf16's resolution of the scores apart.
        return (q @ self.keys[start:stop].T).float() + self.bias[start:stop]

    def search(self, q: Tensor) -> Tensor:
        n = self.keys.shape[0]
        best = torch.full((q.shape[0],), -torch.inf, device=q.device)
        arg = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        chunk = self._chunk(q.shape[0])
        buffer = None
        if self.keys.dtype == torch.float32 and n > chunk:
            buffer = torch.empty(q.shape[0], chunk, device=q.device)
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            full = buffer is not None and stop - start == chunk
            scores = self._scores(q, start, stop, buffer if full else None)
            if q.device.type == "cuda":  # no host sync per chunk: one fused max with indices
                value, pos = scores.max(1)
                better = value > best  # strict: ties keep the lower id, as argmax does
                best = torch.where(better, value, best)
                arg = torch.where(better, pos + start, arg)
                continue
            # On a CPU the row maxima alone are ~10x cheaper than max with indices: take indices
            # only for the rows this chunk improves.
            value = scores.amax(1)
            better = value > best
            if bool(better.any()):
                rows = better.nonzero().squeeze(1)
                best[rows] = value[rows]
                arg[rows] = scores[rows].argmax(1) + start
        return arg

    def topk(self, q: Tensor, k: int) -> tuple[Tensor, Tensor]:
        n = self.keys.shape[0]
        best = torch.full((q.shape[0], 0), -torch.inf, device=q.device)
        arg = torch.zeros((q.shape[0], 0), dtype=torch.long, device=q.device)
        chunk = self._chunk(q.shape[0])
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            value, pos = self._scores(q, start, stop).topk(min(k, stop - start), dim=1)
            value, arg = torch.cat([best, value], 1), torch.cat([arg, pos + start], 1)
            best, keep = value.topk(min(k, value.shape[1]), dim=1)
            arg = arg.gather(1, keep)
        return best, arg


class _TritonBlock(_TorchBlock):
    """A ``_TorchBlock`` (same keys, same in-place bias) whose search is the fused Triton kernel, or with
    ``auto`` the faster of the kernel and the torch loop for each shape class (torch off CUDA)."""

    def __init__(self, keys: Tensor, chunk_size: int, auto: bool):
        super().__init__(keys, chunk_size)
        self.auto = auto

    def search(self, q: Tensor) -> Tensor:
        if not self.auto:
            return kernels.argmax(q, self.keys, self.bias).index
        return kernels.auto(
            "argmax",
            q,
            (q.shape[0], *self.keys.shape),
            lambda: kernels.argmax(q, self.keys, self.bias).index,
            lambda: _TorchBlock.search(self, q),
        )


class _FaissBlock:
    """A flat inner-product FAISS index over [keys ; g] for one group of points."""

    def __init__(self, keys: Tensor, gpu: bool):
        import faiss

        n, p = keys.shape
        self.dim = p + 1
        self.gpu = gpu
        augmented = np.zeros((n, p + 1), dtype=np.float32)
        augmented[:, :p] = keys.detach().cpu().float().numpy()
        if gpu:
            # A GPU index cannot be edited in place; keep the host copy to rebuild from.
            self.host = augmented
            self.resources = faiss.StandardGpuResources()
            self.index = faiss.GpuIndexFlatIP(self.resources, self.dim)
        else:
            self.host = None
            self.index = faiss.IndexFlatIP(self.dim)
        self.index.add(augmented)

    def stored(self) -> np.ndarray:
        """(n, p + 1) view onto the CPU index's own vectors (writes go straight into the index).
        Fetched afresh each time: the pointer moves if the index ever reallocates."""
        import faiss

        n = self.index.ntotal
        return faiss.rev_swig_ptr(self.index.get_xb(), n * self.dim).reshape(n, self.dim)

    def set_bias(self, g: Tensor) -> None:
        column = g.detach().cpu().float().numpy()
        if self.gpu:
            self.host[:, -1] = column
            self.index.reset()
            self.index.add(self.host)
        else:
            self.stored()[:, -1] = column

    def topk(self, q: Tensor, k: int) -> tuple[Tensor, Tensor]:
        augmented = np.ones((q.shape[0], self.dim), dtype=np.float32)
        augmented[:, :-1] = q.detach().cpu().float().numpy()
        scores, ids = self.index.search(augmented, k)
        return torch.from_numpy(scores), torch.from_numpy(ids).long()

    def search(self, q: Tensor) -> Tensor:
        return self.topk(q, 1)[1][:, 0]


class MatchIndex:
    """Exact k*(x) = argmax_j <x, y_j> + g_j against all N points, with a cheaply replaceable g.

    Args:
        y: (N, d) data points (flatten images first).
        backend: 'torch' (chunked matmul + bias + running argmax), 'faiss' (flat index over [y; g]),
            'triton' (the fused kernel; CUDA, or TRITON_INTERPRET=1) or 'auto' (the faster of triton and
            torch per shape class on CUDA, torch elsewhere); see the module docstring.
        labels: (N,) int64 classes; queries then search only their own class.
        pca_dim: match in the top-``pca_dim`` principal components of y (0: full dimension d).
        device: where the torch index lives (default: y's device). The faiss backend uses a FAISS GPU
            index when this is a CUDA device and faiss was built with GPU support, else the CPU.
        chunk_size: rows of y scored at a time by the torch backend (memory: B x chunk_size fp32); on a
            CPU fewer, so that a chunk holds at most 2^22 scores.
        compute_dtype: dtype of keys and queries in the torch, triton and auto backends' products
            (default bf16 on CUDA, fp32 on CPU); the bias and the scores are always fp32.

    Raises:
        UserError: a bad argument, or backend 'triton' where it cannot run (the message names the fix).

    Attributes:
        n: number of points N.
        dim: dimension d of the queries.
        match_dim: dimension of the matching space (p with PCA, else d).
        pca: the PCA projection, or None.
        potential: (N,) float32 copy of the g in use (zeros until ``set_potential``).
        last_refresh_seconds: wall time of the last ``set_potential``.
    """

    def __init__(
        self,
        y: Tensor,
        *,
        backend: Backend = "torch",
        labels: Tensor | None = None,
        pca_dim: int = 0,
        device: torch.device | str | None = None,
        chunk_size: int = 8192,
        compute_dtype: torch.dtype | None = None,
    ):
        if y.ndim != 2 or y.shape[0] == 0:
            raise UserError(
                f"MatchIndex needs data points of shape (N, d); got {tuple(y.shape)}. Flatten images first"
            )
        if backend not in BACKENDS:
            raise UserError(f"unknown matching backend '{backend}'; use one of {', '.join(BACKENDS)}")
        if backend == "triton":
            kernels.require_triton(device if device is not None else y.device)
        n, d = y.shape
        if not 0 <= pca_dim <= d:
            raise UserError(
                f"pca_dim={pca_dim} is outside 0..{d} (the data dimension); use 0 (no PCA) or at most {d}"
            )
        if chunk_size < 1:
            raise UserError(f"chunk_size={chunk_size} must be positive")
        if labels is not None and tuple(labels.shape) != (n,):
            raise UserError(
                f"labels have shape {tuple(labels.shape)} but there are {n} points; pass one label per point"
            )
        self.n, self.dim, self.backend = n, d, backend
        self.device = torch.device(device) if device is not None else y.device
        if compute_dtype is None:
            compute_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.compute_dtype = compute_dtype
        self.pca = PCA.fit(y, pca_dim) if pca_dim > 0 else None
        keys = self.pca.keys(y.to(self.device)) if self.pca else y.to(self.device, torch.float32)
        self.match_dim = keys.shape[1]
        groups = class_partition(labels) if labels is not None else [(0, torch.arange(n))]
        self.labeled = labels is not None
        self._class_slot = {c: i for i, (c, _) in enumerate(groups)}
        self._rows = [rows.to(self.device) for _, rows in groups]
        use_gpu_faiss = backend == "faiss" and self.device.type == "cuda" and _faiss_gpu_available()
        self._blocks: list[_TorchBlock | _FaissBlock] = []
        for rows in self._rows:
            block_keys = keys if not self.labeled else keys[rows]
            if backend == "torch":
                self._blocks.append(_TorchBlock(block_keys.to(compute_dtype), chunk_size))
            elif backend == "faiss":
                self._blocks.append(_FaissBlock(block_keys, gpu=use_gpu_faiss))
            else:
                self._blocks.append(
                    _TritonBlock(block_keys.to(compute_dtype), chunk_size, auto=backend == "auto")
                )
        self.potential = torch.zeros(n, dtype=torch.float32, device=self.device)
        self.last_refresh_seconds = 0.0

    @property
    def classes(self) -> list[int]:
        """Class values with a sub-index (``[0]`` without labels)."""
        return list(self._class_slot)

    def set_potential(self, g: Tensor) -> None:
        """Use the potential g (N,) from now on, changing only the bias (see the module docstring).

        Raises:
            UserError: g has the wrong shape or non-finite entries.
        """
        if g.ndim != 1 or g.shape[0] != self.n:
            raise UserError(
                f"potential g has shape {tuple(g.shape)} but the index has {self.n} points; "
                "use the potential fitted on this dataset (same points, same order)"
            )
        if not bool(torch.isfinite(g).all()):
            bad = int((~torch.isfinite(g)).sum())
            raise UserError(f"potential g has {bad} NaN/Inf entries; refit it or load an earlier version")
        start = time.perf_counter()
        self.potential.copy_(g.detach())
        for rows, block in zip(self._rows, self._blocks, strict=True):
            block.set_bias(self.potential[rows] if self.labeled else self.potential)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.last_refresh_seconds = time.perf_counter() - start

    def project(self, x: Tensor) -> Tensor:
        """Queries (B, d) in the matching space: (B, p) with PCA, else (B, d); float32 on the index device."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise UserError(f"queries have shape {tuple(x.shape)}; the index expects (B, {self.dim})")
        x = x.to(self.device, torch.float32)
        return self.pca.queries(x) if self.pca else x

    def _prepare(self, x: Tensor, query_labels: Tensor | None, projected: bool) -> Tensor:
        if projected:
            if x.ndim != 2 or x.shape[1] != self.match_dim:
                raise UserError(
                    f"projected queries have shape {tuple(x.shape)}; expected (B, {self.match_dim})"
                )
            q = x.to(self.device, torch.float32)
        else:
            q = self.project(x)
        if self.labeled and query_labels is None:
            raise UserError("this index was built with labels; pass query_labels (the class of each query)")
        if not self.labeled and query_labels is not None:
            raise UserError(
                "query_labels given but the index was built without labels; build it with labels="
            )
        if query_labels is not None and tuple(query_labels.shape) != (x.shape[0],):
            raise UserError(f"query_labels have shape {tuple(query_labels.shape)}; expected ({x.shape[0]},)")
        return q if self.backend == "faiss" else q.to(self.compute_dtype)

    def _groups(self, query_labels: Tensor | None):
        """Yield (slot, query positions or None for all) for each class present among the queries."""
        if not self.labeled:
            yield 0, None
            return
        ql = query_labels.to(self.device)
        for c in torch.unique(ql).tolist():
            if c not in self._class_slot:
                raise UserError(f"query label {c} is not a class of the index (classes: {self.classes})")
            yield self._class_slot[c], torch.nonzero(ql == c).flatten()

    def search(self, x: Tensor, query_labels: Tensor | None = None, *, projected: bool = False) -> Tensor:
        """argmax_j <x_i, y_j> + g_j for each query (within its class when the index has labels).

        Args:
            x: (B, d) queries, or (B, match_dim) already projected when ``projected``.
            query_labels: (B,) class of each query; required exactly when the index has labels.
            projected: x is already in the matching space (``project(x)``, or noise drawn there).

        Returns:
            (B,) int64 global ids into y, on x's device.
        """
        q = self._prepare(x, query_labels, projected)
        out = torch.empty(x.shape[0], dtype=torch.long, device=self.device)
        for slot, pos in self._groups(query_labels):
            block, rows = self._blocks[slot], self._rows[slot]
            local = block.search(q if pos is None else q[pos]).to(self.device)
            if pos is None:  # no labels: one block holding all points in order
                out = local
            else:
                out[pos] = rows[local]
        return out.to(x.device)

    def topk(self, x: Tensor, k: int, query_labels: Tensor | None = None, *, projected: bool = False) -> TopK:
        """The k best candidates of each query by <x, y_j> + g_j, best first.

        Args:
            x: (B, d) queries (or projected, see ``search``).
            k: candidates per query; clipped to N. With labels, queries of a class with fewer than k
                points get -inf / -1 padding after their class's points.
            query_labels: (B,) class of each query (see ``search``).

        Returns:
            TopK of (B, k) float32 scores and int64 global ids, on x's device.
        """
        if k < 1:
            raise UserError(f"k={k} must be at least 1")
        q = self._prepare(x, query_labels, projected)
        k = min(k, self.n)
        scores = torch.full((x.shape[0], k), -torch.inf, device=self.device)
        index = torch.full((x.shape[0], k), -1, dtype=torch.long, device=self.device)
        for slot, pos in self._groups(query_labels):
            block, rows = self._blocks[slot], self._rows[slot]
            kk = min(k, rows.shape[0])
            s, local = block.topk(q if pos is None else q[pos], kk)
            s, ids = s.to(self.device), rows[local.to(self.device)]
            if pos is None:
                scores[:, :kk], index[:, :kk] = s, ids
            else:
                scores[pos, :kk], index[pos, :kk] = s, ids
        return TopK(scores.to(x.device), index.to(x.device))

    def sample(
        self,
        x: Tensor,
        epsilon: float,
        generator: torch.Generator,
        k: int = 64,
        query_labels: Tensor | None = None,
        *,
        projected: bool = False,
    ) -> Tensor:
        """Draw j ~ softmax_j((<x, y_j> + g_j) / epsilon) over each query's top-k candidates.

        Exact when k >= N (or >= the class size); for k < N it drops the tail beyond the k-th
        candidate, whose probability is tiny whenever the k-th score is many epsilons below the best.
        epsilon <= 0 is the argmax (``search``). Sampling is Gumbel-max with uniforms drawn from
        ``generator`` (on the generator's device, then moved).

        Args:
            x: (B, d) queries (or projected).
            epsilon: temperature in the units of the scores.
            generator: the source of randomness.
            k: candidates per query.
            query_labels: (B,) class of each query (see ``search``).

        Returns:
            (B,) int64 global ids, on x's device.
        """
        if epsilon <= 0:
            return self.search(x, query_labels, projected=projected)
        top = self.topk(x, k, query_labels, projected=projected)
        u = torch.rand(top.scores.shape, generator=generator, device=generator.device).to(top.scores.device)
        gumbel = -torch.log(-torch.log(u.clamp(1e-12, 1 - 1e-7)))
        pick = (top.scores / epsilon + gumbel).argmax(1, keepdim=True)
        return top.index.gather(1, pick).squeeze(1)
