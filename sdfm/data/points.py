"""Points stored compactly (uint8 images, float16 or float32 vectors), read as float32 per batch.

A dataset of a million images is held as its stored bytes, not as float32: ``Points`` wraps a tensor
in its stored dtype, often a read-only view of a memory-mapped file (``sdfm.data.pack``), so every
process on a host reads the same pages of the operating system's page cache. Reading rows gathers
them in the stored dtype on the host and converts them to float32 on the device that asks:

    x = stored / divisor + offset        (uint8 images: divisor 127.5, offset -1, so [0, 255] -> [-1, 1])

A split or subset of the data is a row index into the same storage (``subset``), never a copy.

Library code: single device.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

__all__ = ["Points", "CHUNK_BYTES"]

CHUNK_BYTES = 64 << 20
"""Rows read at a time by ``chunks``: about this many float32 bytes (64 MiB), so a pass over a pack
of any size holds one chunk, not the dataset."""


class Points:
    """N points of one shape, stored compactly and converted to float32 when read.

    Args:
        storage: (M, *stored_shape) tensor in its stored dtype, e.g. a view of a memory map. Stored
            images may be channels-last (M, H, W, C) with ``channels_last``.
        divisor, offset: float32 value = stored / divisor + offset (1 and 0: the stored values).
        rows: (N,) int64 ids into ``storage`` of these points in order (a split or subset), or None
            for all M rows.
        channels_last: storage rows are (H, W, C); read rows are (C, H, W).
        flat: read rows flattened to (d,) (``flat()``).

    Example:
        >>> pts = Points(torch.tensor([[0, 255]], dtype=torch.uint8), divisor=127.5, offset=-1.0)
        >>> pts[torch.tensor([0])]
        tensor([[-1.,  1.]])
    """

    def __init__(
        self,
        storage: Tensor,
        *,
        divisor: float = 1.0,
        offset: float = 0.0,
        rows: Tensor | None = None,
        channels_last: bool = False,
        flat: bool = False,
    ):
        if storage.ndim < 2:
            raise ValueError(f"points need a storage of shape (N, ...), got {tuple(storage.shape)}")
        self.storage, self.divisor, self.offset = storage, float(divisor), float(offset)
        self.rows = None if rows is None else rows.to(torch.long)
        self.channels_last, self.flat_rows = channels_last, flat
        stored = tuple(storage.shape[1:])
        shape = (stored[2], stored[0], stored[1]) if channels_last else stored
        self.point_shape = (math.prod(shape),) if flat else shape

    # -------------------------------------------------------------------------------------- shape

    def __len__(self) -> int:
        return int(self.storage.shape[0] if self.rows is None else self.rows.shape[0])

    @property
    def shape(self) -> torch.Size:
        """(N, *point_shape), as a float32 tensor of these points would have."""
        return torch.Size((len(self), *self.point_shape))

    @property
    def dim(self) -> int:
        """Coordinates per point (the flattened dimension d)."""
        return math.prod(self.point_shape)

    @property
    def stored_dtype(self) -> torch.dtype:
        return self.storage.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of these points as stored."""
        return len(self) * self.dim * self.storage.element_size()

    @property
    def dense_nbytes(self) -> int:
        """Bytes of these points as float32 (what ``dense`` allocates)."""
        return len(self) * self.dim * 4

    # -------------------------------------------------------------------------------------- reads

    def ids(self, idx: Tensor | slice) -> Tensor:
        """Storage row ids of the points ``idx`` (a (b,) index tensor or a slice)."""
        if isinstance(idx, slice):
            return self.rows[idx] if self.rows is not None else torch.arange(len(self))[idx]
        idx = torch.as_tensor(idx, dtype=torch.long).cpu()
        return self.rows[idx] if self.rows is not None else idx

    def gather(self, idx: Tensor | slice, *, pin: bool = False) -> Tensor:
        """Rows ``idx`` (b, *stored_shape) in the stored dtype, on the host (pinned with ``pin``); a slice
        of unsubset points may be a view of the storage."""
        if isinstance(idx, slice) and self.rows is None:
            out = self.storage[idx]  # contiguous rows: a view (``convert`` copies it)
            return out.pin_memory() if pin else out
        out = self.storage.index_select(0, self.ids(idx))
        return out.pin_memory() if pin else out

    def convert(self, stored: Tensor, device: torch.device | str | None = None) -> Tensor:
        """Stored rows (b, *stored_shape) -> float32 (b, *point_shape) on ``device`` (default: theirs).
        The copy to a CUDA device is non-blocking from pinned memory; the conversion runs there."""
        x = stored if device is None else stored.to(device, non_blocking=stored.is_pinned())
        x = x.to(torch.float32)
        if x.data_ptr() == stored.data_ptr():  # float32 storage: do not hand out the storage itself
            x = x.clone()
        if self.divisor != 1.0:
            x = x.div_(self.divisor)
        if self.offset != 0.0:
            x = x.add_(self.offset)
        if self.channels_last:
            x = x.permute(0, 3, 1, 2).contiguous()
        return x.flatten(1) if self.flat_rows else x

    def take(self, idx: Tensor | slice, device: torch.device | str | None = None) -> Tensor:
        """Points ``idx`` as float32 (b, *point_shape) on ``device`` (default: the host)."""
        cuda = device is not None and torch.device(device).type == "cuda"
        return self.convert(self.gather(idx, pin=cuda), device)

    def __getitem__(self, idx: Tensor | slice | int) -> Tensor:
        """Float32 points on the host: ``points[idx]`` as a float32 tensor would answer (an int gives one
        point (*point_shape))."""
        if isinstance(idx, int):
            return self.take(torch.tensor([idx]))[0]
        return self.take(idx)

    def chunks(self, rows: int | None = None, device: torch.device | str | None = None) -> Iterator[Tensor]:
        """The points in order as float32 chunks (c, *point_shape) of ``rows`` rows (default: about
        ``CHUNK_BYTES``), on ``device``: one pass over data of any size holds one chunk."""
        rows = rows or max(1, CHUNK_BYTES // max(1, 4 * self.dim))
        for start in range(0, len(self), rows):
            yield self.take(slice(start, start + rows), device)

    def dense(self, device: torch.device | str | None = None) -> Tensor:
        """All points as one float32 tensor (N, *point_shape): for small data and the methods that need
        it whole (``dense_nbytes`` says what it costs)."""
        return self.take(slice(0, len(self)), device)

    def _view(self, rows: Tensor | None, flat: bool) -> Points:
        return Points(
            self.storage,
            divisor=self.divisor,
            offset=self.offset,
            rows=rows,
            channels_last=self.channels_last,
            flat=flat,
        )

    def subset(self, idx: Tensor | np.ndarray) -> Points:
        """The points ``idx`` (b,) of these, as ``Points`` over the same storage (no copy of the data)."""
        return self._view(self.ids(torch.as_tensor(np.asarray(idx), dtype=torch.long)), self.flat_rows)

    def flat(self) -> Points:
        """The same points read as flat (d,) vectors, as ``x.flatten(1)`` of their float32 tensor."""
        return self._view(self.rows, True)

    def is_finite(self, limit: float = math.inf) -> Tensor:
        """(N,) bool: which points hold only finite values of magnitude below ``limit`` (read in chunks)."""
        if not self.storage.dtype.is_floating_point:
            return torch.ones(len(self), dtype=torch.bool)
        return torch.cat([(c.flatten(1).abs() < limit).all(1) for c in self.chunks()])

    def __repr__(self) -> str:
        return f"Points({len(self)} x {tuple(self.point_shape)}, stored {self.stored_dtype})"
