"""Training output: one fixed-format log line, metrics.jsonl, TensorBoard scalars/images and a progress
bar on a terminal. Only the main process writes (``enabled=False`` elsewhere)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

_MAIN_PROCESS = True


def set_main_process(main: bool) -> None:
    """Declare whether this process is rank 0 of its job (the only one that prints)."""
    global _MAIN_PROCESS
    _MAIN_PROCESS = main


def info(msg: str, enabled: bool = True) -> None:
    """Print one line to stderr on the main process (the one helper for side-effect output)."""
    if enabled and _MAIN_PROCESS:
        print(msg, file=sys.stderr, flush=True)


class Monitor:
    """Writes metrics of a run.

    Args:
        run_dir: the run folder (``metrics.jsonl`` and ``tensorboard/`` go there).
        total_steps: last step of the run (for the progress bar).
        start_step: first step of this process (resume).
        enabled: False on non-main ranks: every method is then a no-op.
    """

    def __init__(self, run_dir: Path, total_steps: int, start_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.bar = None
        self.tb = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.jsonl = open(Path(run_dir) / "metrics.jsonl", "a")
        self.tb = SummaryWriter(
            str(Path(run_dir) / "tensorboard"), purge_step=start_step if start_step else None
        )
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, leave=False
            )
        self._t0 = time.time()

    def print(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            info(msg)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def log(self, step: int, metrics: dict[str, Any], line_keys: tuple[str, ...] = ()) -> None:
        """Record ``metrics`` at ``step``: a jsonl line, TensorBoard scalars, and a log line of
        ``line_keys`` (fixed order, fixed format)."""
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time() - self._t0, 3), **metrics}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.tb.add_scalar(k, v, step)
        if line_keys:
            parts = [f"step {step:>7d}"] + [_fmt(k, metrics[k]) for k in line_keys if k in metrics]
            self.print("  ".join(parts))

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """Add an (H, W, 3) uint8 image to TensorBoard."""
        if self.enabled:
            self.tb.add_image(tag, image, step, dataformats="HWC")

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.tb.close()
        self.jsonl.close()


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, float):
        return f"{key} {value:.4g}" if abs(value) < 1e4 else f"{key} {value:.0f}"
    return f"{key} {value}"
