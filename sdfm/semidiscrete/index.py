"""Maximum-inner-product search with a bias: the matching step of semidiscrete OT.

For queries x_1..x_B and the N data points y_1..y_N with a dual potential g (docs/design.md §7),
``MatchIndex.search`` answers

    k*(x) = argmax_j <x, y_j> + g_j

exactly (a flat search, no approximation). g changes all the time (a worker keeps improving it), so
everything that does not depend on g is built once and ``set_potential`` only touches g:

The backends (``sdfm.semidiscrete.backends``) keep the keys and hold g as a bias they overwrite:

- torch: keys plus a separate fp32 bias vector, chunked matmul + bias + running argmax. On CUDA the
  keys and queries are fp16 (or bf16 for points beyond fp16's range) by default: tensor cores pick
  the top candidates, which are rescored in float64 and certified exact; the bias is added in fp32,
  so a small g is not rounded away. On a CPU everything is fp32.
- faiss: a flat inner-product index over [y_j ; g_j] queried with [x ; 1]; the g column is
  written in place on the CPU, rebuilt on a GPU.
- triton: the torch backend's keys and bias, searched by one fused kernel (CUDA, or
  TRITON_INTERPRET=1 for tests); ``topk`` is the torch backend's.
- auto: the faster of triton and torch per shape class on CUDA; torch elsewhere.

With ``labels``, each class has its own sub-index holding that class's rows (and a map back to the
global ids), and a query of class c only searches class c: pairs never cross classes. With
``pca_dim = p > 0`` matching happens in the top-p principal components (``sdfm.semidiscrete.pca``).
"""

from __future__ import annotations

import importlib.util
import time
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from sdfm import kernels
from sdfm.data.points import Points
from sdfm.errors import UserError
from sdfm.semidiscrete.backends import (
    FaissBlock,
    FaissGpuBlock,
    StoredKeys,
    TorchBlock,
    TritonBlock,
    faiss_gpu_available,
    max_abs,
)
from sdfm.semidiscrete.pca import PCA
from sdfm.semidiscrete.rescore import FP16_MAX

Backend = Literal["torch", "faiss", "triton", "auto"]
BACKENDS = ("torch", "faiss", "triton", "auto")
Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS = ("fp32", "bf16", "fp16")

__all__ = [
    "MatchIndex",
    "PCA",
    "PRECISIONS",
    "TopK",
    "check_precision",
    "default_precision",
    "class_partition",
    "reference_argmax",
]


class TopK(NamedTuple):
    """The k best candidates of each query, best first. A NamedTuple so that both
    ``scores, index = ...`` and ``.scores`` read naturally.

    Attributes:
        scores: (B, k) float32 <x, y_j> + g_j (in the PCA space with ``pca_dim``); -inf in padding.
        index: (B, k) int64 global ids j; -1 in padding (a class with fewer than k points).
    """

    scores: Tensor
    index: Tensor


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


FP16_DEFAULT_BELOW = FP16_MAX / 16
"""The default 16-bit precision is fp16 when every key coordinate is below this (room for the queries
too), else bf16 (fp32's range)."""


def default_precision(backend: str, device: torch.device, largest: float) -> Precision:
    """The matching precision used when none is given: on CUDA the torch backend searches 16-bit
    candidates (tensor cores), fp16 when the keys' largest coordinate ``largest`` is well inside its
    range (3 more bits than bf16: measured on Fashion-MNIST at d = 784, 0% of the queries searched
    again in fp16 against 30% in bf16 with 16 candidates), bf16 otherwise; fp32 everywhere else."""
    if device.type != "cuda" or backend != "torch":
        return "fp32"
    return "fp16" if largest < FP16_DEFAULT_BELOW else "bf16"


