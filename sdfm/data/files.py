"""Readers for real data: scikit-learn digits, Fashion-MNIST (Debian package), and user files.

Every reader returns float32 arrays scaled to the training range and int64 labels (or None). Images
are (N, C, H, W) in [-1, 1]; vectors are (N, d) as stored. Bad files raise UserError naming the path.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from sdfm.errors import UserError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
_X_KEYS = ("x", "data", "images", "arr_0")
_LABEL_KEYS = ("labels", "y", "targets")


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits: (1797, 1, 8, 8) in [-1, 1] and (1797,) labels."""
    from sklearn.datasets import load_digits as sk_load_digits

    d = sk_load_digits()
    x = d.images.astype(np.float32)[:, None] / 16.0 * 2.0 - 1.0
    return x, d.target.astype(np.int64)


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


def load_fashion_mnist(split: str, root: Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ('train': 60,000, 'test': 10,000): (N, 1, 28, 28) in [-1, 1] and (N,) labels."""
    if not fashion_mnist_available(root):
        raise UserError(
            f"Fashion-MNIST files not found in {root}; install them with "
            "`apt-get install dataset-fashion-mnist` (./launch/setup.sh does this when run as root)"
        )
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
    labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")
    return images[:, None].astype(np.float32) / 127.5 - 1.0, labels.astype(np.int64)


def _to_training_layout(x: np.ndarray, path: Path) -> np.ndarray:
    """Scale integer images to [-1, 1] and move arrays to (N, d) or (N, C, H, W)."""
    if x.ndim < 2 or x.ndim > 4:
        raise UserError(
            f"{path}: array of shape {x.shape} is not supported; store (N, d) vectors, (N, H, W) or "
            "(N, C, H, W) / (N, H, W, C) images"
        )
    if x.shape[0] == 0 or x.size == 0:
        raise UserError(f"{path}: the array is empty (shape {x.shape}); point the config at a file with data")
    if np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_:
        x = x.astype(np.float32) / 127.5 - 1.0 if x.ndim > 2 else x.astype(np.float32)
    elif not np.issubdtype(x.dtype, np.floating):
        raise UserError(f"{path}: array dtype {x.dtype} is not numeric; store float or integer data")
    x = x.astype(np.float32, copy=False)
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[1] not in (1, 3) and x.shape[3] in (1, 3):
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    elif x.ndim == 4 and x.shape[1] not in (1, 3):
        raise UserError(
            f"{path}: cannot tell the channel axis of images of shape {x.shape}; use (N, C, H, W) with C = 1 or 3"
        )
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).reshape(len(x), -1).any(1).sum())
        raise UserError(f"{path}: {bad} sample(s) contain NaN or Inf; clean the data before training")
    return x


def _pick(arrays: dict, keys: tuple[str, ...]) -> np.ndarray | None:
    for k in keys:
        if k in arrays:
            return np.asarray(arrays[k])
    return None


def _check_labels(labels: np.ndarray | None, n: int, path: Path) -> np.ndarray | None:
    if labels is None:
        return None
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != n or not np.issubdtype(labels.dtype, np.integer) or (labels < 0).any():
        raise UserError(
            f"{path}: labels must be {n} non-negative integers (got shape {labels.shape}, dtype {labels.dtype})"
        )
    return labels.astype(np.int64)


def _load_image_folder(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    from PIL import Image

    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(
            f"{path}: folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); point the config at image files"
        )
    # One sub-folder per class gives labels, as in torchvision's ImageFolder.
    classes = sorted({p.parent.relative_to(path).as_posix() for p in files})
    images = []
    for p in files:
        try:
            with Image.open(p) as im:
                im = im.convert("L" if im.mode in ("1", "L", "LA", "I", "I;16") else "RGB")
                images.append(np.asarray(im))
        except OSError as e:
            raise UserError(f"{p}: cannot read image ({e}); remove or fix the file") from None
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise UserError(
            f"{path}: images have different sizes {sorted(shapes)[:3]}...; resize them to one size"
        )
    x = np.stack(images)
    labels = (
        np.array([classes.index(p.parent.relative_to(path).as_posix()) for p in files])
        if len(classes) > 1
        else None
    )
    return x, labels


def load_file(path_str: str, key: str = "data.path") -> tuple[np.ndarray, np.ndarray | None]:
    """Read user data from .npy, .npz, .safetensors or a folder of images; ``key`` names the config
    key in error messages."""
    path = Path(path_str).expanduser()
    if not path.exists():
        raise UserError(
            f"{key} {path} does not exist; point --{key} at a .npy/.npz/.safetensors file or an image folder"
        )
    labels = None
    try:
        if path.is_dir():
            x, labels = _load_image_folder(path)
        elif path.suffix == ".npy":
            x = np.load(path, allow_pickle=False)
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            x = _pick(arrays, _X_KEYS)
            if x is None:
                raise UserError(
                    f"{path}: no array named one of {_X_KEYS}; store the data under 'x' (labels under 'labels')"
                )
            labels = _pick(arrays, _LABEL_KEYS)
        elif path.suffix == ".safetensors":
            from safetensors.numpy import load_file as st_load

            arrays = st_load(str(path))
            x = _pick(arrays, _X_KEYS)
            if x is None:
                raise UserError(
                    f"{path}: no tensor named one of {_X_KEYS}; store the data under 'x' (labels under 'labels')"
                )
            labels = _pick(arrays, _LABEL_KEYS)
        else:
            raise UserError(
                f"{path}: unsupported file type '{path.suffix}'; use .npy, .npz, .safetensors or a folder of images"
            )
    except UserError:
        raise
    except Exception as e:  # numpy/safetensors raise many types for truncated or foreign files
        raise UserError(
            f"{path}: cannot read the array ({type(e).__name__}: {e}); check that the file is complete"
        ) from None
    x = _to_training_layout(np.asarray(x), path)
    return x, _check_labels(labels, len(x), path)
