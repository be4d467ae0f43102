"""The search backends of ``MatchIndex``: one block of keys (all points, or one class) and its bias.

- ``TorchBlock``: keys y (n, p) in the compute dtype plus a separate fp32 bias vector g, copied in
  place. The search is chunked over n: a matrix product, the bias, a running argmax (or top-k).
- ``TritonBlock``: the same keys and bias, searched by the fused kernel ``sdfm.kernels.argmax``.
- ``FaissBlock``: a flat inner-product FAISS index over augmented keys [y_j ; g_j], queried with
  [x ; 1]. On the CPU the g column of the index's stored vectors is overwritten in place; a FAISS
  GPU index cannot be edited in place, so there a new g means ``reset()`` + ``add()``.

Library code: single device.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from sdfm import kernels

__all__ = ["FaissBlock", "TorchBlock", "TritonBlock", "faiss_gpu_available"]


def faiss_gpu_available() -> bool:
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


_CPU_SCORES = 1 << 22
"""On a CPU, at most this many scores (16 MB) per chunk: a (B, chunk) block that stays in cache is
written and re-read faster (measured 1.5x at B = 4,096, d = 64 against 8,192-row chunks)."""


class TorchBlock:
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


class TritonBlock(TorchBlock):
    """A ``TorchBlock`` (same keys, same in-place bias) whose search is the fused Triton kernel, or with
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
            lambda: TorchBlock.search(self, q),
        )


class FaissBlock:
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
