"""POT (Python Optimal Transport), imported on first use and quietly.

Importing POT probes KeOps, which prints a "CUDA libraries not found" notice on every CPU machine.
sdfm's library calls print nothing, so ``pot`` sends that notice to the debug log instead.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from types import ModuleType

__all__ = ["pot"]


def pot() -> ModuleType:
    """The ``ot`` module (imported on the first call, with its import-time notices logged at debug)."""
    if "ot" in sys.modules:
        return sys.modules["ot"]
    said = io.StringIO()
    with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
        import ot
    if said.getvalue().strip():
        logging.getLogger("sdfm").debug("importing POT: %s", said.getvalue().strip())
    return ot
