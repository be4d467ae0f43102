"""SIGTERM as a flag that long loops check between steps, and the exception of a loop it stopped.

The potential fit, the learned schedule's fit and the training loop stop at a step boundary instead of
dying mid-write: they save what can be continued (the fit's state, a checkpoint) and say so.
"""

from __future__ import annotations

import signal
import threading

__all__ = ["Interrupted", "TermFlag"]


class Interrupted(Exception):
    """A loop stopped by SIGTERM; the message says what was saved and how to continue."""


class TermFlag:
    """SIGTERM as a flag checked between steps (installed in the main thread only; elsewhere it is
    never set). ``restore`` puts the previous handler back."""

    def __init__(self):
        self.requested, self.previous = False, None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
            self.previous = None