def check_precision(backend: str, precision: str, device: torch.device) -> None:
    """Raise UserError (one line naming the fix) unless ``backend`` can match in ``precision`` on ``device``."""
    if precision not in PRECISIONS:
        raise UserError(f"matching precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if backend == "faiss" and importlib.util.find_spec("faiss") is None:
        raise UserError(
            "potential.index = 'faiss' needs FAISS, which is not installed: pip install 'sdfm[cpu]' "
            "(faiss-cpu) or 'sdfm[gpu]' (faiss-gpu), or use potential.index = 'torch'"
        )
    if backend == "faiss" and device.type == "cuda" and not faiss_gpu_available():
        raise UserError(
            "potential.index = 'faiss' on a CUDA device needs FAISS with GPU support, but the installed "
            "faiss has none (faiss-cpu); pip install 'sdfm[gpu]' (faiss-gpu), or use potential.index = 'torch'"
        )
    if precision == "fp32":
        return
    if backend in ("triton", "auto"):
        raise UserError(
            f"potential.index = {backend!r} matches in fp32 only (its fused kernel keeps one best per query, "
            f"nothing to rescore); use potential.precision = 'fp32', or potential.index = 'torch' for {precision}"
        )
    if backend == "faiss" and device.type != "cuda":
        raise UserError(
            f"potential.index = 'faiss' on the CPU matches in fp32 only; use potential.precision = 'fp32', "
            f"or potential.index = 'torch' for {precision}"
        )


def class_partition(labels: Tensor) -> list[tuple[int, Tensor]]:
    """Split point ids by class: [(class value, (n_c,) int64 sorted global ids), ...], by class value."""
    labels = labels.detach().cpu()
    return [(int(c), torch.nonzero(labels == c).flatten()) for c in torch.unique(labels).tolist()]


class MatchIndex:
    """Exact k*(x) = argmax_j <x, y_j> + g_j against all N points, with a cheaply replaceable g.

    Args:
        y: (N, d) data points (flatten images first): a tensor, or ``Points`` (e.g. a memory-mapped pack,
            ``Points.flat()``), read in chunks straight into the keys.
        backend: 'torch' (chunked matmul + bias + running argmax), 'faiss' (flat index over [y; g]),
            'triton' (the fused kernel; CUDA, or TRITON_INTERPRET=1) or 'auto' (the faster of triton and
            torch per shape class on CUDA, torch elsewhere); see the module docstring.
        labels: (N,) int64 classes; queries then search only their own class.
        pca_dim: match in the top-``pca_dim`` principal components of y (0: full dimension d).
        device: where the index lives (default: y's device). The faiss backend on a CUDA device is
            FAISS's GPU brute-force search over a database tensor sdfm owns (``FaissGpuBlock``), which
            needs a FAISS build with GPU support (``pip install 'sdfm[gpu]'``); elsewhere a CPU index.
        chunk_size: rows of y scored at a time by the torch backend (memory: B x chunk_size fp32); on a
            CPU fewer, so that a chunk holds at most 2^22 scores.
        precision: of the keys and queries in the products: 'fp32' (the argmax of the fp32 scores),
            or 'bf16' / 'fp16' (torch backend, and faiss on a GPU), whose top ``candidates`` are
            rescored in float64 and certified exact (``sdfm.semidiscrete.rescore``). Default
            (``default_precision``): fp16 for the torch backend on CUDA when the points fit its
            range comfortably, else bf16; fp32 off CUDA and for the other backends. The bias is
            always added in fp32 by the torch backend.
        candidates: top-k candidates of a 16-bit search (more: fewer exact re-searches).

    Raises:
        UserError: a bad argument, a backend that cannot run here or cannot honour the precision (the
            message names the fix).

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
        y: Tensor | Points,
        *,
        backend: Backend = "torch",
        labels: Tensor | None = None,
        pca_dim: int = 0,
        device: torch.device | str | None = None,
        chunk_size: int = 8192,
        precision: Precision | None = None,
        candidates: int = 16,
    ):
        if len(y.shape) != 2 or y.shape[0] == 0:
            raise UserError(
                f"MatchIndex needs data points of shape (N, d); got {tuple(y.shape)}. Flatten images first"
            )
        if backend not in BACKENDS:
            raise UserError(f"unknown matching backend '{backend}'; use one of {', '.join(BACKENDS)}")
        home = torch.device("cpu") if isinstance(y, Points) else y.device
        if backend == "triton":
            kernels.require_triton(device if device is not None else home)
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
        self.device = torch.device(device) if device is not None else home
        check_precision(backend, precision or "fp32", self.device)  # before touching the device
        if candidates < 1:
            raise UserError(f"candidates={candidates} must be at least 1")
        self.pca = PCA.fit(y, pca_dim, self.device) if pca_dim > 0 else None
        # Compactly stored points on a CPU, matched in full dimension by the torch loop in fp32: the
        # keys are the stored points themselves, converted as each search scans them.
        stored = (
            isinstance(y, Points)
            and y.stored_dtype != torch.float32
            and pca_dim == 0
            and backend == "torch"
            and self.device.type == "cpu"
            and precision in (None, "fp32")
        )
        keys = StoredKeys(y, self.device) if stored else self.keys(y)
        largest = max_abs(keys)
        if precision is None:
            precision = default_precision(backend, self.device, largest)
            check_precision(backend, precision, self.device)
        if precision == "fp16" and largest > FP16_MAX:
            raise UserError(
                f"the points reach |y| = {largest:.3g} in a coordinate, beyond fp16's range ({FP16_MAX:g}); "
                "use potential.precision = 'bf16' or 'fp32', or rescale the data"
            )
        self.precision, self.candidates = precision, candidates
        self.match_dim = keys.shape[1]
        groups = class_partition(labels) if labels is not None else [(0, torch.arange(n))]
        self.labeled = labels is not None
        self._class_slot = {c: i for i, (c, _) in enumerate(groups)}
        self._rows = [rows.to(self.device) for _, rows in groups]
        self._blocks: list[TorchBlock | FaissBlock | FaissGpuBlock] = []
        for rows in self._rows:
            block_keys = keys if not self.labeled else keys.subset(rows) if stored else keys[rows]
            if backend == "torch":
                self._blocks.append(TorchBlock(block_keys, chunk_size, precision, candidates))
            elif backend == "faiss" and self.device.type == "cuda":
                self._blocks.append(FaissGpuBlock(block_keys, precision, candidates))
            elif backend == "faiss":
                self._blocks.append(FaissBlock(block_keys))
            else:
                self._blocks.append(TritonBlock(block_keys, chunk_size, auto=backend == "auto"))
        self.potential = torch.zeros(n, dtype=torch.float32, device=self.device)
        self.last_refresh_seconds = 0.0
        # The keys of all points for ``data_keys``, when they cost no second copy: stored points (any
        # labels), or the one block of an unlabeled torch or triton index, which holds them whole.
        self._whole_keys = None
        if stored:
            self._whole_keys = keys
        elif not self.labeled and backend in ("torch", "triton", "auto"):
            exact = self._blocks[0].exact
            self._whole_keys = exact if exact.data_ptr() == keys.data_ptr() else None

    @property
    def classes(self) -> list[int]:
        """Class values with a sub-index (``[0]`` without labels)."""
        return list(self._class_slot)

    @property
    def fallbacks(self) -> tuple[int, int]:
        """(queries searched with 16-bit keys so far, how many of them had candidates that could not be
        certified and were searched again exactly); (0, 0) for fp32 keys, which need no certificate.
        Diagnostics for tuning ``candidates``."""
        counters = [b.certified for b in self._blocks if getattr(b, "precision", "fp32") != "fp32"]
        return sum(c.queries for c in counters), sum(c.fallbacks for c in counters)

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

    def keys(self, y: Tensor | Points) -> Tensor:
        """Points y (N, d) in the matching space: (N, p) PCA keys (y - m) V, else y; float32 on the
        index device (a fresh tensor; the index keeps its own copy for searching). ``Points`` are read
        in chunks straight into the keys on the device: no float32 copy of y besides the keys."""
        if isinstance(y, Points):
            out = torch.empty(len(y), self.pca.components.shape[1] if self.pca else y.dim, device=self.device)
            start = 0
            for chunk in y.chunks(device=self.device):
                out[start : start + len(chunk)] = self.pca.keys(chunk) if self.pca else chunk
                start += len(chunk)
            return out
        y = y.to(self.device)
        return self.pca.keys(y) if self.pca else y.to(torch.float32)

    def data_keys(self, y: Tensor | Points) -> Tensor | StoredKeys:
        """``keys(y)`` of the index's own points y: the keys it searches when it holds them whole (no
        copy; read only; ``StoredKeys`` of compactly stored points: slices and row sets read as fp32),
        else computed."""
        return self._whole_keys if self._whole_keys is not None else self.keys(y)

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
        return q

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
