import io
import os
import sys
import warnings
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("KEOPS_CACHE_FOLDER", str(ROOT / ".cache" / "keops"))
os.environ.setdefault("SDFM_CACHE", str(ROOT / ".cache" / "sdfm"))
os.environ.setdefault("MPLBACKEND", "Agg")

WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
"""The pytest-xdist worker running this process ('gw0', 'gw1', ...; '' without xdist)."""
if WORKER:
    # Parallel workers (launch/test.sh runs one per core):
    # - one thread each, inherited by the processes they start: two OpenMP pools spin-waiting on two
    #   cores make a test many times slower (see ``one_thread``);
    # - a KeOps build folder each, since two KeOps compilations into one folder corrupt each other
    #   (a formula two workers need is compiled twice, ~10 s; pytest-xdist's --dist loadgroup, which
    #   could keep those tests on one worker, has no effect under pytest 9: it renames a node id
    #   attribute that pytest 9 no longer reads).
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    os.environ["KEOPS_CACHE_FOLDER"] = str(Path(os.environ["KEOPS_CACHE_FOLDER"]) / WORKER)


def pytest_configure(config):
    if WORKER:
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """Run a test module with one torch thread (and one FAISS thread when FAISS, an optional extra, is
    installed). Its problems are tiny: with 2 threads a busy neighbour process turns OpenMP's
    spin-waits into most of the time (measured: the semidiscrete suites take 5 s alone, 100 s beside
    one busy process)."""
    import torch

    try:
        import faiss
    except ImportError:
        faiss = None
    before = torch.get_num_threads()
    before_faiss = faiss.omp_get_max_threads() if faiss else 0
    torch.set_num_threads(1)
    if faiss:
        faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(before)
    if faiss:
        faiss.omp_set_num_threads(before_faiss)


def train_run(cfg, run_dir, resume=False, until=None):
    """Train ``cfg`` in ``run_dir`` with a ``Trainer`` in this process (a fresh folder, or ``resume`` its
    newest checkpoint, which must exist), up to ``train.steps`` or step ``until``; returns the trainer."""
    from sdfm.rundir import prepare_run_dir
    from sdfm.trainer import Trainer

    prepare_run_dir(run_dir, cfg, resume=resume, overwrite=False)
    trainer = Trainer(cfg, run_dir)
    if resume:
        assert trainer.resume()
    trainer.train(until=until)
    return trainer


@dataclass
class CliResult:
    """What a command printed and returned (the fields of ``subprocess.CompletedProcess`` used here)."""

    returncode: int
    stdout: str
    stderr: str


def run_sdfm(*args) -> CliResult:
    """``sdfm ARGS`` through ``sdfm.cli.main`` in this process, its stdout and stderr captured.

    The same code as ``python -m sdfm`` without a new interpreter and its torch import (2-4 s a
    command on the 2-core machine): for commands that refuse bad input or run briefly. An exception
    that would print a traceback propagates and fails the test. Tests of the process itself (signals,
    ``python -m``, a closed pipe, exit codes of real processes) start one."""
    from sdfm import cli

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with redirect_stdout(out), redirect_stderr(err), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            cli.main([str(a) for a in args])
        except SystemExit as e:
            if isinstance(e.code, str):  # Python prints such a message to stderr and exits 1
                print(e.code, file=sys.stderr)
            code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
    if code == 130:  # the command saw a Ctrl-C: it was meant for the test run
        raise KeyboardInterrupt
    # Warnings a fresh interpreter prints (its default filters hide the deprecation kinds) are part
    # of what the user sees: the one-line checks must see them too.
    hidden = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)
    shown = "".join(
        f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}\n"
        for w in caught
        if not issubclass(w.category, hidden)
    )
    return CliResult(code, out.getvalue(), err.getvalue() + shown)
