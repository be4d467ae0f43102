"""The packed dataset: one safetensors file of the points in their compact dtype, memory-mapped.

A pack is a standard safetensors file (any safetensors reader opens it) holding

- ``x``: (N, *shape) the training points as stored: uint8 images (C, H, W) in [0, 255], or float16 /
  float32 vectors and latents as given;
- ``labels``: (N,) int64 classes (absent without labels);
- ``eval_x``, ``eval_labels``: a held-out set that came with the source (Fashion-MNIST's test set);
  without one, evaluation points are a seeded row split of ``x`` (``sdfm.data``), never a copy;
- ``__metadata__``: ``format = "sdfm-pack"``, ``version``, ``name``, ``n``, ``shape``, ``dtype``,
  ``divisor`` and ``offset`` (float32 value = stored / divisor + offset), ``num_classes``,
  ``class_counts``, ``eval_n``, ``source``, the ``fingerprint`` computed once when packing, and a
  ``sample_digest`` of a few fixed rows.

``open_pack`` validates the header against the file (a truncated, foreign or inconsistent file is one
``UserError`` line), maps the tensors read-only (``numpy.memmap``: every process of a host shares the
page cache's one copy, and opening costs milliseconds whatever the size), and re-hashes the sampled
rows, a cheap check that the data region is the one packed; ``verify_pack`` re-hashes everything.

``PackWriter`` streams rows into a hidden file beside the target and renames it into place only when
it is complete (header written last, fsynced): an interrupted or failed pack never looks finished.

Library code: no devices, no processes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import struct
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sdfm.data.points import Points
from sdfm.errors import UserError

__all__ = ["FORMAT", "VERSION", "Pack", "PackWriter", "is_pack", "open_pack", "verify_pack"]

FORMAT = "sdfm-pack"
VERSION = 1
SAMPLE_ROWS = 64
"""Rows re-hashed by every ``open_pack`` (spread evenly over the pack)."""
_DTYPES = {"U8": np.uint8, "F16": np.float16, "F32": np.float32, "I64": np.int64}
_CODES = {np.dtype(v): k for k, v in _DTYPES.items()}
_HEADER_RESERVE = 4096
"""Spare header bytes a writer reserves beyond its first estimate (the header is written last)."""
_MAX_HEADER = 100 << 20


@dataclass
class Pack:
    """An opened pack (see the module docstring).

    Attributes:
        path: the file.
        meta: the header's metadata (strings, as safetensors stores them).
        x: the training points, mapped read-only.
        labels: (N,) int64 or None (mapped).
        eval_x: the held-out points that came with the source, or None.
        eval_labels: (M,) int64 or None.
    """

    path: Path
    meta: dict[str, str]
    x: Points
    labels: Tensor | None
    eval_x: Points | None
    eval_labels: Tensor | None

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    @property
    def num_classes(self) -> int:
        return int(self.meta.get("num_classes", "0"))


def sample_positions(n: int, k: int = SAMPLE_ROWS) -> list[int]:
    """The rows whose digest a pack carries: k (at most n) evenly spread ids, first and last included."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def _description(shape: tuple[int, ...], dtype: str, divisor: float, offset: float) -> bytes:
    return json.dumps({"shape": list(shape), "dtype": dtype, "divisor": divisor, "offset": offset}).encode()


