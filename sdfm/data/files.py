"""Readers for real data: scikit-learn digits, Fashion-MNIST (Debian package), packs and user files.

Every reader returns ``Points`` in their stored dtype (nothing is converted to float32 here; .npy files
and packs stay memory-mapped) and int64 labels (or None). Points read as (N, C, H, W) images in
[-1, 1] or (N, d) vectors as stored. Bad files raise UserError naming the path.
"""

from __future__ import annotations

import gzip
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sdfm.data.points import Points
from sdfm.errors import UserError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
X_KEYS = ("x", "data", "images", "arr_0")
LABEL_KEYS = ("labels", "y", "targets")


def digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits as stored: (1797, 1, 8, 8) uint8 in [0, 16] and (1797,) labels."""
    from sklearn.datasets import load_digits as sk_load_digits

    d = sk_load_digits()
    return d.images.astype(np.uint8)[:, None], d.target.astype(np.int64)


def load_digits() -> tuple[Points, np.ndarray]:
    """The digits as points in [-1, 1] (x / 8 - 1) and their labels."""
    x, labels = digits_uint8()
    return Points(torch.from_numpy(x), divisor=8.0, offset=-1.0), labels


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    _, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if dtype_code != 0x08:
        raise UserError(f"{path} is not an idx file of unsigned bytes; reinstall dataset-fashion-mnist")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist_available(root: Path = FASHION_MNIST_DIR) -> bool:
    return (root / "train-images-idx3-ubyte.gz").is_file()


def fashion_mnist_uint8(split: str, root: Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST as stored ('train': 60,000, 'test': 10,000): (N, 1, 28, 28) uint8 and (N,) labels."""
    if not fashion_mnist_available(root):
        raise UserError(
            f"Fashion-MNIST files not found in {root}; install them with "
            "`apt-get install dataset-fashion-mnist` (./launch/setup.sh does this when run as root)"
        )
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
    labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")
    return images[:, None], labels.astype(np.int64)


def load_fashion_mnist(split: str, root: Path = FASHION_MNIST_DIR) -> tuple[Points, np.ndarray]:
    """Fashion-MNIST points in [-1, 1] (uint8 kept, read as x / 127.5 - 1) and their labels."""
    x, labels = fashion_mnist_uint8(split, root)
    return Points(torch.from_numpy(np.array(x)), divisor=127.5, offset=-1.0), labels


def array_layout(x: np.ndarray, path) -> tuple[tuple[int, ...], float, float, bool]:
    """How an array of points is read: (point shape (d,) or (C, H, W), divisor, offset, channels-last
    storage). Integer images are scaled from [0, 255] to [-1, 1]; everything else is read as stored.
    (N, H, W) images get one channel; (N, H, W, C) are read as (C, H, W)."""
    if x.ndim < 2 or x.ndim > 4:
        raise UserError(
            f"{path}: array of shape {x.shape} is not supported; store (N, d) vectors, (N, H, W) or "
            "(N, C, H, W) / (N, H, W, C) images"
        )
    if x.shape[0] == 0 or x.size == 0:
        raise UserError(f"{path}: the array is empty (shape {x.shape}); point the config at a file with data")
    integer = np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_
    if not integer and not np.issubdtype(x.dtype, np.floating):
        raise UserError(f"{path}: array dtype {x.dtype} is not numeric; store float or integer data")
    shape, channels_last = tuple(x.shape[1:]), False
    if x.ndim == 3:
        shape = (1, *shape)
    elif x.ndim == 4 and x.shape[1] not in (1, 3):
        if x.shape[3] not in (1, 3):
            raise UserError(
                f"{path}: cannot tell the channel axis of images of shape {x.shape}; use (N, C, H, W) with C = 1 or 3"
            )
        channels_last, shape = True, (x.shape[3], x.shape[1], x.shape[2])
    scaled = integer and x.ndim > 2
    return shape, 127.5 if scaled else 1.0, -1.0 if scaled else 0.0, channels_last


def as_points(x: np.ndarray, path) -> Points:
    """Points over an array as stored (a memory map stays one: nothing is converted here)."""
    _, divisor, offset, channels_last = array_layout(x, path)
    if x.ndim == 3:
        x = x[:, None]
    if x.dtype == np.bool_:
        x = x.astype(np.uint8)
    if not x.dtype.isnative:  # a big-endian file: torch reads native byte order only (this copies)
        x = x.astype(x.dtype.newbyteorder("="))
    with warnings.catch_warnings():  # a read-only memory map: sdfm never writes into data
        warnings.simplefilter("ignore", UserWarning)
        storage = torch.from_numpy(x)
    points = Points(storage, divisor=divisor, offset=offset, channels_last=channels_last)
    if x.dtype.kind == "f":
        check_values(points, path)
    return points


MAX_ABS = 1e15
"""Largest coordinate sdfm trains on: beyond it the squared distances and losses of a batch overflow
float32 (3.4e38) for any dimension up to 10^8."""


def check_values(points: Points, path) -> None:
    """Refuse points holding NaN, Inf or values beyond ``MAX_ABS`` (one line naming the file)."""
    good = points.is_finite(MAX_ABS)
    if not bool(good.all()):
        bad = int((~good).sum())
        raise UserError(
            f"{path}: {bad} sample(s) contain NaN, Inf or values beyond {MAX_ABS:g} (which overflow float32 in "
            "training); clean or rescale the data before training"
        )


def pick(arrays: dict, keys: tuple[str, ...]) -> np.ndarray | None:
    for k in keys:
        if k in arrays:
            return np.asarray(arrays[k])
    return None


