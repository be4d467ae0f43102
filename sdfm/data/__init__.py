"""Datasets (train/eval split, labels, fingerprint), the source distribution and a resumable stream
of minibatch indices. Points stay in their stored dtype (``sdfm.data.points``); large datasets are
packs (``sdfm.data.pack``) that every process memory-maps."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from sdfm.config import DataConfig
from sdfm.data import files, synthetic
from sdfm.data.points import Points
from sdfm.data.synthetic import Source, sample_source
from sdfm.errors import UserError
from sdfm.memory import require_memory

__all__ = ["Dataset", "DataStream", "Points", "Source", "load_dataset", "sample_source", "fingerprint"]


def fingerprint(x: Points | Tensor, labels: Tensor | None, source: Tensor | None = None) -> str:
    """A short content hash of the training points as float32 (and labels, and the points of a file
    source): equal data, equal fingerprint. Streams the points in chunks (no float32 copy of them)."""
    h = hashlib.sha256()
    h.update(str(tuple(x.shape)).encode())
    chunks = x.chunks() if isinstance(x, Points) else [x.detach().cpu().contiguous()]
    for chunk in chunks:
        h.update(chunk.contiguous().numpy().tobytes())
    _hash_rest(h, labels, source)
    return h.hexdigest()[:16]


def _hash_rest(h, labels: Tensor | None, source: Tensor | None) -> None:
    if labels is not None:
        h.update(labels.cpu().contiguous().numpy().tobytes())
    if source is not None:
        h.update(b"source")
        h.update(source.detach().cpu().contiguous().numpy().tobytes())


def pack_run_fingerprint(pack_fingerprint: str, x: Points, labels: Tensor | None, source: Tensor | None) -> str:
    """The fingerprint of a training set taken from a pack: the pack's own (computed once, when it was
    packed) with the rows of the pack this set holds, their labels and the source points. Costs
    milliseconds, since it never reads the points."""
    h = hashlib.sha256()
    h.update(f"pack {pack_fingerprint} {tuple(x.shape)}".encode())
    h.update(b"all" if x.rows is None else x.rows.contiguous().numpy().tobytes())
    _hash_rest(h, labels, source)
    return h.hexdigest()[:16]


@dataclass
class Dataset:
    """Training and held-out points of one dataset.

    Attributes:
        name: dataset name ('moons', 'digits', 'file:<path>', ...).
        x: the N training points (``Points``: stored compactly, often memory-mapped; ``x.take(idx,
            device)`` reads rows as float32 on a device, ``x[idx]`` on the host).
        labels: (N,) int64 classes or None.
        x_eval: the M held-out points, never trained on (``Points``).
        labels_eval: (M,) int64 or None.
        num_classes: number of classes (0 without labels).
        fingerprint: content hash of x and labels (see ``fingerprint``), and of the source points
            when the source is a file (a potential or checkpoint depends on both); for a pack, derived
            from the pack's fingerprint (``pack_run_fingerprint``).
        source: the source distribution of x0 (``data.source``).
        pack_fingerprint: the fingerprint of the pack the points come from, or None.
    """

    name: str
    x: Points
    labels: Tensor | None
    x_eval: Points
    labels_eval: Tensor | None
    num_classes: int
    fingerprint: str
    source: Source = Source()
    pack_fingerprint: str | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one point, e.g. (2,) or (1, 28, 28)."""
        return tuple(self.x.shape[1:])

    @property
    def is_image(self) -> bool:
        return len(self.shape) == 3

    def __len__(self) -> int:
        return len(self.x)