def _read_header(path: Path) -> tuple[dict, int]:
    """(the header's JSON, the data region's start) of a safetensors file; UserError when it is not one."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise UserError(f"{path}: {size} bytes is too short to be a pack; re-create it with `sdfm data pack`")
        (length,) = struct.unpack("<Q", head)
        if length > min(_MAX_HEADER, size - 8):
            raise UserError(
                f"{path}: not a safetensors file (header length {length} for a {size}-byte file); "
                "point at a pack made by `sdfm data pack`"
            )
        try:
            header = json.loads(fh.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise UserError(
                f"{path}: the header is not valid JSON; the file is damaged or not a pack, re-create it "
                "with `sdfm data pack`"
            ) from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: the header is not a safetensors header; re-create it with `sdfm data pack`")
    return header, 8 + length


def is_pack(path: str | Path) -> bool:
    """Whether ``path`` is a safetensors file whose metadata says it is an sdfm pack (reads the header only)."""
    path = Path(path)
    if not path.is_file() or path.suffix != ".safetensors":
        return False
    try:
        header, _ = _read_header(path)
    except (UserError, OSError):
        return False
    meta = header.get("__metadata__")
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def _sample_digest(rows: np.ndarray) -> str:
    """Digest of the stored rows at ``sample_positions`` (k, *shape)."""
    return hashlib.sha256(np.ascontiguousarray(rows).tobytes()).hexdigest()[:16]


def open_pack(path: str | Path, *, check_sample: bool = True) -> Pack:
    """Open a pack read-only with its tensors memory-mapped (see the module docstring).

    Args:
        path: the pack (a .safetensors file made by ``sdfm data pack``).
        check_sample: re-hash the sampled rows (``SAMPLE_ROWS`` of them) against the header's digest.

    Raises:
        UserError: one line naming the file, what is wrong and the fix.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{path} is not a file; point at a pack made by `sdfm data pack`")
    header, start = _read_header(path)
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(
            f"{path}: a safetensors file but not an sdfm pack (no format = {FORMAT!r} in its metadata); "
            f"pack it with `sdfm data pack {path} OUT.safetensors`"
        )
    if meta.get("version") != str(VERSION):
        raise UserError(
            f"{path}: pack format version {meta.get('version')} is not the version {VERSION} this sdfm reads; "
            "re-pack the source with this sdfm"
        )
    size = path.stat().st_size
    arrays: dict[str, np.ndarray] = {}
    end = 0
    for name, entry in header.items():
        try:
            dtype = np.dtype(_DTYPES[entry["dtype"]])
            shape = tuple(int(s) for s in entry["shape"])
            lo, hi = (int(v) for v in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: tensor {name!r} has a damaged header entry; re-create the pack") from None
        if hi - lo != math.prod(shape) * dtype.itemsize or lo < 0:
            raise UserError(
                f"{path}: tensor {name!r} of shape {shape} does not match its {hi - lo} bytes; re-create the pack"
            )
        end = max(end, hi)
        if start + hi > size:
            raise UserError(
                f"{path}: truncated: the header promises {start + end} bytes or more but the file has {size}; "
                "copy the pack again or re-create it with `sdfm data pack`"
            )
        if math.prod(shape) == 0:
            arrays[name] = np.zeros(shape, dtype)
        else:
            arrays[name] = np.memmap(path, dtype=dtype, mode="r", offset=start + lo, shape=shape)
    if start + end != size:
        raise UserError(
            f"{path}: the file has {size} bytes but its header describes {start + end}; copy the pack again or "
            "re-create it with `sdfm data pack`"
        )
    if "x" not in arrays or arrays["x"].ndim < 2:
        raise UserError(f"{path}: the pack holds no points tensor 'x' of shape (N, ...); re-create the pack")
    n = arrays["x"].shape[0]
    try:
        declared = (int(meta["n"]), tuple(json.loads(meta["shape"])), meta["dtype"])
        divisor, offset = float(meta["divisor"]), float(meta["offset"])
        meta["fingerprint"]  # noqa: B018  (present)
    except (KeyError, ValueError, TypeError):
        raise UserError(f"{path}: the pack's metadata is incomplete; re-create it with `sdfm data pack`") from None
    if declared != (n, tuple(arrays["x"].shape[1:]), _CODES[arrays["x"].dtype]):
        raise UserError(
            f"{path}: the header's metadata (n, shape, dtype = {declared}) does not match the points tensor "
            f"{arrays['x'].shape} {arrays['x'].dtype}; re-create the pack"
        )
    for key, points in (("labels", "x"), ("eval_labels", "eval_x")):
        if key in arrays and (points not in arrays or arrays[key].shape != (arrays[points].shape[0],)):
            raise UserError(f"{path}: {key!r} does not have one entry per point; re-create the pack")
    with warnings.catch_warnings():  # the maps are read-only on purpose: nothing writes into a pack
        warnings.simplefilter("ignore", UserWarning)

        def tensor(name: str) -> Tensor | None:
            return torch.from_numpy(arrays[name]) if name in arrays else None

        def points(name: str) -> Points | None:
            t = tensor(name)
            return None if t is None else Points(t, divisor=divisor, offset=offset)

        pack = Pack(path, meta, points("x"), tensor("labels"), points("eval_x"), tensor("eval_labels"))
    if check_sample and _sample_digest(arrays["x"][sample_positions(n)]) != meta.get("sample_digest"):
        raise UserError(
            f"{path}: rows of the pack differ from the ones it was packed with (sample digest); the file "
            f"changed after packing: re-create it, or see `sdfm data verify {path}`"
        )
    return pack


def _hash_stream(h, chunks: Iterable[Tensor | np.ndarray]) -> None:
    for chunk in chunks:
        h.update(np.ascontiguousarray(chunk).tobytes() if isinstance(chunk, np.ndarray) else chunk.contiguous().numpy().tobytes())


def pack_fingerprint(
    x_chunks: Iterable, labels, eval_chunks: Iterable, eval_labels, description: bytes
) -> str:
    """The pack fingerprint: sha256 of the stored points, labels, held-out set and the description
    (shape, dtype, scaling), first 16 hex digits. Streams, so the writer and ``verify_pack`` each
    read the data once."""
    h = hashlib.sha256()
    _hash_stream(h, x_chunks)
    if labels is not None:
        _hash_stream(h, [labels])
    _hash_stream(h, eval_chunks)
    if eval_labels is not None:
        _hash_stream(h, [eval_labels])
    h.update(description)
    return h.hexdigest()[:16]


def verify_pack(path: str | Path, progress: Callable[[int], None] | None = None) -> Pack:
    """Re-hash a whole pack against its fingerprint; ``progress(rows)`` after each chunk. Returns the pack.

    Raises:
        UserError: the data differs from what was packed (or the file is not a valid pack).
    """
    pack = open_pack(path)
    rows = max(1, (64 << 20) // max(1, pack.x.dim * pack.x.storage.element_size()))

    def chunks(points: Points | None):
        if points is None:
            return
        for lo in range(0, len(points), rows):
            chunk = points.storage[lo : lo + rows]
            yield chunk
            if progress is not None and points is pack.x:
                progress(chunk.shape[0])

    m = pack.meta
    desc = _description(tuple(json.loads(m["shape"])), m["dtype"], float(m["divisor"]), float(m["offset"]))
    found = pack_fingerprint(chunks(pack.x), pack.labels, chunks(pack.eval_x), pack.eval_labels, desc)
    if found != pack.fingerprint:
        raise UserError(
            f"{pack.path}: content fingerprint {found} differs from the {pack.fingerprint} recorded when it was "
            "packed; the file is damaged: re-create it with `sdfm data pack`"
        )
    return pack


def _disk_full(path: Path, e: OSError) -> UserError:
    return UserError(f"{path}: the disk is full ({e.strerror}); nothing was written: free space and pack again")


class PackWriter:
    """Writes a pack row block by row block, atomically (see the module docstring).

    Args:
        path: the pack to create (a .safetensors file; its folder must exist).
        max_rows: an upper bound on N (the rows actually written may be fewer: skipped images).
        shape: (*shape) of one stored point.
        dtype: numpy dtype of the stored points (uint8, float16 or float32).
        divisor, offset: float32 value = stored / divisor + offset.
        name, source: recorded in the metadata.
        max_classes: an upper bound on the number of classes (room for the header's class counts).

    Use as a context manager: ``add`` blocks of rows, then ``finish(labels, eval_x, eval_labels)``;
    leaving the block without ``finish`` (an error, Ctrl-C) removes the hidden partial file.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_rows: int,
        shape: tuple[int, ...],
        dtype: np.dtype,
        divisor: float,
        offset: float,
        name: str,
        source: str,
        max_classes: int = 0,
    ):
        self.path, self.shape, self.dtype = Path(path), tuple(int(s) for s in shape), np.dtype(dtype)
        if self.dtype not in _CODES or self.dtype == np.int64:
            raise UserError(f"cannot pack points of dtype {self.dtype}; store uint8 images or float16/float32 vectors")
        self.divisor, self.offset, self.name, self.source = float(divisor), float(offset), name, source
        self.row_bytes = math.prod(self.shape) * self.dtype.itemsize
        self.rows = 0
        self._hash = hashlib.sha256()
        self.tmp = self.path.parent / f".{self.path.name}.partial-{os.getpid()}"
        # The header is written last at the file's start; reserve room for its largest form.
        most = {"fingerprint": "0" * 16, "sample_digest": "0" * 16, "class_counts": json.dumps([max_rows] * max_classes)}
        probe = self._header(max(max_rows, 10**12), 10**6, 10**12, most)
        self.header_room = len(probe) + _HEADER_RESERVE
        self.header_room += -self.header_room % 8  # the data region starts 8-byte aligned
        self._fh = None

    def __enter__(self) -> PackWriter:
        try:
            self._fh = open(self.tmp, "wb")
            self._fh.seek(8 + self.header_room)
        except OSError as e:
            raise UserError(f"{self.path}: cannot write the pack here ({e.strerror}); choose another OUT") from None
        return self

    def __exit__(self, kind, value, tb) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if kind is not None:
            self.tmp.unlink(missing_ok=True)
            if isinstance(value, OSError) and value.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _disk_full(self.path, value) from None

    def add(self, block: np.ndarray) -> None:
        """Append rows (b, *shape) of the stored dtype."""
        block = np.ascontiguousarray(block, dtype=self.dtype)
        if block.shape[1:] != self.shape:
            raise ValueError(f"rows of shape {block.shape[1:]} added to a pack of {self.shape}")
        data = block.tobytes()
        self._fh.write(data)
        self._hash.update(data)
        self.rows += block.shape[0]

    def _header(self, n: int, num_classes: int | None, eval_n: int | None, extra: dict) -> bytes:
        code = _CODES[self.dtype]
        entries: dict = {}
        offset = 0

        def entry(key: str, dtype: str, shape: tuple[int, ...]) -> None:
            nonlocal offset
            size = math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize
            entries[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size

        entry("x", code, (n, *self.shape))
        if num_classes is not None:
            entry("labels", "I64", (n,))
        if eval_n is not None:
            entry("eval_x", code, (eval_n, *self.shape))
            if num_classes is not None:
                entry("eval_labels", "I64", (eval_n,))
        meta = {
            "format": FORMAT,
            "version": str(VERSION),
            "name": self.name,
            "source": self.source,
            "n": str(n),
            "shape": json.dumps(list(self.shape)),
            "dtype": code,
            "divisor": repr(self.divisor),
            "offset": repr(self.offset),
            "num_classes": str(num_classes or 0),
            "eval_n": str(eval_n or 0),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **extra,
        }
        return json.dumps({"__metadata__": meta, **entries}, separators=(",", ":")).encode()

    def finish(
        self,
        labels: np.ndarray | None = None,
        eval_x: np.ndarray | None = None,
        eval_labels: np.ndarray | None = None,
    ) -> Path:
        """Write the labels, the held-out set and the header, then move the pack into place.

        Args:
            labels: (N,) non-negative integer classes of the rows added, or None.
            eval_x: (M, *shape) a held-out set that came with the source, or None.
            eval_labels: (M,) its classes (given exactly when ``labels`` is).
        """
        n = self.rows
        if n == 0:
            raise UserError(f"{self.path}: no points to pack; point SRC at data")
        labels_64 = None if labels is None else np.ascontiguousarray(labels, dtype=np.int64)
        if labels_64 is not None and labels_64.shape != (n,):
            raise ValueError(f"{labels_64.shape} labels for {n} rows")
        eval_64 = None if eval_labels is None else np.ascontiguousarray(eval_labels, dtype=np.int64)
        eval_x = None if eval_x is None else np.ascontiguousarray(eval_x, dtype=self.dtype)
        num_classes = None
        counts: list[int] = []
        if labels_64 is not None:
            top = max(int(labels_64.max()), int(eval_64.max()) if eval_64 is not None and len(eval_64) else 0)
            num_classes = top + 1
            counts = np.bincount(labels_64, minlength=num_classes).tolist()
        fh = self._fh
        for block in (labels_64, eval_x, eval_64):
            if block is not None:
                fh.write(block.tobytes())
        fh.flush()
        desc = _description(self.shape, _CODES[self.dtype], self.divisor, self.offset)
        for block in (labels_64, eval_x, eval_64):
            if block is not None:
                self._hash.update(block.tobytes())
        self._hash.update(desc)
        points = np.memmap(self.tmp, dtype=self.dtype, mode="r", offset=8 + self.header_room, shape=(n, *self.shape))
        sample = _sample_digest(points[sample_positions(n)])
        del points
        extra = {
            "fingerprint": self._hash.hexdigest()[:16],
            "sample_digest": sample,
            "class_counts": json.dumps(counts),
        }
        header = self._header(n, num_classes, None if eval_x is None else len(eval_x), extra)
        if len(header) > self.header_room:
            raise RuntimeError("pack header outgrew its reserved room")
        header = header + b" " * (self.header_room - len(header))  # safetensors allows trailing spaces
        fh.seek(0)
        fh.write(struct.pack("<Q", len(header)) + header)
        fh.flush()
        os.fsync(fh.fileno())
        fh.close()
        self._fh = None
        os.replace(self.tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return self.path
