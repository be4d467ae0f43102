"""Datasets (train/eval split, labels, fingerprint), the source distribution and a resumable stream
of minibatch indices."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from sdfm.config import DataConfig
from sdfm.data import files, synthetic
from sdfm.data.synthetic import Source, sample_source
from sdfm.errors import UserError

__all__ = ["Dataset", "DataStream", "Source", "load_dataset", "sample_source", "fingerprint"]


def fingerprint(x: Tensor, labels: Tensor | None, source: Tensor | None = None) -> str:
    """A short content hash of the training points (and labels, and the points of a file source):
    equal data, equal fingerprint."""
    h = hashlib.sha256()
    h.update(str(tuple(x.shape)).encode())
    h.update(x.detach().cpu().contiguous().numpy().tobytes())
    if labels is not None:
        h.update(labels.cpu().contiguous().numpy().tobytes())
    if source is not None:
        h.update(b"source")
        h.update(source.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class Dataset:
    """Training and held-out points of one dataset.

    Attributes:
        name: dataset name ('moons', 'digits', 'file:<path>', ...).
        x: (N, *shape) float32 training points.
        labels: (N,) int64 classes or None.
        x_eval: (M, *shape) held-out points, never trained on.
        labels_eval: (M,) int64 or None.
        num_classes: number of classes (0 without labels).
        fingerprint: content hash of x and labels (see ``fingerprint``), and of the source points
            when the source is a file (a potential or checkpoint depends on both).
        source: the source distribution of x0 (``data.source``).
    """

    name: str
    x: Tensor
    labels: Tensor | None
    x_eval: Tensor
    labels_eval: Tensor | None
    num_classes: int
    fingerprint: str
    source: Source = Source()

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one point, e.g. (2,) or (1, 28, 28)."""
        return tuple(self.x.shape[1:])

    @property
    def is_image(self) -> bool:
        return len(self.shape) == 3

    def __len__(self) -> int:
        return self.x.shape[0]


def _split(x: np.ndarray, labels: np.ndarray | None, num_eval: int, seed: int, what: str):
    """Hold out min(num_eval, N // 5) points chosen by a seeded permutation (num_eval = 0: none, every
    point trains)."""
    if num_eval == 0:
        none = np.zeros((0, *x.shape[1:]), x.dtype)
        return x, labels, none, None if labels is None else labels[:0]
    num_eval = min(num_eval, len(x) // 5)
    if num_eval < 2:
        raise UserError(
            f"{what} has only {len(x)} points; sdfm needs at least 10 to hold some out for evaluation"
        )
    perm = np.random.default_rng(seed).permutation(len(x))
    ev, tr = perm[:num_eval], perm[num_eval:]
    return x[tr], None if labels is None else labels[tr], x[ev], None if labels is None else labels[ev]


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load or generate the dataset named by ``cfg`` (see DataConfig for the choices)."""
    if cfg.name in synthetic.SETS:
        gen = torch.Generator().manual_seed(cfg.seed)
        x = synthetic.SETS[cfg.name](cfg.num_points, gen).numpy()
        x_eval = synthetic.SETS[cfg.name](cfg.num_eval, gen).numpy()
        labels = labels_eval = None
    elif cfg.name == "digits":
        x, labels, x_eval, labels_eval = _split(*files.load_digits(), cfg.num_eval, cfg.seed, "digits")
    elif cfg.name == "fashion-mnist":
        x, labels = files.load_fashion_mnist("train")
        x_eval, labels_eval = files.load_fashion_mnist("test")
        x_eval, labels_eval = x_eval[: cfg.num_eval], labels_eval[: cfg.num_eval]
    elif cfg.name == "file":
        x, labels, x_eval, labels_eval = _split(
            *files.load_file(cfg.path), cfg.num_eval, cfg.seed, f"data.path {cfg.path}"
        )
    else:
        raise UserError(f"unknown data.name '{cfg.name}'")
    source = Source(cfg.source)
    if cfg.source == "file":
        points, _ = files.load_file(cfg.source_path, "data.source_path")
        if points.shape[1:] != x.shape[1:]:
            raise UserError(
                f"data.source_path {cfg.source_path} holds points of shape {points.shape[1:]} but the data's are "
                f"{x.shape[1:]}; use a source file of the data's point shape"
            )
        source = Source("file", torch.from_numpy(np.ascontiguousarray(points, dtype=np.float32)))
    elif cfg.source != "normal" and x.shape[1:] != (2,):
        raise UserError(
            f"data.source='{cfg.source}' is a 2-D distribution but the data has shape {x.shape[1:]}; use data.source='normal'"
        )
    if cfg.max_points and cfg.max_points < len(x):
        keep = np.sort(np.random.default_rng(cfg.seed + 1).permutation(len(x))[: cfg.max_points])
        x, labels = x[keep], None if labels is None else labels[keep]
    if cfg.conditional and labels is None:
        raise UserError(
            f"data.conditional=true needs labels but '{cfg.name}' has none; set data.conditional=false"
        )
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    lt = None if labels is None else torch.from_numpy(labels)
    name = cfg.name if cfg.name != "file" else f"file:{cfg.path}"
    return Dataset(
        name=name,
        x=xt,
        labels=lt,
        x_eval=torch.from_numpy(np.ascontiguousarray(x_eval, dtype=np.float32)),
        labels_eval=None if labels_eval is None else torch.from_numpy(labels_eval),
        num_classes=0
        if labels is None
        else int(max(labels.max(), labels_eval.max() if labels_eval is not None and len(labels_eval) else 0))
        + 1,
        fingerprint=fingerprint(xt, lt, source.points),
        source=source,
    )


class DataStream:
    """An endless, resumable stream of minibatch indices into a dataset of n points.

    Epoch e visits a permutation drawn from a generator seeded with (seed, e), so the position
    (epoch, batch) is the whole state: resuming from it reproduces the same batches exactly.
    The last incomplete batch of an epoch is dropped.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        if batch_size > n:
            raise UserError(
                f"train.batch_size={batch_size} is larger than the {n} training points; lower train.batch_size"
            )
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.batch = 0, 0
        self._perm: Tensor | None = None

    def _permutation(self) -> Tensor:
        if self._perm is None:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._perm = torch.randperm(self.n, generator=gen)
        return self._perm

    def peek(self) -> Tensor:
        """Indices (batch_size,) of the next minibatch, without moving the stream (what ``next`` returns)."""
        start = self.batch * self.batch_size
        return self._permutation()[start : start + self.batch_size]

    def next(self) -> Tensor:
        """Indices (batch_size,) of the next minibatch."""
        idx = self.peek()
        self.batch += 1
        if (self.batch + 1) * self.batch_size > self.n:
            self.epoch, self.batch, self._perm = self.epoch + 1, 0, None
        return idx

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "seed": self.seed,
            "n": self.n,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["n"] != self.n or state["batch_size"] != self.batch_size:
            raise UserError(
                f"checkpoint data position is for {state['n']} points in batches of {state['batch_size']}, "
                f"but this run has {self.n} and {self.batch_size}; resume with the run's own config"
            )
        self.seed, self.epoch, self.batch, self._perm = state["seed"], state["epoch"], state["batch"], None