def check_labels(labels: np.ndarray | None, n: int, path: Path) -> np.ndarray | None:
    if labels is None:
        return None
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != n or not np.issubdtype(labels.dtype, np.integer) or (labels < 0).any():
        raise UserError(
            f"{path}: labels must be {n} non-negative integers (got shape {labels.shape}, dtype {labels.dtype})"
        )
    return labels.astype(np.int64)


def decode_image(task: tuple[str, int | None, str]) -> np.ndarray | str:
    """One image file as uint8 (C, H, W) in ``mode`` ('L' or 'RGB'), with its shorter side resized to
    ``size`` and centre-cropped to size x size when ``size`` is given; a one-line reason when it cannot
    be read. ``task`` = (path, size, mode), one picklable argument for a process pool."""
    path, size, mode = task
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert(mode)
            if size:
                w, h = im.size
                scale = size / min(w, h)
                im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
                w, h = im.size
                left, top = (w - size) // 2, (h - size) // 2
                im = im.crop((left, top, left + size, top + size))
            a = np.asarray(im, dtype=np.uint8)
    except Exception as e:  # PIL raises OSError, ValueError, DecompressionBombError... for bad files
        return f"{type(e).__name__}: {e}"
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def image_mode(paths: list[Path]) -> str:
    """'L' when the first readable image is grayscale, else 'RGB' (every image is converted to it)."""
    from PIL import Image

    for p in paths[:64]:
        try:
            with Image.open(p) as im:
                return "L" if im.mode in ("1", "L", "LA", "I", "I;16") else "RGB"
        except Exception:  # noqa: S112 - an unreadable image is reported when it is decoded
            continue
    return "RGB"


def image_files(path: Path) -> tuple[list[Path], list[str]]:
    """(the image files under ``path`` in sorted order, the class names: their sub-folders, sorted)."""
    found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not found:
        raise UserError(
            f"{path}: folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); point at image files"
        )
    return found, sorted({p.parent.relative_to(path).as_posix() for p in found})


def _load_image_folder(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Every image of a folder in memory (uint8); one sub-folder per class gives labels, as in
    torchvision's ImageFolder. Large folders belong in a pack (``sdfm data pack``)."""
    paths, classes = image_files(path)
    mode = image_mode(paths)
    images = []
    for p in paths:
        a = decode_image((str(p), None, mode))
        if isinstance(a, str):
            raise UserError(f"{p}: cannot read image ({a}); remove or fix the file")
        images.append(a)
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise UserError(
            f"{path}: images have different sizes {sorted(shapes)[:3]}...; pack them with "
            "`sdfm data pack FOLDER OUT.safetensors --size S`, which resizes them"
        )
    labels = (
        np.array([classes.index(p.parent.relative_to(path).as_posix()) for p in paths]) if len(classes) > 1 else None
    )
    return np.stack(images), labels


def read_array_file(path: Path, accepted: str) -> tuple[np.ndarray, np.ndarray | None]:
    """The points of a .npy (memory-mapped), .npz or .safetensors file (under one of ``X_KEYS``) and its
    labels (``LABEL_KEYS``) or None, as stored; UserError naming the file for anything else or
    unreadable (``accepted``: what the caller takes instead, for the message)."""
    try:
        if path.suffix == ".npy":
            return np.load(path, mmap_mode="r", allow_pickle=False), None
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        elif path.suffix == ".safetensors":
            from safetensors.numpy import load_file as st_load

            arrays = st_load(str(path))
        else:
            raise UserError(f"{path}: unsupported file type '{path.suffix}'; {accepted}")
    except UserError:
        raise
    except Exception as e:  # numpy/safetensors raise many types for truncated or foreign files
        raise UserError(
            f"{path}: cannot read the array ({type(e).__name__}: {e}); check that the file is complete"
        ) from None
    x = pick(arrays, X_KEYS)
    if x is None:
        raise UserError(f"{path}: no array named one of {X_KEYS}; store the data under 'x' (labels under 'labels')")
    return x, pick(arrays, LABEL_KEYS)


@dataclass
class FileData:
    """Points read from a user file.

    Attributes:
        x: the points (memory-mapped for packs and .npy files).
        labels: (N,) int64 or None.
        eval_x, eval_labels: a held-out set that came with the file (a pack of Fashion-MNIST), or None.
        pack_fingerprint: the pack's fingerprint, when the file is a pack.
    """

    x: Points
    labels: np.ndarray | None
    eval_x: Points | None = None
    eval_labels: np.ndarray | None = None
    pack_fingerprint: str | None = None


def load_file(path_str: str, key: str = "data.path") -> FileData:
    """Read user data: a pack (``sdfm data pack``), .npy (memory-mapped), .npz, .safetensors or a folder
    of images; ``key`` names the config key in error messages."""
    from sdfm.data.pack import is_pack, open_pack

    path = Path(path_str).expanduser()
    if not path.exists():
        raise UserError(
            f"{key} {path} does not exist; point --{key} at a pack, a .npy/.npz/.safetensors file or an image folder"
        )
    if is_pack(path):
        pack = open_pack(path)
        labels = None if pack.labels is None else pack.labels.numpy()
        eval_labels = None if pack.eval_labels is None else pack.eval_labels.numpy()
        return FileData(pack.x, labels, pack.eval_x, eval_labels, pack.fingerprint)
    if path.is_dir():
        x, labels = _load_image_folder(path)
    else:
        x, labels = read_array_file(path, "use a pack, .npy, .npz, .safetensors or a folder of images")
    points = as_points(x, path)
    return FileData(points, check_labels(labels, len(points), path))
