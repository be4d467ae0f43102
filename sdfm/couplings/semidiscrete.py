"""The semidiscrete coupling (SD-FM): each noise sample is matched against the whole dataset through a
dual potential g in R^N, k*(x0) = argmax_j <x0, y_j> + g_j (or a softmax sample when epsilon > 0).

``SemidiscreteCoupling`` is a pure coupling: it pairs with the potential it was given
(``set_potential`` swaps a new one into the matching index in place) and keeps it, with its version,
in ``state_dict`` (so it is in every training checkpoint). Where potentials come from during
training (a fit, a file, the worker's snapshots) is ``sdfm.potential_sources``. ``SemidiscreteOT`` is
the same coupling for a user's own loop: it fits, saves and loads its potential.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from sdfm.config import PotentialConfig
from sdfm.couplings.base import Coupling, Pairs
from sdfm.data.points import Points
from sdfm.errors import UserError
from sdfm.semidiscrete.index import MatchIndex
from sdfm.semidiscrete.potential_file import load_potential, save_potential

_log = logging.getLogger("sdfm")


class SemidiscreteCoupling(Coupling):
    """Pairs noise with data points of the whole dataset by semidiscrete OT.

    Args:
        y: (N, *shape) the dataset's training points: a tensor, or ``Points`` (stored compactly, e.g. a
            memory-mapped pack), which stay where they are stored; the index reads them in chunks.
        labels: (N,) classes; with ``per_class`` queries only match points of their own class.
        cfg: the [potential] config (epsilon, index backend, pca_dim, topk).
        fingerprint: dataset fingerprint every potential must carry.
        per_class: class-conditional matching (pairs never cross classes).
        device: where the matching index lives (default: y's device); pairs come back on x0's.
        index: a prebuilt index with ``search`` and ``set_potential`` over the same points (e.g. a
            sharded one, built by ``sdfm.distributed``); default: a ``MatchIndex``.
    """

    def __init__(
        self,
        y: Tensor | Points,
        labels: Tensor | None,
        cfg: PotentialConfig,
        fingerprint: str,
        per_class: bool = False,
        device: torch.device | None = None,
        index=None,
    ):
        if isinstance(y, Points):
            # Stored data stays on the host (one mapped copy per machine); each step reads its
            # matched rows and converts them on the step's device.
            self.y, flat, home = y, y.flat(), torch.device("cpu")
        else:
            # A tensor lives where the index does: the matched points are gathered there, with no
            # host round trip per step, and an fp32 index's keys share this tensor's storage.
            self.y = y.to(device) if device is not None and index is None else y
            flat, home = self.y.flatten(1), self.y.device
        self.cfg, self.fingerprint, self.per_class = cfg, fingerprint, per_class
        self.labels = None if labels is None else labels.to(home)
        self.index = (
            index
            if index is not None
            else MatchIndex(
                flat,
                backend=cfg.index,
                labels=self.labels if per_class else None,
                pca_dim=cfg.pca_dim,
                device=device,
                precision=None if cfg.precision == "auto" else cfg.precision,
                candidates=cfg.candidates,
            )
        )
        self.g = torch.zeros(len(y))
        self.version = 0
        self.chi2 = float("nan")
        self.published_at = time.time()
        self.pairs_since_update = 0

    # ------------------------------------------------------------------------------- the potential

    def set_potential(
        self, g: Tensor, version: int, chi2: float = float("nan"), published_at: float | None = None
    ) -> None:
        """Use potential g (N,) from now on (swapped into the index in place)."""
        self.index.set_potential(g)
        self.g = g.detach().float().cpu().clone()
        self.version, self.chi2 = int(version), float(chi2)
        self.published_at = time.time() if published_at is None else published_at
        self.pairs_since_update = 0

    # ------------------------------------------------------------------------------------ coupling

    @property
    def prefetchable(self) -> bool:
        """A CPU matching index (not a sharded one, whose searches are collectives) pairs ahead."""
        return isinstance(self.index, MatchIndex) and self.index.device.type == "cpu"

    def pair(self, x0: Tensor, x1: Tensor, labels: Tensor | None, generator: torch.Generator) -> Pairs:
        """Match each x0 (B, *shape) to a data point; the batch x1 is only used for its labels, which
        set the class of each query in class-conditional matching."""
        query_labels = labels if self.per_class else None
        q = x0.flatten(1)
        if self.cfg.epsilon == 0:
            index = self.index.search(q, query_labels)
        else:
            index = self.index.sample(
                q, self.cfg.epsilon, generator, k=self.cfg.topk, query_labels=query_labels
            )
        self.pairs_since_update += 1
        home = torch.device("cpu") if isinstance(self.y, Points) else self.y.device
        at = index.to(home)  # the dataset may stay on the CPU while the index is on the GPU
        out_labels = None if labels is None or self.labels is None else self.labels[at].to(x0.device)
        x1 = self.y.take(at, x0.device) if isinstance(self.y, Points) else self.y[at].to(x0.device)
        return Pairs(x0=x0, x1=x1, labels=out_labels, index=index)

    def stats(self) -> dict[str, float]:
        return {
            "potential_version": self.version,
            "potential_age_steps": self.pairs_since_update,
            "potential_age_s": round(time.time() - self.published_at, 1),
            "potential_chi2": self.chi2,
        }

    def state_dict(self) -> dict[str, Tensor]:
        return {
            "g": self.g,
            "version": torch.tensor(self.version),
            "chi2": torch.tensor(self.chi2, dtype=torch.float64),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if "g" not in state:
            return
        if state["g"].shape != (len(self.y),):
            raise UserError(
                f"checkpoint potential has {state['g'].shape[0]} entries but the dataset has {len(self.y)} points"
            )
        self.set_potential(state["g"], int(state["version"]), float(state["chi2"]))


class SemidiscreteOT:
    """Semidiscrete OT between standard-normal noise and a whole dataset, for a user's own loop: a dual
    potential g (N,) fitted once (``fit``) or loaded (``load``); then every fresh noise sample x0 is
    paired with the data point argmax_j <x0, y_j> + g_j (ε = 0) or one drawn from the softmax of those
    scores over the top candidates (ε > 0). Matching runs on ``device`` (CPU or CUDA).

    Args:
        data: (N, *shape) the dataset: a tensor, or ``Points`` (e.g. a memory-mapped pack).
        potential: (N,) the dual potential g.
        labels: (N,) classes; then a query of class c is paired only with points of class c.
        epsilon, pca_dim: of the potential (as it was fitted).
        chi2: the potential's χ̂² (NaN when unknown).
        device: where the matching index lives (default: the data's device, the host for Points).
        topk: candidates of the softmax sampling when ε > 0.
        fingerprint: ``sdfm.data.fingerprint`` of data and labels, when the caller has it already (it
            reads every point).

    Example:
        >>> sd = sdfm.SemidiscreteOT.fit(data, max_seconds=60)
        >>> pairs = sd(torch.randn(256, *data.shape[1:]))  # pairs.x1 = data[pairs.index]
    """

    def __init__(
        self,
        data: Tensor | Points,
        potential: Tensor,
        *,
        labels: Tensor | None = None,
        epsilon: float = 0.0,
        pca_dim: int = 0,
        chi2: float = float("nan"),
        device: torch.device | str | None = None,
        topk: int = 64,
        fingerprint: str | None = None,
    ):
        from sdfm.data import fingerprint as fingerprint_of

        self.data, self.labels = data, labels
        self.fingerprint = fingerprint if fingerprint is not None else fingerprint_of(data, labels)
        cfg = PotentialConfig(epsilon=epsilon, pca_dim=pca_dim, topk=topk)
        self.coupling = SemidiscreteCoupling(
            data, labels, cfg, self.fingerprint, per_class=labels is not None,
            device=None if device is None else torch.device(device),
        )  # fmt: skip
        self.coupling.set_potential(potential, 1, chi2)
        self.shape = tuple(data.shape[1:])

    @property
    def potential(self) -> Tensor:
        """(N,) float32 the dual potential g in use."""
        return self.coupling.g

    @property
    def chi2(self) -> float:
        """χ̂² of the potential: its marginal error (0.05: where the SD-FM paper saw quality saturate)."""
        return self.coupling.chi2

    @classmethod
    def fit(
        cls,
        data: Tensor | Points,
        labels: Tensor | None = None,
        *,
        epsilon: float = 0.0,
        target_chi2: float = 0.05,
        max_seconds: float | None = None,
        max_steps: int | None = None,
        pca_dim: int | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> SemidiscreteOT:
        """Fit the dual potential of ``data`` (N, *shape) (``sdfm.semidiscrete.fit_potential``) until a
        held-out evaluation confirms χ̂² <= ``target_chi2``, or ``max_steps``, or ``max_seconds``
        (with neither budget: 5,000 steps; with a time budget alone: no step cap). ``progress``: log lines (the ``sdfm`` logger) and a progress bar on a terminal.

        Example:
            >>> sd = sdfm.SemidiscreteOT.fit(torch.randn(5000, 2), max_seconds=10)
            >>> sd.chi2
        """
        from sdfm.semidiscrete.configured import step_cap
        from sdfm.semidiscrete.fit import FitBudget, fit_potential
        from sdfm.semidiscrete.fitter import FitterOptions

        if not target_chi2 > 0 or (max_seconds is not None and not max_seconds > 0):
            raise UserError(f"target_chi2={target_chi2} and max_seconds={max_seconds} must be positive numbers")
        if max_steps is not None and max_steps < 1:
            raise UserError(f"max_steps={max_steps} must be at least 1")
        seed = 0 if generator is None else int(torch.randint(0, 2**31, (), generator=generator))
        options = FitterOptions(epsilon=epsilon, pca_dim=pca_dim or 0, seed=seed)
        budget = FitBudget(
            max_steps=step_cap(max_steps, max_seconds), target_chi2=target_chi2, max_seconds=max_seconds
        )
        flat = data.flat() if isinstance(data, Points) else data.flatten(1)
        result = fit_potential(
            flat, options, budget, labels=labels, device=device, progress=progress, log=_log.info if progress else None
        )
        return cls(data, result.g, labels=labels, epsilon=epsilon, pca_dim=pca_dim or 0, chi2=result.chi2, device=device)

    def match(self, x0: Tensor, labels: Tensor | None = None) -> Tensor:
        """(B,) int64 ids of the data points paired with x0 (B, *shape) (ε = 0: deterministic; ε > 0:
        sampled with torch's global generator; use ``__call__`` with a generator to control it)."""
        return self(x0, labels).index

    def __call__(
        self, x0: Tensor, labels: Tensor | None = None, *, generator: torch.Generator | None = None
    ) -> Pairs:
        """Pairs of x0 (B, *shape): x1 = data[index] on x0's device; ``labels`` (B,) are the classes of
        the queries when the data has labels (required then)."""
        if tuple(x0.shape[1:]) != self.shape:
            raise UserError(f"x0 has points of shape {tuple(x0.shape[1:])}, the data's are {self.shape}")
        if (labels is None) != (self.labels is None):
            raise UserError(
                "pass labels (the class of each query) exactly when the potential was fitted with labels"
            )
        if generator is None:
            generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))
        return self.coupling.pair(x0, x0, labels, generator)

    def save(self, path: str | Path) -> Path:
        """Write the potential (safetensors, atomically) with the data's fingerprint, ε and PCA dimension."""
        cfg = self.coupling.cfg
        return save_potential(
            path, self.potential, version=1, step=0, epsilon=cfg.epsilon, chi2=self.chi2,
            fingerprint=self.fingerprint, pca_dim=cfg.pca_dim,
        )  # fmt: skip

    @classmethod
    def load(
        cls,
        path: str | Path,
        data: Tensor | Points,
        labels: Tensor | None = None,
        *,
        device: torch.device | str | None = None,
    ) -> SemidiscreteOT:
        """The potential saved at ``path`` over ``data``; refused (UserError) when it was fitted on other
        data (its fingerprint) or the file is damaged."""
        from sdfm.data import fingerprint

        fp = fingerprint(data, labels)
        pot = load_potential(path, expected_fingerprint=fp, expected_n=len(data))
        return cls(
            data, pot.g, labels=labels, epsilon=pot.epsilon, pca_dim=pot.pca_dim, chi2=pot.chi2, device=device,
            fingerprint=fp,
        )  # fmt: skip

    def loader(self, batch_size: int, *, generator: torch.Generator | None = None) -> Iterator[Pairs]:
        """An endless iterator of Pairs of ``batch_size`` fresh standard-normal samples (with labels
        drawn in the data's class proportions when it has labels), as OTT-JAX's data loader.

        Example:
            >>> for step, pairs in zip(range(1000), sd.loader(256)):
            ...     loss = ((model(t, x_t) - (pairs.x1 - pairs.x0)) ** 2).mean()
        """
        if batch_size < 1:
            raise UserError(f"batch_size={batch_size} must be at least 1")
        gen = generator if generator is not None else torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))
        while True:
            x0 = torch.randn(batch_size, *self.shape, generator=gen)
            labels = None
            if self.labels is not None:
                labels = self.labels[torch.randint(0, len(self.labels), (batch_size,), generator=gen)]
            yield self(x0, labels, generator=gen)
