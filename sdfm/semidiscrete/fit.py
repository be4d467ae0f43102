"""The loop of a potential fit: ``fit_potential`` drives a ``PotentialFitter`` until its potential's
χ̂² confirms the target, or the budget (``FitBudget``) runs out; SIGTERM saves a fit that can continue.

The yardstick and its sample sizes are ``sdfm.semidiscrete.chi2``; the config glue (a run's fit, and
``sdfm fit-potential``) is ``sdfm.semidiscrete.configured``.
"""

from __future__ import annotations

import math
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from sdfm.checkpoint import state_from_bytes, state_to_bytes, write_atomic
from sdfm.errors import UserError
from sdfm.semidiscrete.chi2 import Z_ONE_SIDED_95, bound_width, confirming_samples, describe_chi2
from sdfm.semidiscrete.fitter import FitterOptions, PotentialFitter
from sdfm.semidiscrete.methods import HIGH_DIM
from sdfm.semidiscrete.problem import SampleSource
from sdfm.signals import Interrupted, TermFlag

__all__ = ["FitBudget", "FitInterrupted", "FitResult", "fit_potential"]


@dataclass(frozen=True, kw_only=True)
class FitBudget:
    """When ``fit_potential`` stops.

    Attributes:
        max_steps: most SGD steps.
        target_chi2: stop when χ̂² of the returned potential is at most this (0.05: where the SD-FM
            paper saw generation quality saturate).
        max_seconds: wall-time budget (None: no limit).
        window: steps in the windowed mean of the per-step χ̂² that is logged, and the fewest steps
            between two confirming evaluations (None: automatic).
        eval_samples: noise samples of each confirming evaluation (None: ``confirming_samples``,
            enough that the target can be confirmed at all; 0: no evaluation, so the fit never stops
            early on χ̂² and runs its whole budget; the reported χ̂² is then the windowed mean).
        log_every: steps between log lines and history entries.
    """

    max_steps: int = 10_000
    target_chi2: float = 0.05
    max_seconds: float | None = None
    window: int | None = None
    eval_samples: int | None = None
    log_every: int = 100


@dataclass
class FitResult:
    """Outcome of ``fit_potential``.

    Attributes:
        g: (N,) float32 fitted potential (``PotentialFitter.potential()``).
        steps: SGD steps taken.
        chi2: χ̂² of g on a fresh evaluation sample (``eval_samples``), or the windowed mean of the
            per-step χ̂² when ``eval_samples=0``.
        seconds: wall time of the fit (evaluations included).
        history: (step, seconds, windowed mean of the per-step χ̂²) every ``log_every`` steps.
        converged: whether the target χ̂² was reached: the one-sided 95% upper bound of the
            evaluation's χ̂² (``chi2 + 1.645 chi2_se``) is at most the target.
        chi2_se: standard error of ``chi2`` (NaN without an evaluation).
    """

    g: Tensor
    steps: int
    chi2: float
    seconds: float
    history: list[tuple[int, float, float]] = field(default_factory=list)
    converged: bool = False
    chi2_se: float = math.nan


def _default_window(n: int, batch: int, target: float) -> int:
    """Steps of the logged windowed mean of the per-step χ̂², and the fewest steps between two
    confirming evaluations: enough that the mean's noise (about sqrt(2N)/(B sqrt(W))) is a quarter of
    the target, within [20, 200] so the mean does not lag the fit by too much."""
    need = (4 * math.sqrt(2 * n) / (batch * max(target, 1e-6))) ** 2
    return int(min(200, max(20, math.ceil(need))))


