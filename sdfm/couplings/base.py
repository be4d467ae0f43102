"""The coupling interface: how a batch of source samples is paired with target samples.

Two kinds share it. A minibatch coupling (``MinibatchCoupling``: independent, exact OT, Sinkhorn)
pairs x0 with a permutation or a sample of the target batch it is given. A dataset-level coupling
(the semidiscrete one) pairs x0 with points of the whole dataset and uses the batch only for its
labels. Both answer ``pair``; only minibatch couplings have ``match``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Pairs:
    """Training pairs produced by a coupling.

    Attributes:
        x0: (B, *shape) source samples.
        x1: (B, *shape) target samples paired with x0 row by row.
        labels: (B,) int64 class of each x1, or None for unlabeled data.
        index: (B,) int64 position of each x1 in the target batch (minibatch couplings; the global
            batch in a data-parallel job) or in the dataset (dataset-level couplings).
        v0, v1: (B, *shape) velocities at the endpoints, for couplings of (position, velocity)
            states (OAT-FM fine-tuning, ``sdfm.methods.oat``); None otherwise.
    """

    x0: Tensor
    x1: Tensor
    labels: Tensor | None
    index: Tensor
    v0: Tensor | None = None
    v1: Tensor | None = None


class Coupling(ABC):
    """Pairs source samples x0 with target samples.

    Couplings with state that must survive a resume (warm-start potentials, a dual potential) expose
    it through ``state_dict``/``load_state_dict``; ``stats`` reports the last call's diagnostics
    (iterations, marginal error, ...) for logging; ``poll`` picks up state published from outside.
    """

    per_class: bool = False
    prefetchable: bool = False
    """Whether ``pair`` runs on the CPU and talks to no other rank, so that the next step's pairs can
    be computed in a background thread (``sdfm.pairing``)."""

    @abstractmethod
    def pair(self, x0: Tensor, x1: Tensor, labels: Tensor | None, generator: torch.Generator) -> Pairs:
        """Pair x0 (B, *shape) with targets; x1 (B, *shape) is the target batch and labels (B,) its
        classes (or None). ``generator`` is the only source of randomness."""

    def __call__(
        self,
        x0: Tensor,
        x1: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> Pairs:
        """``pair`` for a user's own loop: ``coupling(x0, x1)`` -> Pairs.

        Args:
            x0: (B, *shape) source samples.
            x1: (B, *shape) the target batch (a dataset-level coupling may take None).
            labels: (B,) classes of x1, or None.
            generator: the source of randomness; None draws a seed from torch's global generator
                (so ``torch.manual_seed`` makes the call reproducible).

        Example:
            >>> pairs = sdfm.ExactOT()(torch.randn(64, 2), data[:64])
            >>> pairs.x1  # a permutation of data[:64]
        """
        if generator is None:
            generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))
        if x1 is None:
            raise ValueError(f"{type(self).__name__} pairs x0 with a target batch: pass x1 (B, *shape)")
        return self.pair(x0, x1, labels, generator)

    def poll(self) -> bool:
        """Called at every step boundary: pick up state published from outside (a new dual potential
        from the worker). True when something changed."""
        return False

    def stats(self) -> dict[str, float]:
        """Diagnostics of the last call (for the log line and metrics.jsonl)."""
        return {}

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        del state


class CouplingWrapper(Coupling):
    """A coupling that gives another one (``inner``) a different form, such as its data-parallel one:
    its state and diagnostics are the inner coupling's."""

    def __init__(self, inner: Coupling) -> None:
        self.inner = inner
        self.per_class = inner.per_class

    def stats(self) -> dict[str, float]:
        return self.inner.stats()

    def state_dict(self) -> dict[str, Tensor]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.inner.load_state_dict(state)


def class_blocks(labels: Tensor | None, n: int) -> list[Tensor]:
    """Row ids of each class present in ``labels`` (n,), increasing within a class, classes by value;
    one block of all n rows when ``labels`` is None. The per-class grouping of every minibatch coupling,
    single-process and sharded alike."""
    if labels is None:
        return [torch.arange(n)]
    order = torch.argsort(labels, stable=True)
    blocks, start = [], 0
    for count in torch.bincount(labels[order]).tolist():
        if count:
            blocks.append(order[start : start + count])
            start += count
    return blocks


class MinibatchCoupling(Coupling):
    """A coupling of x0 with the target batch, through ``match``.

    ``match(x0, x1, generator)`` returns for each row of x0 the index of its partner in x1 (same
    size). ``pair`` wraps it; when labels are given and ``per_class`` is set it matches within each
    class only, so pairs never cross classes (x0 is i.i.d. noise, so splitting it into groups of the
    classes' sizes changes nothing about its law).
    """

    @abstractmethod
    def match(self, x0: Tensor, x1: Tensor, generator: torch.Generator) -> Tensor:
        """Return (B,) int64 indices into x1, one partner per row of x0 (B = len(x0) = len(x1))."""

    def pair(self, x0: Tensor, x1: Tensor, labels: Tensor | None, generator: torch.Generator) -> Pairs:
        """Pair x0 (B, *shape) with x1 (B, *shape) (and its labels (B,)) row by row."""
        if x0.shape[0] != x1.shape[0]:
            raise ValueError(f"x0 has {x0.shape[0]} rows but x1 has {x1.shape[0]}")
        if labels is None or not self.per_class:
            index = self.match(x0.flatten(1), x1.flatten(1), generator)
        else:
            index = torch.empty(x1.shape[0], dtype=torch.long, device=x1.device)
            for rows in class_blocks(labels, x1.shape[0]):  # x0 rows and x1 rows of this class
                local = self.match(x0[rows].flatten(1), x1[rows].flatten(1), generator)
                index[rows] = rows[local]
        return Pairs(x0=x0, x1=x1[index], labels=None if labels is None else labels[index], index=index)
