"""Signals (SIGTERM, and Ctrl-C's SIGINT where a loop takes it) as a flag that long loops check between
steps, and the exception of a loop it stopped.

The potential fit, the learned schedule's fit, the worker and the training loop stop at a step
boundary instead of dying mid-write: they save what can be continued (the fit's state, a checkpoint)
and say so.
"""

from __future__ import annotations

import signal
import threading

__all__ = ["Interrupted", "TermFlag"]


class Interrupted(Exception):
    """A loop stopped by SIGTERM; the message says what was saved and how to continue."""


class TermFlag:
    """Signals as a flag checked between steps: the one stop flag of the potential fit, the learned
    schedule's fit, the worker and the training loop.

    Handlers are installed in the main thread only (elsewhere the flag is never set); ``restore``
    puts the previous handlers back, and ``with`` installs for a block.

    Args:
        signals: the signals that set the flag (default SIGTERM).
        install: install the handlers now (else on ``install()`` or ``with``).
        repeat_interrupt: a second SIGINT while the flag is set raises ``KeyboardInterrupt`` (a second
            Ctrl-C stops at once instead of at the next step boundary).

    Attributes:
        requested: whether one of the signals arrived; name: the last one's name ('SIGTERM', ...).
    """

    def __init__(
        self,
        signals: tuple[int, ...] = (signal.SIGTERM,),
        *,
        install: bool = True,
        repeat_interrupt: bool = False,
    ):
        self.signals, self.repeat_interrupt = tuple(signals), repeat_interrupt
        self.requested, self.name = False, ""
        self.previous: dict[int, object] = {}
        if install:
            self.install()

    def install(self) -> None:
        """Route the signals to this flag (main thread only; a no-op elsewhere)."""
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self.previous.setdefault(sig, signal.signal(sig, self._handle))

    def _handle(self, signum, frame) -> None:
        del frame
        if self.requested and self.repeat_interrupt and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested, self.name = True, signal.Signals(signum).name

    def restore(self) -> None:
        """Put back the handlers that were there before ``install``."""
        for sig, handler in self.previous.items():
            if handler is not None:  # None: a handler not set from Python, which cannot be put back
                signal.signal(sig, handler)
        self.previous = {}

    def __enter__(self) -> TermFlag:
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.restore()