def fit_potential(
    y: Tensor,
    options: FitterOptions = FitterOptions(),
    budget: FitBudget = FitBudget(),
    *,
    labels: Tensor | None = None,
    sample_source: SampleSource | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    state_path: Path | None = None,
) -> FitResult:
    """Fit g until χ̂² <= ``budget.target_chi2``, ``budget.max_steps`` or ``budget.max_seconds``.

    With ``state_path``, the fit can be interrupted: SIGTERM saves the fitter's state there and raises
    ``FitInterrupted``, and a later call with the same path continues from that state (its step count
    and time budget go on; the χ̂² window starts afresh).

    Stop rule: the potential actually returned (the average of the iterates, not the last iterate,
    whose own per-step χ̂² is logged but says little about the average) is evaluated on
    ``eval_samples`` fresh noise samples from a separate generator, and the fit stops only if that
    confirms the target with its error bar: χ̂² + 1.645 SE <= target (a one-sided 95% bound;
    ``describe_chi2`` words the outcome). The evaluations are spaced geometrically, at steps
    ``window``, then at least ``window`` steps and 25% more steps after the previous one, so they
    cost a bounded share of the fit. Without an evaluation (``eval_samples = 0``) the fit never stops
    early.

    Args:
        y: (N, d) points.
        options: the fitter's settings; labels, sample_source, device: as in ``PotentialFitter``.
        budget: when to stop.
        progress: show a tqdm bar (only when stderr is a terminal).
        log: where log lines go (None: nowhere).

    Returns:
        FitResult.
    """
    b = budget
    if b.max_steps < 1:
        raise UserError(f"max_steps={b.max_steps} must be at least 1")
    fitter = PotentialFitter(y, options, labels=labels, sample_source=sample_source, device=device)
    spent = 0.0
    if state_path is not None and Path(state_path).is_file():
        try:
            saved = state_from_bytes(Path(state_path).read_bytes())
            fitter.load_state_dict(saved["fitter"])
            spent = float(saved["seconds"])
            if log is not None:
                log(f"potential: continuing the interrupted fit of {state_path} from step {fitter.t}")
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            if log is not None:
                log(
                    f"warning: interrupted fit state {state_path} is unreadable ({type(e).__name__}); fitting from zero"
                )
    if options.method == "auto" and log is not None:
        log(
            f"potential: method auto -> {fitter.method} (a {fitter.index.match_dim}-dimensional matching "
            f"space; averaged_sgd from {HIGH_DIM}), lr0 {fitter.lr:.3g}, start {fitter.init}"
        )
    window = b.window or _default_window(fitter.n, fitter.batch_size, b.target_chi2)
    eval_samples = b.eval_samples
    if eval_samples is None:
        eval_samples = confirming_samples(fitter.n, b.target_chi2, fitter.batch_size)
    reachable = bound_width(fitter.n, eval_samples) if eval_samples > 0 else 0.0
    if reachable > b.target_chi2 and log is not None:
        log(
            f"potential: target chi2 {b.target_chi2} is below what {eval_samples} evaluation samples can "
            f"confirm at N={fitter.n} (about {reachable:.3g}); the fit will run its whole budget"
        )
    eval_generator = torch.Generator(device=fitter.problem.device).manual_seed(options.seed + 7_919)
    recent: deque[float] = deque(maxlen=window)
    mean = math.nan  # (a resumed fit already past its step budget takes no step)
    history: list[tuple[int, float, float]] = []
    bar = None
    if progress and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=None if b.max_steps == sys.maxsize else b.max_steps, desc="potential", leave=False)
    start = time.perf_counter() - spent
    first_step = fitter.t
    next_check, final_chi2, final_se, converged = window, math.nan, math.nan, False
    final_samples = eval_samples  # the last check's size; with a time budget, sized to fit in it
    stop = TermFlag() if state_path is not None else None
    try:  # the handler goes back on every exit: a SIGTERM after the fit is not swallowed by a dead flag
        while fitter.t < b.max_steps:
            if stop is not None and stop.requested:
                state = {"fitter": fitter.state_dict(), "seconds": time.perf_counter() - start}
                write_atomic(Path(state_path), state_to_bytes(state))
                raise FitInterrupted(
                    f"SIGTERM during the potential fit: saved its state at step {fitter.t} to {state_path}"
                )
            info = fitter.step()
            recent.append(info["chi2"])
            mean = sum(recent) / len(recent)
            seconds = time.perf_counter() - start
            if bar is not None:
                bar.update(1)
                bar.set_postfix(chi2=f"{mean:.4f}")
            if fitter.t % b.log_every == 0:
                history.append((fitter.t, seconds, mean))
                if log is not None:
                    log(
                        f"potential step {fitter.t} iterate chi2 {info['chi2']:.4f} (mean of {window}: {mean:.4f}; "
                        "the averaged potential is checked on fresh noise) "
                        f"eps {info['epsilon']:.3g} lr {info['lr']:.3g} {fitter.t / seconds:.1f} steps/s"
                    )
            if eval_samples > 0 and fitter.t >= next_check:
                # Stop only when a held-out evaluation confirms the target with its error bar: the
                # one-sided 95% upper bound of χ̂² must be below it (never a negative or lone estimate).
                final_chi2, final_se = fitter.evaluate_with_error(eval_samples, eval_generator)
                if log is not None:
                    log(
                        f"potential check at step {fitter.t}: {describe_chi2(final_chi2, final_se, b.target_chi2)}"
                    )
                if final_chi2 + Z_ONE_SIDED_95 * final_se <= b.target_chi2:
                    converged = True
                    break
                next_check = max(fitter.t + window, math.ceil(1.25 * fitter.t))
            if b.max_seconds is not None:
                # The final check is counted in the budget: a check of M samples costs about M / B steps,
                # and it gets at most a quarter of the budget (fewer samples, a wider error bar, said so).
                step_s = (time.perf_counter() - start - spent) / max(1, fitter.t - first_step)  # checks included
                affordable = int(0.25 * b.max_seconds / max(step_s, 1e-9)) * fitter.batch_size
                final_samples = min(eval_samples, max(2 * fitter.batch_size, affordable)) if eval_samples else 0
                if seconds + step_s * final_samples / fitter.batch_size >= b.max_seconds:
                    break
    finally:
        if stop is not None:
            stop.restore()
        if bar is not None:
            bar.close()
    if not converged:
        if log is not None and 0 < final_samples < eval_samples:
            log(
                f"potential: the final check uses {final_samples} samples (not {eval_samples}) to stay within "
                f"potential.max_seconds = {b.max_seconds:g}"
            )
        final_chi2, final_se = (
            fitter.evaluate_with_error(final_samples, eval_generator) if final_samples > 0 else (mean, math.nan)
        )
    seconds = time.perf_counter() - start
    if not history or history[-1][0] != fitter.t:
        history.append((fitter.t, seconds, mean))
    if log is not None:
        log(
            f"potential fit: {fitter.t} steps in {seconds:.1f} s, {describe_chi2(final_chi2, final_se, b.target_chi2)}"
        )
    return FitResult(fitter.potential(), fitter.t, final_chi2, seconds, history, converged, final_se)


class FitInterrupted(Interrupted):
    """A potential fit stopped by SIGTERM after saving its state (the message says where)."""


