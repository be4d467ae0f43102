"""The search backends of ``MatchIndex``: one block of keys (all points, or one class) and its bias.

- ``TorchBlock``: keys y (n, p) plus a separate fp32 bias vector g, copied in place. The search is
  chunked over n: a matrix product, the bias, a running argmax (fp32), or in bf16 / fp16 a running
  top-k of candidates that ``sdfm.semidiscrete.rescore`` turns into the exact answer.
- ``TritonBlock``: the same keys and bias, searched by the fused kernel ``sdfm.kernels.argmax`` (fp32).
- ``FaissBlock``: a flat inner-product FAISS CPU index over augmented keys [y_j ; g_j], queried with
  [x ; 1]; the g column of the index's stored vectors is overwritten in place.
- ``FaissGpuBlock``: FAISS's brute-force GPU kNN (``faiss.knn_gpu``) over a database tensor that
  sdfm owns, [y_j ; g_j] on the GPU: queries and results stay torch CUDA tensors (no host copies), a
  new g is written into the database's last column in place (no rebuild), and one
  ``StandardGpuResources`` serves the whole process. fp16 databases give candidates that are
  rescored like the torch backend's.

Every block answers ``search(q)`` with the exact argmax for fp32 keys (the fp32 scores' argmax) and,
for 16-bit keys, with the float64-certified argmax (``rescore``).

Library code: single device.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from sdfm import kernels
from sdfm.data.points import Points
from sdfm.ot.reductions import mm_fp32_out
from sdfm.semidiscrete.rescore import exact_argmax, rescore, score_error_bound

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

__all__ = [
    "DTYPES",
    "FaissBlock",
    "FaissGpuBlock",
    "StoredKeys",
    "TorchBlock",
    "TritonBlock",
    "faiss_gpu_available",
    "max_abs",
    "max_row_norm",
]


class StoredKeys:
    """fp32 keys read on demand from points stored compactly (uint8 images, float16 vectors): the
    matching index of a large dataset then holds no float32 copy of it. Each slice or set of rows is
    converted to float32 when a search reads it (``Points.take``), so a search pays one conversion of
    the keys it scans on top of its products: negligible for the fitter's batches of 1,024 queries
    (one conversion per 1,024 products), about as much as the products for a trainer's batch of 16.

    Args:
        points: (n, d) flat points (``Points.flat()``), memory-mapped or in memory.
        device: where the converted rows go (the index device).
    """

    def __init__(self, points: Points, device: torch.device):
        self.points, self.device = points, torch.device(device)
        self.shape = torch.Size((len(points), points.dim))
        self.dtype = torch.float32

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx: slice | Tensor) -> Tensor:
        """fp32 keys of the rows ``idx`` (a slice, or an index tensor of any shape: (*idx.shape, d))."""
        if isinstance(idx, slice):
            return self.points.take(idx, self.device)
        flat = idx.reshape(-1).cpu()
        return self.points.take(flat, self.device).reshape(*idx.shape, self.shape[1])

    def float(self) -> StoredKeys:
        return self

    def contiguous(self) -> StoredKeys:
        return self

    def subset(self, rows: Tensor) -> StoredKeys:
        """The keys of ``rows`` (a class block), still stored compactly."""
        return StoredKeys(self.points.subset(rows.cpu()), self.device)

    def chunks(self, rows: int = 65536):
        for start in range(0, self.shape[0], rows):
            yield self[start : start + rows]


def max_row_norm(keys: Tensor | StoredKeys) -> float:
    """max_j |y_j| over the keys (read in chunks when they are stored compactly)."""
    if not len(keys):
        return 0.0
    if isinstance(keys, StoredKeys):
        return max(float(c.norm(dim=1).max()) for c in keys.chunks())
    return float(keys.norm(dim=1).max())


def max_abs(keys: Tensor | StoredKeys) -> float:
    """The largest |coordinate| of the keys (read in chunks when they are stored compactly)."""
    if isinstance(keys, StoredKeys):
        return max(float(c.abs().max()) for c in keys.chunks())
    return float(keys.abs().max())


def faiss_gpu_available() -> bool:
    """Whether the installed faiss was built with CUDA and sees a GPU (faiss-cpu: never; a GPU build
    without a device: never, and calling it would abort the process; no faiss at all: never)."""
    try:
        import faiss
    except ImportError:
        return False
    return "GPU" in faiss.get_compile_options() and faiss.get_num_gpus() > 0


_CPU_SCORES = 1 << 19
"""On a CPU, at most this many scores (2 MB) per chunk: a (B, chunk) block that stays in the core's
cache is written and re-read far faster. Measured on one thread of a 2-core EPYC, search of 1,024
queries: 2-D, N = 20,000: 21 ms vs 87 ms with 16 MB chunks; d = 64, N = 10,000: 26 vs 71 ms;
d = 784: equal (the products dominate there). Beside the peers in one run (``sdfm bench match
--N 20000 --d 2 64 --B 1024 --methods sdfm-torch faiss-flat torch-matmul --precisions fp32
--threads 1``): d = 2: 20 ms against 134 (FAISS flat) and 98 (torch matmul + argmax); d = 64: 47
against 154 and 131, all answers equal to float64."""


class Certified:
    """Counts how often a low-precision search had to fall back to the exact search (diagnostics)."""

    def __init__(self) -> None:
        self.queries = 0
        self.fallbacks = 0

    def resolve(
        self, q: Tensor, exact_keys: Tensor, bias: Tensor, cand: Tensor, kth: Tensor, bound: Tensor
    ) -> Tensor:
        """The exact argmax of every query from its candidates, searching again where uncertified."""
        best, ok = rescore(q, exact_keys, bias, cand, kth, bound)
        self.queries += q.shape[0]
        if not bool(ok.all()):
            bad = (~ok).nonzero().squeeze(1)
            best[bad] = exact_argmax(q[bad], exact_keys, bias)
            self.fallbacks += bad.shape[0]
        return best


class TorchBlock:
    """Keys of one group of points (all of them, or one class) and their bias, for chunked search.

    Args:
        keys: (n, p) fp32 keys (kept: the exact keys that low-precision candidates are rescored with),
            or ``StoredKeys`` (fp32 precision only) converted chunk by chunk as they are scanned.
        chunk_size: keys scored at a time (fewer on a CPU).
        precision: 'fp32', or 'bf16' / 'fp16' candidates rescored exactly.
        candidates: top-k kept per query by a low-precision search.
    """

    def __init__(self, keys: Tensor, chunk_size: int, precision: str = "fp32", candidates: int = 16):
        self.exact = keys.float().contiguous()
        self.keys = self.exact if precision == "fp32" else self.exact.to(DTYPES[precision])
        self.precision, self.candidates = precision, candidates
        self.bias = torch.zeros(keys.shape[0], dtype=torch.float32, device=keys.device)
        self.chunk_size = chunk_size
        self.key_norm = max_row_norm(self.exact)
        self.bias_abs = 0.0  # max |g|, kept at set_bias so that a search needs no device sync for it
        self.certified = Certified()

    def _chunk(self, batch: int) -> int:
        if self.keys.device.type == "cuda":
            return self.chunk_size
        return min(self.chunk_size, max(256, _CPU_SCORES // max(batch, 1)))

    def set_bias(self, g: Tensor) -> None:
        self.bias.copy_(g)
        if self.precision != "fp32":
            self.bias_abs = float(self.bias.abs().max()) if self.bias.numel() else 0.0

    def _scores(self, q: Tensor, start: int, stop: int, out: Tensor | None = None) -> Tensor:
        """fp32 scores (B, stop - start) of fp32 queries against keys[start:stop]."""
        if self.precision == "fp32":
            # One fused pass (BLAS adds the broadcast bias as its C operand) instead of two; into a
            # reused buffer, which on a CPU is about 2x faster than a fresh block per chunk.
            bias, keys = self.bias[None, start:stop], self.keys[start:stop].T
            return torch.addmm(bias, q, keys) if out is None else torch.addmm(bias, q, keys, out=out)
        # 16-bit operands, fp32 products and accumulation, the fp32 bias added after: potentials that
        # differ by less than the 16-bit resolution of the scores stay apart.
        return mm_fp32_out(q.to(self.keys.dtype), self.keys[start:stop]).add_(self.bias[start:stop])

    def search(self, q: Tensor) -> Tensor:
        """(B,) int64 argmax ids for fp32 queries q (B, p): exact fp32, or certified exact (16-bit)."""
        if self.precision != "fp32":
            k = min(self.candidates, self.keys.shape[0])
            scores, cand = self.topk(q, k)
            complete = k == self.keys.shape[0]
            kth = torch.full_like(scores[:, 0], -torch.inf) if complete else scores[:, -1]
            bound = score_error_bound(q, self.key_norm, self.bias_abs, self.precision)
            return self.certified.resolve(q, self.exact, self.bias, cand, kth, bound)
        n = self.keys.shape[0]
        best = torch.full((q.shape[0],), -torch.inf, device=q.device)
        arg = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        chunk = self._chunk(q.shape[0])
        buffer = None
        if n > chunk:
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
        """(B, k) fp32 scores (in this block's precision) and int64 ids of the k best keys, best first."""
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


class TritonBlock(TorchBlock):
    """A fp32 ``TorchBlock`` (same keys, same in-place bias) whose search is the fused Triton kernel, or
    with ``auto`` the faster of the kernel and the torch loop for each shape class (torch off CUDA).
    The kernel keeps one best per query, so there are no candidates to rescore: fp32 only."""

    def __init__(self, keys: Tensor, chunk_size: int, auto: bool):
        super().__init__(keys, chunk_size, "fp32")
        self.auto = auto

    def search(self, q: Tensor) -> Tensor:
        if not self.auto:
            return kernels.argmax(q, self.keys, self.bias, tf32=False).index
        return kernels.auto(
            "argmax",
            q,
            (q.shape[0], *self.keys.shape),
            lambda: kernels.argmax(q, self.keys, self.bias, tf32=False).index,
            lambda: TorchBlock.search(self, q),
        )


class FaissBlock:
    """A flat inner-product FAISS CPU index over [keys ; g] for one group of points (fp32)."""

    def __init__(self, keys: Tensor):
        import faiss

        n, p = keys.shape
        self.dim = p + 1
        augmented = np.zeros((n, p + 1), dtype=np.float32)
        augmented[:, :p] = keys.detach().cpu().float().numpy()
        self.index = faiss.IndexFlatIP(self.dim)
        self.index.add(augmented)

    def stored(self) -> np.ndarray:
        """(n, p + 1) view onto the CPU index's own vectors (writes go straight into the index).
        Fetched afresh each time: the pointer moves if the index ever reallocates."""
        import faiss

        n = self.index.ntotal
        return faiss.rev_swig_ptr(self.index.get_xb(), n * self.dim).reshape(n, self.dim)

    def set_bias(self, g: Tensor) -> None:
        self.stored()[:, -1] = g.detach().cpu().float().numpy()

    def topk(self, q: Tensor, k: int) -> tuple[Tensor, Tensor]:
        augmented = np.ones((q.shape[0], self.dim), dtype=np.float32)
        augmented[:, :-1] = q.detach().cpu().float().numpy()
        scores, ids = self.index.search(augmented, k)
        return torch.from_numpy(scores), torch.from_numpy(ids).long()

    def search(self, q: Tensor) -> Tensor:
        return self.topk(q, 1)[1][:, 0]


_GPU_RESOURCES: dict[int, object] = {}
_FAISS_MAX_K = 2048
"""faiss.knn_gpu aborts the process (it does not raise) for k above this."""


def gpu_resources(device: torch.device):
    """The process's one ``faiss.StandardGpuResources`` for a CUDA device (created on first use; it
    holds pinned memory, streams and scratch space, so it is shared, never made per index)."""
    import faiss

    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _GPU_RESOURCES:
        _GPU_RESOURCES[index] = faiss.StandardGpuResources()
    return _GPU_RESOURCES[index]


class FaissGpuBlock:
    """FAISS brute-force GPU kNN over a database tensor [keys ; g] that sdfm owns (module docstring).

    Args:
        keys: (n, p) fp32 keys on a CUDA device.
        precision: 'fp32' (FAISS's fp32 search, top-1) or 'fp16' / 'bf16' (a 16-bit database whose
            top-k candidates are rescored exactly).
        candidates: top-k kept per query by a 16-bit search (at most 2048).
    """

    def __init__(self, keys: Tensor, precision: str = "fp32", candidates: int = 16):
        import faiss
        import faiss.contrib.torch_utils  # noqa: F401  (torch tensors in faiss.knn_gpu)

        self.faiss = faiss
        n, p = keys.shape
        self.exact = keys.float().contiguous()
        self.precision, self.candidates = precision, min(candidates, _FAISS_MAX_K)
        self.database = torch.zeros(n, p + 1, dtype=DTYPES[precision], device=keys.device)
        self.database[:, :p] = self.exact
        self.bias = torch.zeros(n, dtype=torch.float32, device=keys.device)
        self.key_norm = float(self.exact.norm(dim=1).max()) if n else 0.0
        self.bias_abs = 0.0
        self.resources = gpu_resources(keys.device)
        self.certified = Certified()

    def set_bias(self, g: Tensor) -> None:
        """g (n,): written into the database's last column in place (nothing is re-added)."""
        self.bias.copy_(g)
        self.database[:, -1] = self.bias
        self.bias_abs = float(self.bias.abs().max()) if self.bias.numel() else 0.0

    def topk(self, q: Tensor, k: int) -> tuple[Tensor, Tensor]:
        if k > _FAISS_MAX_K:
            raise ValueError(f"faiss.knn_gpu takes k <= {_FAISS_MAX_K}, got {k}")
        queries = torch.ones(q.shape[0], self.database.shape[1], dtype=self.database.dtype, device=q.device)
        queries[:, :-1] = q
        with torch.cuda.device(self.database.device):
            scores, ids = self.faiss.knn_gpu(
                self.resources, queries, self.database, k, metric=self.faiss.METRIC_INNER_PRODUCT
            )
        return scores, ids

    def search(self, q: Tensor) -> Tensor:
        if self.precision == "fp32":
            return self.topk(q, 1)[1][:, 0]
        k = min(self.candidates, self.database.shape[0])
        scores, cand = self.topk(q, k)
        complete = k == self.database.shape[0]
        kth = torch.full_like(scores[:, 0], -torch.inf) if complete else scores[:, -1]
        # The bias is a database entry here, rounded like the keys; the products accumulate in fp32.
        bound = score_error_bound(
            q, self.key_norm, self.bias_abs, self.precision, bias_precision=self.precision
        )
        return self.certified.resolve(q, self.exact, self.bias, cand, kth, bound)
