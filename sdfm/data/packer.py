"""``sdfm data pack``: turn a source (image folder, .npy/.npz/.safetensors, a built-in set) into a pack.

Images are stored as uint8 (C, H, W) read as x / 127.5 - 1; float vectors as float16 or float32 as
given (float64 becomes float32); integer vectors as float32. Image folders are decoded in several
processes (``workers``), in file order, with a progress bar on a terminal; ``size`` resizes the
shorter side and centre-crops (the ImageNet-32/64 recipe). Unreadable images are skipped and
counted, or refused with ``strict``. The pack is written by ``PackWriter``: atomically, and never over
an existing file unless ``overwrite``.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdfm.data import files
from sdfm.data.pack import PackWriter, open_pack
from sdfm.errors import UserError

__all__ = ["PackReport", "pack_source"]

BUILTIN = ("fashion-mnist", "digits")
_BLOCK_BYTES = 32 << 20


@dataclass
class PackReport:
    """What a pack run did.

    Attributes:
        path: the pack written.
        n: points packed; skipped: unreadable images left out.
        seconds: wall time; fingerprint: the pack's.
    """

    path: Path
    n: int
    skipped: int
    seconds: float
    fingerprint: str


def _check_target(out: Path, overwrite: bool) -> None:
    if out.suffix != ".safetensors":
        raise UserError(f"pack target {out} must end in .safetensors (a pack is a safetensors file)")
    if out.exists() and not overwrite:
        raise UserError(f"pack target {out} exists; pass --overwrite to replace it, or choose another OUT")
    if out.exists() and not out.is_file():
        raise UserError(f"pack target {out} is not a file; choose another OUT")
    if not out.parent.is_dir():
        raise UserError(f"the folder of pack target {out} does not exist; create it first")


def _progress(total: int, what: str, enabled: bool | None):
    from tqdm import tqdm

    enabled = sys.stderr.isatty() if enabled is None else enabled
    return tqdm(total=total, unit=" img" if what == "images" else " rows", desc=f"packing {what}", disable=not enabled)


# ------------------------------------------------------------------------------------------- arrays


def _layout(x: np.ndarray, path: str) -> tuple[tuple[int, ...], np.dtype, float, float, bool]:
    """(stored shape of a point, stored dtype, divisor, offset, channels-last source) of an array:
    ``files.array_layout``, with integer images stored as uint8 and other points as float16/float32."""
    shape, divisor, offset, channels_last = files.array_layout(x, path)
    if divisor != 1.0:
        return shape, np.dtype(np.uint8), divisor, offset, channels_last
    dtype = np.dtype(np.float16) if x.dtype == np.float16 else np.dtype(np.float32)
    return shape, dtype, divisor, offset, channels_last


def _pack_array(
    x: np.ndarray,
    labels: np.ndarray | None,
    out: Path,
    *,
    name: str,
    source: str,
    eval_x: np.ndarray | None = None,
    eval_labels: np.ndarray | None = None,
    layout: tuple | None = None,
    progress: bool | None = None,
) -> int:
    """Write the rows of ``x`` (and its labels, held-out set) as a pack at ``out``, block by block;
    returns how many points it holds."""
    shape, dtype, divisor, offset, channels_last = layout or _layout(x, source)
    labels = files.check_labels(labels, len(x), Path(source))
    rows = max(1, _BLOCK_BYTES // max(1, int(np.prod(shape)) * 4))
    with PackWriter(
        out, max_rows=len(x), shape=shape, dtype=dtype, divisor=divisor, offset=offset, name=name,
        source=source, max_classes=0 if labels is None else int(labels.max()) + 1,
    ) as writer, _progress(len(x), "rows", progress) as bar:  # fmt: skip
        for lo in range(0, len(x), rows):
            block = np.asarray(x[lo : lo + rows])
            writer.add(_stored_block(block, shape, dtype, channels_last, source, lo))
            bar.update(block.shape[0])
        writer.finish(labels, eval_x, eval_labels)
    return len(x)


def _stored_block(block: np.ndarray, shape, dtype: np.dtype, channels_last: bool, source: str, lo: int) -> np.ndarray:
    """A block of source rows in the pack's stored layout and dtype (refusing values it cannot hold)."""
    if channels_last:
        block = block.transpose(0, 3, 1, 2)
    block = block.reshape(block.shape[0], *shape)
    if dtype == np.uint8 and block.dtype != np.uint8:
        if block.size and (block.min() < 0 or block.max() > 255):
            raise UserError(
                f"{source}: integer images with values outside [0, 255] (rows from {lo}); store uint8 images, "
                "or float images already in the training range"
            )
        return block.astype(np.uint8)
    if dtype != np.uint8:
        good = (np.abs(block.reshape(len(block), -1)) < files.MAX_ABS).all(1)  # NaN compares False
        if not good.all():
            raise UserError(
                f"{source}: {int((~good).sum())} row(s) from {lo} contain NaN, Inf or values beyond "
                f"{files.MAX_ABS:g}; clean or rescale the data before packing"
            )
    return block