def _split(x: Points, labels: np.ndarray | None, num_eval: int, seed: int, what: str):
    """Hold out min(num_eval, N // 5) points chosen by a seeded permutation (num_eval = 0: none, every
    point trains). Both parts are row sets of the same storage, not copies."""
    if num_eval == 0:
        return x, labels, x.subset(np.zeros(0, np.int64)), None if labels is None else labels[:0]
    num_eval = min(num_eval, len(x) // 5)
    if num_eval < 2:
        raise UserError(
            f"{what} has only {len(x)} points; sdfm needs at least 10 to hold some out for evaluation"
        )
    perm = np.random.default_rng(seed).permutation(len(x))
    ev, tr = perm[:num_eval], perm[num_eval:]
    return (
        x.subset(tr),
        None if labels is None else labels[tr],
        x.subset(ev),
        None if labels is None else labels[ev],
    )


def _dense(x: Tensor) -> Points:
    return Points(x.contiguous())


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load or generate the dataset named by ``cfg`` (see DataConfig for the choices). Packs and .npy
    files stay memory-mapped; nothing here converts the points to float32."""
    pack_fp = None
    if cfg.name in synthetic.SETS:
        need = 4 * 4.0 * 2 * (cfg.num_points + cfg.num_eval)  # 2-D float32 points and the generator's temporaries
        require_memory(need, f"data.num_points = {cfg.num_points}", "generate fewer points")
        gen = torch.Generator().manual_seed(cfg.seed)
        x = _dense(synthetic.SETS[cfg.name](cfg.num_points, gen))
        x_eval = _dense(synthetic.SETS[cfg.name](cfg.num_eval, gen))
        labels = labels_eval = None
    elif cfg.name == "digits":
        x, labels, x_eval, labels_eval = _split(*files.load_digits(), cfg.num_eval, cfg.seed, "digits")
    elif cfg.name == "fashion-mnist":
        x, labels = files.load_fashion_mnist("train")
        x_eval, labels_eval = files.load_fashion_mnist("test")
        keep = np.arange(min(cfg.num_eval, len(x_eval)))
        x_eval, labels_eval = x_eval.subset(keep), labels_eval[keep]
    elif cfg.name == "file":
        got = files.load_file(cfg.path)
        pack_fp = got.pack_fingerprint
        if got.eval_x is not None:  # the pack carries its own held-out set
            keep = np.arange(min(cfg.num_eval, len(got.eval_x)))
            x, labels = got.x, got.labels
            x_eval = got.eval_x.subset(keep)
            labels_eval = None if got.eval_labels is None else got.eval_labels[keep]
        else:
            x, labels, x_eval, labels_eval = _split(got.x, got.labels, cfg.num_eval, cfg.seed, f"data.path {cfg.path}")
    else:
        raise UserError(f"unknown data.name '{cfg.name}'")
    source = Source(cfg.source)
    if cfg.source == "file":
        got = files.load_file(cfg.source_path, "data.source_path")
        if tuple(got.x.shape[1:]) != tuple(x.shape[1:]):
            raise UserError(
                f"data.source_path {cfg.source_path} holds points of shape {tuple(got.x.shape[1:])} but the data's are "
                f"{tuple(x.shape[1:])}; use a source file of the data's point shape"
            )
        files.check_values(got.x, f"data.source_path {cfg.source_path}")  # integer files too
        source = Source("file", got.x.dense())
    elif cfg.source != "normal" and tuple(x.shape[1:]) != (2,):
        raise UserError(
            f"data.source='{cfg.source}' is a 2-D distribution but the data has shape {tuple(x.shape[1:])}; use data.source='normal'"
        )
    if cfg.max_points and cfg.max_points < len(x):
        keep = np.sort(np.random.default_rng(cfg.seed + 1).permutation(len(x))[: cfg.max_points])
        x, labels = x.subset(keep), None if labels is None else labels[keep]
    if cfg.conditional and labels is None:
        raise UserError(
            f"data.conditional=true needs labels but '{cfg.name}' has none; set data.conditional=false"
        )
    lt = None if labels is None else torch.as_tensor(np.asarray(labels), dtype=torch.long)
    le = None if labels_eval is None else torch.as_tensor(np.asarray(labels_eval), dtype=torch.long)
    name = cfg.name if cfg.name != "file" else f"file:{cfg.path}"
    top = max(int(lt.max()) if lt is not None and len(lt) else -1, int(le.max()) if le is not None and len(le) else -1)
    return Dataset(
        name=name,
        x=x,
        labels=lt,
        x_eval=x_eval,
        labels_eval=le,
        num_classes=0 if lt is None else top + 1,
        fingerprint=pack_run_fingerprint(pack_fp, x, lt, source.points)
        if pack_fp
        else fingerprint(x, lt, source.points),
        source=source,
        pack_fingerprint=pack_fp,
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
