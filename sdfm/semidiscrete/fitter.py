"""The stochastic fitter of the dual potential g of semidiscrete OT (``PotentialFitter``).

A fit is SGD on the negated semi-dual (the problem, its gradient and χ̂²: ``sdfm.semidiscrete.problem``)
run by one method object (``sdfm.semidiscrete.methods``: step and ε schedules, the average of the
iterates, the potential), from one start (``sdfm.semidiscrete.start``: zero, coarse or Gaussian).
The loop that drives it to a target within a budget is ``sdfm.semidiscrete.fit``; docs/design.md §7
has the measurements behind every default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from sdfm.errors import UserError
from sdfm.ot.collectives import LOCAL, Collectives, share
from sdfm.semidiscrete.coarse import coarse_start
from sdfm.semidiscrete.index import Backend, MatchIndex, Precision
from sdfm.semidiscrete.methods import METHODS, FitMethod, Method, choose_method
from sdfm.semidiscrete.problem import SampleSource, SemidiscreteProblem
from sdfm.semidiscrete.start import INITS, Init, choose_start, gaussian_start

FITTER_FORMAT = "sdfm.potential_fitter/1"

__all__ = ["FitterOptions", "PotentialFitter"]


@dataclass(frozen=True, kw_only=True)
class FitterOptions:
    """Settings of a potential fit (the [potential] config carries the same names where it has them).

    Attributes:
        epsilon: entropic regularization of the target problem (0: the hard, Laguerre-cell problem).
        method: 'auto' (the default: averaged_sgd in a matching space of >= ``methods.HIGH_DIM``
            dimensions, else sgd_tail), 'sgd_tail' (decreasing step, tail average), 'sgd_ema' (constant step,
            EMA of the iterates) or 'averaged_sgd' (POT's schedule, ε annealed from δ).
        batch_size: noise samples per step (with labels, split across classes, at least 2 each).
        lr: step size (sgd_ema) or lr0 (sgd_tail, averaged_sgd); None: the method's default
            (``FitMethod.default_lr``; ``PotentialFitter.lr`` holds the value used).
        ema: decay of the iterate average for sgd_ema.
        tail_power: η of sgd_tail's average (0: the uniform average of every iterate).
        decay_steps: T0 of sgd_tail's step, lr0 / sqrt(1 + t / T0).
        pca_dim: fit in the top principal components (0: full dimension).
        backend: ``MatchIndex`` backend for the ε = 0 assignments.
        seed: seed of the fitter's generator (all noise comes from it).
        eps0: initial regularization of averaged_sgd's schedule (None: δ, the cell score width).
        init: 'coarse' (start from ``coarse_start`` of each class block, computed at the first step),
            'gaussian' (``gaussian_start``), 'zero' (g = 0), or 'auto' (``choose_start``: coarse where
            a cell's score width is under 1% of the spread of the scores, 2-D data; else zero).
        clusters: K of the coarse start (None: min(1024, N / 16)).
        precision: of the matching index's products (None: ``default_precision``, 16-bit for
            the torch index on CUDA, fp32 elsewhere; 16-bit answers are rescored and certified exact).
        candidates: candidates per query of a 16-bit matching search.
    """

    epsilon: float = 0.0
    method: Method = "auto"
    batch_size: int = 1024
    lr: float | None = None
    ema: float = 0.99
    tail_power: float = 3.0
    decay_steps: float = 100.0
    pca_dim: int = 0
    backend: Backend = "torch"
    seed: int = 0
    eps0: float | None = None
    init: Init = "auto"
    clusters: int | None = None
    precision: Precision | None = None
    candidates: int = 16

    def check(self) -> None:
        """Raise UserError (one line naming the setting) for settings no problem can take."""
        if self.init not in INITS:
            raise UserError(f"unknown potential init '{self.init}'; use one of {', '.join(INITS)}")
        if self.method not in METHODS:
            raise UserError(
                f"unknown potential fitting method '{self.method}'; use one of {', '.join(METHODS)}"
            )
        if not (self.epsilon >= 0 and math.isfinite(self.epsilon)):
            raise UserError(
                f"epsilon={self.epsilon} must be a finite number >= 0 (0: unregularized matching)"
            )
        if not 0 <= self.ema < 1:
            raise UserError(f"ema={self.ema} must be in [0, 1)")
        if not (self.tail_power >= 0 and math.isfinite(self.tail_power)):
            raise UserError(f"tail_power={self.tail_power} must be a finite number >= 0")
        if not (self.decay_steps > 0 and math.isfinite(self.decay_steps)):
            raise UserError(f"decay_steps={self.decay_steps} must be a positive number of steps")
        if self.lr is not None and not self.lr > 0:
            raise UserError(f"lr={self.lr} must be positive (or None for the default)")


class PotentialFitter:
    """Stateful stochastic solver of the semi-dual (the methods: ``sdfm.semidiscrete.methods``).

    Args:
        y: (N, d) data points (flattened).
        options: the fit's settings.
        labels: (N,) classes: one independent block of g per class.
        sample_source: ``(n, generator) -> (n, d)`` noise; default standard normal.
        device: where to compute (default: y's device).
        comm: the ranks that share every step (``LOCAL``: one process). Every rank draws the same
            noise batch (the same seed), scores its share of the rows against all N points, and the
            column sums are summed over the ranks, so every rank takes the same step: for ε = 0 (counts)
            bit for bit the single-process one, and the fitter's state is the single-process state.

    Attributes:
        problem: the ``SemidiscreteProblem``; n: N; batch_size: noise samples per step.
        lr, eps0: the step size and averaged_sgd's initial regularization in use.
        method, init: the names of the method and start in use ('auto' resolved; init 'coarse',
            'gaussian' or 'zero'); rule: the method object (``FitMethod``).
        t: steps taken; g: the last iterate; g_avg: the running average (``potential()``): the EMA
            (sgd_ema), the tail average (sgd_tail) or the uniform average (averaged_sgd).
    """

    def __init__(
        self,
        y: Tensor,
        options: FitterOptions = FitterOptions(),
        *,
        labels: Tensor | None = None,
        sample_source: SampleSource | None = None,
        device: torch.device | str | None = None,
        comm: Collectives = LOCAL,
    ):
        options.check()
        self.comm = comm
        o = self.options = options
        self.problem = SemidiscreteProblem(
            y,
            labels=labels,
            pca_dim=o.pca_dim,
            backend=o.backend,
            device=device,
            batch_size=o.batch_size,
            sample_source=sample_source,
            precision=o.precision,
            candidates=o.candidates,
        )
        p = self.problem
        self.n, self.epsilon = p.n, float(o.epsilon)
        self.rule: FitMethod = choose_method(
            o.method, p.index.match_dim, ema=o.ema, decay_steps=o.decay_steps, tail_power=o.tail_power
        )
        self.method = self.rule.name
        self.batch_size = p.total_batch
        delta = p.cell_scale
        self.lr = float(self.rule.default_lr(p.n, p.total_batch, delta) if o.lr is None else o.lr)
        self.eps0 = delta if o.eps0 is None else float(o.eps0)
        self.generator = torch.Generator(device=p.device).manual_seed(o.seed)
        self.g = torch.zeros(p.n, device=p.device)
        self.g_avg = torch.zeros(p.n, device=p.device)
        self.t = 0
        self.clusters = min(1024, p.n // 16) if o.clusters is None else o.clusters
        self.init = choose_start(o.init, p.cell_scale, p.score_scale)
        self._coarse_pending = self.init == "coarse"  # done at the first step, not for a resumed fitter
        if self.init == "gaussian":
            self.g.copy_(gaussian_start(p.index.data_keys(p.y), p.rows))

    def _coarse_start(self) -> None:
        """g <- ``coarse_start`` of each class block (the blocks are independent problems)."""
        p = self.problem
        keys = p.index.data_keys(p.y)
        gen = torch.Generator(device=self.generator.device).manual_seed(
            int(self.generator.initial_seed()) + 1
        )
        for rows in p.rows:
            self.g[rows] = coarse_start(
                keys[rows], lambda: p.draw(gen), gen, clusters=max(1, round(self.clusters * len(rows) / p.n))
            )

    @property
    def index(self) -> MatchIndex:
        """The matching index of the fit (its bias is the last iterate used for an ε = 0 step)."""
        return self.problem.index

    def epsilon_at(self, t: int) -> float:
        """Regularization used at step t (1-based)."""
        return self.rule.epsilon_at(self.epsilon, self.eps0, t)

    def lr_at(self, t: int) -> float:
        """Step size at step t (1-based)."""
        return self.rule.lr_at(self.lr, t)

    def step(self) -> dict[str, float]:
        """One SGD step on a fresh noise batch.

        Returns:
            dict with 'step', 'chi2' (χ̂² of the iterate the gradient was taken at, on this batch),
            'epsilon' and 'lr' used.
        """
        if self._coarse_pending:
            self._coarse_start()
            self._coarse_pending = False
        t = self.t + 1
        eps, lr = self.epsilon_at(t), self.lr_at(t)
        q = self.problem.draw(self.generator)
        mine = share(q.shape[0], self.comm.rank, self.comm.world)
        col_sum, col_sq = self.problem.sums(q, self.g, eps, mine)
        if self.comm.world > 1:  # ε = 0: col_sq is col_sum (counts), one reduction is enough
            col_sum = self.comm.reduce_sum(col_sum)
            col_sq = col_sum if eps <= 0 else self.comm.reduce_sum(col_sq)
        chi2 = self.problem.chi2(col_sum, col_sq)
        self.g.sub_(lr * self.problem.gradient(col_sum))
        self.rule.average(self.g_avg, self.g, t)
        self.t = t
        return {"step": t, "chi2": chi2, "epsilon": eps, "lr": lr}

    def potential(self) -> Tensor:
        """(N,) float32 potential to use: the method's average of the iterates (``FitMethod.potential``:
        the bias-corrected EMA, the tail average or the uniform average); the start before any step."""
        if self.t == 0:
            return self.g.clone()  # the start (zero, Gaussian or coarse)
        return self.rule.potential(self.g_avg, self.t)

    def state_dict(self) -> dict:
        """Everything needed to continue exactly: iterates, step count and the generator's state."""
        return {
            "format": FITTER_FORMAT,
            "method": self.method,
            "epsilon": self.epsilon,
            "n": self.n,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "eps0": self.eps0,
            "step": self.t,
            "g": self.g.cpu().clone(),
            "g_avg": self.g_avg.cpu().clone(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state_dict()`` of a fitter on the same data and settings."""
        if state.get("format") != FITTER_FORMAT:
            raise UserError(f"fitter state has format {state.get('format')!r}, expected {FITTER_FORMAT!r}")
        # A state saved under another default (e.g. before method 'auto') names the setting to pin.
        # (batch_size is the total over classes, so it names no single setting.)
        fixes = {"method": "potential.method", "epsilon": "potential.epsilon"}
        for key in ("method", "epsilon", "n", "batch_size"):
            if state[key] != getattr(self, key):
                fix = (
                    f"set {fixes[key]} = {state[key]!r}"
                    if key in fixes
                    else "use the same data and potential.batch_size"
                )
                raise UserError(
                    f"fitter state was saved with {key}={state[key]!r} but this fitter has {getattr(self, key)!r}; "
                    f"to continue it {fix}, or start a new fit"
                )
        self.lr, self.eps0, self.t = float(state["lr"]), float(state["eps0"]), int(state["step"])
        self.g.copy_(state["g"])
        self.g_avg.copy_(state["g_avg"])
        self._coarse_pending = False
        self.generator.set_state(state["generator"])

    def evaluate(self, num_samples: int, generator: torch.Generator, g: Tensor | None = None) -> float:
        """χ̂² of ``g`` (default: ``potential()``) at the target ε on about ``num_samples`` fresh noise
        samples drawn from ``generator`` (``SemidiscreteProblem.evaluate``)."""
        g = self.potential() if g is None else g
        return self.problem.evaluate(g, self.epsilon, num_samples, generator)

    def evaluate_with_error(self, num_samples: int, generator: torch.Generator) -> tuple[float, float]:
        """(χ̂², standard error) of ``potential()`` (``SemidiscreteProblem.evaluate_with_error``)."""
        return self.problem.evaluate_with_error(self.potential(), self.epsilon, num_samples, generator)