# ------------------------------------------------------------------------------------ image folders


def _pack_folder(
    src: Path, out: Path, *, size: int | None, channels: str, workers: int, strict: bool, progress: bool | None, log
) -> tuple[int, int]:
    paths, classes = files.image_files(src)
    class_of = {c: i for i, c in enumerate(classes)}
    mode = {"1": "L", "3": "RGB"}.get(channels) or files.image_mode(paths)
    workers = max(1, workers)
    tasks = [(str(p), size, mode) for p in paths]
    writer = None
    kept_labels: list[int] = []
    skipped: list[str] = []
    with contextlib.ExitStack() as stack:  # on any error: the partial pack removed, the pool terminated
        pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(workers)) if workers > 1 else None
        results = pool.imap(files.decode_image, tasks, chunksize=32) if pool else map(files.decode_image, tasks)
        bar = stack.enter_context(_progress(len(tasks), "images", progress))
        block: list[np.ndarray] = []
        for p, a in zip(paths, results, strict=True):
            bar.update(1)
            if isinstance(a, str):
                if strict:
                    raise UserError(f"{p}: cannot read image ({a}); remove or fix it, or pack without --strict")
                skipped.append(f"{p}: {a}")
                continue
            if writer is None:
                writer = stack.enter_context(PackWriter(
                    out, max_rows=len(paths), shape=a.shape, dtype=np.uint8, divisor=127.5, offset=-1.0,
                    name=src.name, source=str(src), max_classes=len(classes),
                ))  # fmt: skip
            elif a.shape != writer.shape:
                raise UserError(
                    f"{p}: image of size {a.shape[1]}x{a.shape[2]} but the first was "
                    f"{writer.shape[1]}x{writer.shape[2]}; pass --size S to resize and centre-crop them all"
                )
            block.append(a)
            kept_labels.append(class_of[p.parent.relative_to(src).as_posix()])
            if len(block) * a.nbytes >= _BLOCK_BYTES:
                writer.add(np.stack(block))
                block = []
        if writer is None:
            raise UserError(f"{src}: none of its {len(paths)} images could be read (first: {skipped[0]})")
        if block:
            writer.add(np.stack(block))
        writer.finish(np.asarray(kept_labels) if len(classes) > 1 else None)
    if skipped:
        log(f"warning: skipped {len(skipped)} unreadable image(s) of {len(paths)}, e.g. {skipped[0]}")
    return len(paths) - len(skipped), len(skipped)


# ------------------------------------------------------------------------------------------- entry


def pack_source(
    src: str,
    out: Path,
    *,
    size: int | None = None,
    channels: str = "auto",
    workers: int = 0,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
    log: Callable[[str], None] = print,
) -> PackReport:
    """Pack ``src`` (an image folder, a .npy/.npz/.safetensors file, or 'fashion-mnist' / 'digits')
    into ``out`` (see the module docstring); ``workers`` decoding processes (0: one per core)."""
    import os
    import time

    start = time.perf_counter()
    out = Path(out).expanduser()
    _check_target(out, overwrite)
    skipped = 0
    if size is not None and size < 1:
        raise UserError(f"--size {size} must be a positive number of pixels")
    if src == "fashion-mnist":
        x, labels = files.fashion_mnist_uint8("train")
        ex, el = files.fashion_mnist_uint8("test")
        n = _pack_array(x, labels, out, name=src, source=src, eval_x=ex, eval_labels=el, progress=progress)
    elif src == "digits":
        x, labels = files.digits_uint8()
        layout = ((1, 8, 8), np.dtype(np.uint8), 8.0, -1.0, False)
        n = _pack_array(x, labels, out, name=src, source=src, layout=layout, progress=progress)
    else:
        path = Path(src).expanduser()
        if not path.exists():
            raise UserError(
                f"pack source {path} does not exist; give an image folder, a .npy/.npz/.safetensors file, "
                f"or one of {', '.join(BUILTIN)}"
            )
        if path.resolve() == out.resolve():
            raise UserError(f"pack source and target are the same file {out}; choose another OUT")
        if path.is_dir():
            n, skipped = _pack_folder(
                path, out, size=size, channels=channels, workers=workers or (os.cpu_count() or 1),
                strict=strict, progress=progress, log=log,
            )  # fmt: skip
        else:
            if size is not None:
                raise UserError("--size resizes images of a folder; arrays are packed as they are")
            x, labels = files.read_array_file(
                path, f"pack a .npy/.npz/.safetensors file, an image folder, or one of {', '.join(BUILTIN)}"
            )
            n = _pack_array(x, labels, out, name=path.stem, source=str(path), progress=progress)
    pack = open_pack(out)
    return PackReport(out, n, skipped, time.perf_counter() - start, pack.fingerprint)
