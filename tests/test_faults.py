"""Faults and bad input, table-driven: every row is a command line run through ``sdfm.cli.main``, the
exit code it must end with, a pattern its one-line message (or warning) must match, and what must be
byte-identical afterwards (the whole run folder by default).

A row may first damage a copy of a small trained run (two checkpoints, steps 10 and 20): corrupt
files with their hashes updated, a pickle payload that would write a file if it ran, a wrong
trainer state, a directory where a pointer belongs. Damaged checkpoints must be skipped with a
warning and the run must resume from the previous complete one; bad input must be refused with
``error: ...`` and exit 2 before anything in the folder changes. The last tests SIGKILL real
trainer processes at seeded random moments and check exact resume, one trainer per folder, and a
spawned worker that dies with its trainer.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_sdfm
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [
    "--data.name", "8gaussians", "--data.num-points", "300", "--data.num-eval", "64",
    "--model.hidden", "16", "--model.depth", "1", "--train.batch-size", "32",
    "--train.log-every", "10", "--train.ckpt-every", "10", "--train.eval-at-end", "False",
    "--train.device", "cpu", "--optim.warmup-steps", "2", "--coupling.kind", "exact",
]  # fmt: skip


def run_cli(argv: list[str]) -> int:
    """``sdfm ARGV`` in this process (``conftest.run_sdfm``), its output printed again for ``capsys``."""
    r = run_sdfm(*argv)
    sys.stdout.write(r.stdout)
    sys.stderr.write(r.stderr)
    return r.returncode


@pytest.fixture(scope="session")  # once per xdist worker, even if its tests of this module come in several runs
def base_run(tmp_path_factory) -> Path:
    """A trained run with complete checkpoints at steps 10 and 20."""
    run = tmp_path_factory.mktemp("base") / "run"
    assert run_cli(["train", "--run-dir", run, *TINY, "--train.steps", "20"]) == 0
    return run


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file below ``folder`` (the lock file records its last holder: left out)."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def rehash(step_dir: Path, name: str) -> None:
    """Record the current bytes of ``name`` in the checkpoint's trainer_state.json (a forger would)."""
    state_path = step_dir / "trainer_state.json"
    state = json.loads(state_path.read_text())
    state["files"][name] = hashlib.sha256((step_dir / name).read_bytes()).hexdigest()
    state_path.write_text(json.dumps(state))


class Payload:
    """A pickle that writes ``path`` when it is unpickled."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (self.path, "pwned"))


# Damage to apply to the copy of the run (run folder, scratch folder) before the command.
def step20(run: Path) -> Path:
    return run / "checkpoints" / "step-00000020"


def corrupt_model(run: Path, tmp: Path) -> None:
    f = step20(run) / "model.safetensors"
    blob = bytearray(f.read_bytes())
    blob[8:16] = b"\xff" * 8  # the JSON header no longer parses
    f.write_bytes(bytes(blob))
    rehash(step20(run), "model.safetensors")


def truncate_model(run: Path, tmp: Path) -> None:
    f = step20(run) / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])


def pickle_payload(run: Path, tmp: Path) -> None:
    """An old-layout scheduler.pt with a payload, its hash recorded: refused, never run."""
    d = step20(run)
    (d / "scheduler.pt").write_bytes(pickle.dumps(Payload(tmp / "pwned.txt")))
    state = json.loads((d / "trainer_state.json").read_text())
    state["files"].pop("scheduler.safetensors")
    (d / "trainer_state.json").write_text(json.dumps(state))
    rehash(d, "scheduler.pt")


def state_list(run: Path, tmp: Path) -> None:
    (step20(run) / "trainer_state.json").write_text("[]")


def state_version_only(run: Path, tmp: Path) -> None:
    (step20(run) / "trainer_state.json").write_text('{"version": 2}')


def state_future_version(run: Path, tmp: Path) -> None:
    d = step20(run)
    state = json.loads((d / "trainer_state.json").read_text())
    state["version"] = 99
    (d / "trainer_state.json").write_text(json.dumps(state))


def state_missing(run: Path, tmp: Path) -> None:
    (step20(run) / "trainer_state.json").unlink()


def model_of_other_shape(run: Path, tmp: Path) -> None:
    d = step20(run)
    weights = load_file(d / "model.safetensors")
    weights = {k: torch.cat([v, v]) if v.dim() else v for k, v in weights.items()}
    save_file(weights, d / "model.safetensors")
    rehash(d, "model.safetensors")


def all_damaged(run: Path, tmp: Path) -> None:
    for d in (run / "checkpoints").glob("step-*"):
        (d / "trainer_state.json").write_text("{")


def latest_is_dir(run: Path, tmp: Path) -> None:
    pointer = run / "checkpoints" / "latest"
    pointer.unlink()
    pointer.mkdir()


def garbage_dataset(run: Path, tmp: Path) -> None:
    (run / "dataset.json").write_text("not json")


def other_dataset(run: Path, tmp: Path) -> None:
    rec = json.loads((run / "dataset.json").read_text())
    rec["fingerprint"] = "0" * 16
    (run / "dataset.json").write_text(json.dumps(rec))


def nan_potential(run: Path, tmp: Path) -> None:
    from sdfm.semidiscrete.potential_file import save_potential

    save_potential(tmp / "nan.safetensors", torch.full((300,), float("nan")), version=1, step=1,
                   epsilon=0.0, chi2=0.1, fingerprint="0" * 16, pca_dim=0)  # fmt: skip


def a_file(run: Path, tmp: Path) -> None:
    (tmp / "file").write_text("x")


def wrong_shape_source(run: Path, tmp: Path) -> None:
    np.save(tmp / "src3.npy", np.zeros((50, 3), np.float32))


def foreign_folder(run: Path, tmp: Path) -> None:
    (tmp / "other").mkdir()
    (tmp / "other" / "notes.txt").write_text("mine")


def run_without_held_out(run: Path, tmp: Path) -> None:
    assert (
        run_cli(["train", "--run-dir", tmp / "noeval", *TINY, "--data.num-eval", "0", "--train.steps", "2"])
        == 0
    )


def huge_source(run: Path, tmp: Path) -> None:
    np.save(tmp / "big.npy", np.full((50, 2), 1e30, np.float32))


def forge_state(name: str, edit: Callable) -> Callable[[Path, Path], None]:
    """Rewrite checkpoint 20's ``name`` state with ``edit`` and record its new hash (a forger would)."""

    def setup(run: Path, tmp: Path) -> None:
        from sdfm.checkpoint import state_from_bytes, state_to_bytes

        d = step20(run)
        if name == "data_position":
            state = json.loads((d / "trainer_state.json").read_text())
            state["data_position"] = edit(state["data_position"])
            (d / "trainer_state.json").write_text(json.dumps(state))
            return
        f = d / f"{name}.safetensors"
        f.write_bytes(state_to_bytes(edit(state_from_bytes(f.read_bytes()))))
        rehash(d, f.name)

    return setup


def ema_of_other_shape(run: Path, tmp: Path) -> None:
    d = step20(run)
    weights = load_file(d / "ema.safetensors")
    save_file({k: torch.cat([v, v]) if v.dim() else v for k, v in weights.items()}, d / "ema.safetensors")
    rehash(d, "ema.safetensors")


_MOUNTS: list[Path] = []
"""tmpfs mounts made by a row's setup; ``test_fault`` unmounts them, pass or fail."""


def _mount(folder: Path, options: str) -> None:
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)]).returncode:
        pytest.skip("needs root to mount a small tmpfs (a full or read-only disk)")
    _MOUNTS.append(folder)


def _full_disk(folder: Path) -> None:
    """A 64 KiB tmpfs: a full disk for whatever is written there (root only; else the row is skipped)."""
    folder.mkdir()
    _mount(folder, "size=64k")
    (folder / "filler").write_bytes(b"\0" * 60_000)


def _read_only(folder: Path) -> None:
    """A read-only mount over ``folder`` (root; else the row is skipped): chmod does not stop root."""
    folder.mkdir(parents=True, exist_ok=True)
    _mount(folder, "ro,size=64k")


def _semidiscrete(run: Path) -> None:
    """The run's config, with the semidiscrete coupling (a run a worker can work for)."""
    text = (run / "config.toml").read_text().replace('kind = "exact"', 'kind = "semidiscrete"')
    (run / "config.toml").write_text(text)


def _read_only_semidiscrete_run(run: Path, sd: Path) -> None:
    shutil.copytree(run, sd)
    _semidiscrete(sd)
    _read_only(sd / "potential")


def checkpoints_is_a_file(run: Path, tmp: Path) -> None:
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").write_text("x")


def lock_is_a_folder(run: Path, tmp: Path) -> None:
    (run / ".lock").unlink(missing_ok=True)
    (run / ".lock").mkdir()


def config_only_semidiscrete(run: Path, tmp: Path) -> None:
    (tmp / "cfgonly").mkdir()
    text = (run / "config.toml").read_text().replace('kind = "exact"', 'kind = "semidiscrete"')
    (tmp / "cfgonly" / "config.toml").write_text(text)


def no_marker(run: Path, tmp: Path) -> None:
    assert not (tmp / "pwned.txt").exists(), "the pickle payload ran"


def resumed_from_10(run: Path, tmp: Path) -> None:
    assert (run / "checkpoints" / "step-00000030").is_dir()


def absent(name: str) -> Callable[[Path, Path], None]:
    def check(run: Path, tmp: Path) -> None:
        assert not (tmp / name).exists(), f"{tmp / name} was left behind"

    return check


@dataclass
class Case:
    """One row: ``argv`` with {run} and {tmp} placeholders; ``same``: what must be byte-identical
    afterwards ("run": the run folder, "checkpoints": its checkpoints, "": nothing)."""

    name: str
    argv: list[str]
    code: int
    pattern: str
    setup: Callable[[Path, Path], None] | None = None
    same: str = "run"
    check: Callable[[Path, Path], None] | None = None


RESUME = ["train", "--run-dir", "{run}", "--resume"]
FALLBACK = "skipping checkpoint .*step-00000020"
CASES = [
    # --- a run folder is a transaction: refused starts change nothing
    Case("overwrite-then-bad-batch", ["train", "--run-dir", "{run}", "--overwrite", *TINY, "--train.batch-size", "100000"], 2, r"batch"),
    Case("overwrite-then-nan-potential", ["train", "--run-dir", "{run}", "--overwrite", *TINY, "--coupling.kind", "semidiscrete",
         "--potential.source", "file", "--potential.path", "{tmp}/nan.safetensors"], 2, r"potential", nan_potential),
    Case("resume-batch", [*RESUME, "--train.batch-size", "100000"], 2, r"cannot change train\.batch_size"),
    Case("resume-num-points", [*RESUME, "--data.num-points", "600"], 2, r"cannot change data\.num_points"),
    Case("resume-model-width", [*RESUME, "--model.hidden", "64"], 2, r"cannot change model\.hidden"),
    Case("resume-coupling", [*RESUME, "--coupling.kind", "independent"], 2, r"cannot change coupling\.kind"),
    Case("resume-method", [*RESUME, "--method.kind", "meanflow", "--model.horizon-input", "True"], 2, r"cannot change .*method\.kind"),
    Case("resume-seed", [*RESUME, "--train.seed", "7"], 2, r"cannot change train\.seed"),
    Case("resume-fewer-steps", [*RESUME, "--train.steps", "5"], 2, r"below the checkpoint's step 20"),
    Case("resume-and-overwrite", [*RESUME, "--overwrite"], 2, r"contradict"),
    Case("existing-run-no-flag", ["train", "--run-dir", "{run}", *TINY], 2, r"already holds a run"),
    Case("first-start-bad-batch", ["train", "--run-dir", "{tmp}/new", *TINY, "--train.batch-size", "0"], 2, r"train\.batch_size",
         check=absent("new")),
    Case("first-start-oat-no-init", ["train", "--run-dir", "{tmp}/new", *TINY, "--method.kind", "oat", "--method.path", "hermite"],
         2, r"--init-from", check=absent("new")),
    Case("first-start-init-other-model", ["train", "--run-dir", "{tmp}/new", *TINY, "--model.hidden", "24", "--method.kind", "oat",
         "--method.path", "hermite", "--init-from", "{run}"], 2, r"model", check=absent("new")),
    Case("init-from-without-oat", ["train", "--run-dir", "{tmp}/new", *TINY, "--init-from", "{run}"], 2, r"oat", check=absent("new")),
    Case("run-dir-is-a-file", ["train", "--run-dir", "{tmp}/file", *TINY], 2, r"is a file", a_file),
    Case("run-dir-below-a-file", ["train", "--run-dir", "{tmp}/file/run", *TINY], 2, r"which is a file", a_file),
    Case("run-dir-under-proc", ["train", "--run-dir", "/proc/sdfm-run", *TINY], 2, r"not writable"),
    Case("foreign-folder", ["train", "--run-dir", "{tmp}/other", *TINY], 2, r"holds no sdfm run", foreign_folder),
    # --- the command line and the config
    Case("unknown-flag", ["train", "--run-dir", "{tmp}/new", "--bogus", "3"], 2, r"^error: Unrecognized options: --bogus"),
    Case("bad-int", ["train", "--run-dir", "{tmp}/new", "--train.steps", "abc"], 2, r"^error: Error parsing --train\.steps"),
    Case("bad-choice", ["train", "--run-dir", "{tmp}/new", "--coupling.kind", "magic"], 2, r"^error: .*--coupling\.kind"),
    Case("negative-rtol", ["train", "--run-dir", "{tmp}/new", *TINY, "--eval.rtol", "-1"], 2, r"eval\.rtol", check=absent("new")),
    Case("alpha-outside", ["train", "--run-dir", "{tmp}/new", *TINY, "--method.oat-alpha", "1.5"], 2, r"oat_alpha"),
    Case("source-shape", ["train", "--run-dir", "{tmp}/new", *TINY, "--data.source", "file", "--data.source-path", "{tmp}/src3.npy"],
         2, r"data\.source_path .*shape", wrong_shape_source, check=absent("new")),
    Case("missing-data-file", ["train", "--run-dir", "{tmp}/new", *TINY, "--data.name", "file", "--data.path", "{tmp}/none.npy"],
         2, r"data\.path .*does not exist"),
    Case("no-held-out-with-eval-at-end", ["train", "--run-dir", "{tmp}/new", *TINY, "--data.num-eval", "0",
         "--train.eval-at-end", "True"], 2, r"data\.num_eval = 0 leaves no held-out data", check=absent("new")),
    Case("eval-without-held-out", ["eval", "--run-dir", "{tmp}/noeval"], 2, r"no held-out data", run_without_held_out),
    Case("zero-target-chi2", ["train", "--run-dir", "{tmp}/new", *TINY, "--potential.target-chi2", "0"], 2, r"target_chi2"),
    # --- settings and data that can only diverge: refused before the old run is touched
    Case("overwrite-lr-inf", ["train", "--run-dir", "{run}", "--overwrite", *TINY, "--optim.lr", "inf"], 2,
         r"optim\.lr = inf .*finite"),
    Case("overwrite-lr-1e30", ["train", "--run-dir", "{run}", "--overwrite", *TINY, "--optim.lr", "1e30"], 2, r"optim\.lr .*\(0, 1\]"),
    Case("overwrite-source-1e30", ["train", "--run-dir", "{run}", "--overwrite", *TINY, "--data.source", "file",
         "--data.source-path", "{tmp}/big.npy"], 2, r"big\.npy: .*values beyond", huge_source),
    Case("eval-atol-inf", ["train", "--run-dir", "{tmp}/new", *TINY, "--eval.atol", "inf"], 2, r"eval\.atol", check=absent("new")),
    # --- damaged checkpoints: skipped with a warning, the previous complete one resumes
    Case("corrupt-model-rehashed", [*RESUME, "--train.steps", "30"], 0, FALLBACK, corrupt_model, "", resumed_from_10),
    Case("truncated-model", [*RESUME, "--train.steps", "30"], 0, FALLBACK + r".*hash", truncate_model, "", resumed_from_10),
    Case("pickle-payload", [*RESUME, "--train.steps", "30"], 0, FALLBACK + r".*scheduler\.pt", pickle_payload, "", no_marker),
    Case("state-is-a-list", [*RESUME, "--train.steps", "30"], 0, FALLBACK, state_list, "", resumed_from_10),
    Case("state-version-only", [*RESUME, "--train.steps", "30"], 0, FALLBACK, state_version_only, "", resumed_from_10),
    Case("state-future-version", [*RESUME, "--train.steps", "30"], 0, FALLBACK + r".*version 99", state_future_version, "",
         resumed_from_10),
    Case("state-missing", [*RESUME, "--train.steps", "30"], 0, FALLBACK + r".*missing", state_missing, "", resumed_from_10),
    Case("model-of-other-shape", [*RESUME, "--train.steps", "30"], 0, FALLBACK + r".*shapes", model_of_other_shape, "",
         resumed_from_10),
    Case("optimizer-forged-empty", [*RESUME, "--train.steps", "30"], 0, FALLBACK + r".*optimizer",
         forge_state("optimizer", lambda s: {}), "", resumed_from_10),
    Case("scheduler-forged-epoch", [*RESUME, "--train.steps", "30"], 0, FALLBACK + r".*scheduler",
         forge_state("scheduler", lambda s: {**s, "last_epoch": "abc"}), "", resumed_from_10),
    Case("data-position-forged", [*RESUME, "--train.steps", "30"], 0, FALLBACK + r".*data position",
         forge_state("data_position", lambda s: {"epoch": 0}), "", resumed_from_10),
    Case("sample-newest-ema-other-shape", ["sample", "--run-dir", "{run}", "--out", "{tmp}/s.npy", "--num", "8"], 0,
         FALLBACK + r".*ema", ema_of_other_shape, "checkpoints"),
    Case("eval-newest-ema-other-shape", ["eval", "--run-dir", "{run}", "--nfe", "1", "--num-samples", "64"], 0,
         FALLBACK + r".*ema", ema_of_other_shape, "checkpoints"),
    Case("all-damaged", RESUME, 2, r"no complete checkpoint", all_damaged),
    Case("latest-is-a-folder", RESUME, 2, r"latest is not a file", latest_is_dir),
    Case("garbage-dataset-json", RESUME, 2, r"dataset\.json is not a dataset record", garbage_dataset),
    Case("other-dataset-json", RESUME, 2, r"belongs to dataset", other_dataset),
    # --- sample, eval, worker, fit-potential
    Case("eval-nfe-0", ["eval", "--run-dir", "{run}", "--nfe", "0"], 2, r"--nfe 0 must be positive"),
    Case("eval-negative-samples", ["eval", "--run-dir", "{run}", "--num-samples", "-5"], 2, r"--num-samples -5"),
    Case("sample-label-unconditional", ["sample", "--run-dir", "{run}", "--out", "{tmp}/s.npy", "--label", "99"], 2,
         r"--label 99 needs a class-conditional run"),
    Case("sample-nfe-0", ["sample", "--run-dir", "{run}", "--out", "{tmp}/s.npy", "--nfe", "0"], 2, r"--nfe 0"),
    Case("sample-num-0", ["sample", "--run-dir", "{run}", "--out", "{tmp}/s.npy", "--num", "0"], 2, r"--num 0"),
    Case("sample-bad-suffix", ["sample", "--run-dir", "{run}", "--out", "{tmp}/s.txt"], 2, r"must end in \.npy"),
    Case("sample-out-below-file", ["sample", "--run-dir", "{run}", "--out", "{tmp}/file/s.npy"], 2, r"which is a file", a_file),
    Case("sample-meanflow-on-fm", ["sample", "--run-dir", "{run}", "--out", "{tmp}/s.npy", "--solver", "meanflow"], 2,
         r"--solver meanflow needs a mean-flow run"),
    Case("sample-no-run", ["sample", "--run-dir", "{tmp}/none", "--out", "{tmp}/s.npy"], 2, r"none"),
    Case("worker-negative-steps", ["worker", "--run-dir", "{run}", "--max-steps", "-3"], 2, r"--max-steps must be >= 0"),
    Case("worker-negative-timeout", ["worker", "--run-dir", "{run}", "--trainer-timeout-s", "-1"], 2, r"--trainer-timeout-s"),
    Case("worker-garbage-dataset", ["worker", "--run-dir", "{run}", "--max-steps", "1"], 2, r"not a dataset record",
         lambda run, tmp: (garbage_dataset(run, tmp), _semidiscrete(run))),
    Case("worker-no-config", ["worker", "--run-dir", "{tmp}"], 2, r"no config at"),
    Case("fit-out-below-file", ["fit-potential", "--out", "{tmp}/file/g.safetensors", *TINY[:6]], 2, r"which is a file", a_file),
    Case("fit-without-held-out", ["fit-potential", "--out", "{tmp}/g.safetensors", *TINY[:6], "--data.num-eval", "0",
         "--potential.max-steps", "5"], 0, r"saved .*g\.safetensors"),
    Case("fit-out-suffix", ["fit-potential", "--out", "{tmp}/g.txt", *TINY[:6]], 2, r"must end in \.safetensors"),
    Case("sample-disk-full", ["sample", "--run-dir", "{run}", "--out", "{tmp}/full/s.npy"], 2, r"disk is full|no space left",
         lambda run, tmp: _full_disk(tmp / "full"), check=absent("full/s.npy")),
    Case("eval-read-only-run", ["eval", "--run-dir", "{run}", "--nfe", "1"], 2, r"cannot be written",
         lambda run, tmp: _read_only(run / "eval")),
    Case("worker-read-only-run", ["worker", "--run-dir", "{tmp}/sd", "--max-steps", "1"], 2, r"cannot be written",
         lambda run, tmp: _read_only_semidiscrete_run(run, tmp / "sd"), ""),
    Case("worker-on-exact-run", ["worker", "--run-dir", "{run}", "--max-steps", "5"], 2, r"uses no dual potential"),
    Case("worker-on-config-only", ["worker", "--run-dir", "{tmp}/cfgonly", "--max-steps", "5"], 2, r"no dataset\.json",
         config_only_semidiscrete, check=absent("cfgonly/potential")),
    # --- the run folder's own files in the wrong shape, a typo in --run-dir
    Case("resume-typo-folder", ["train", "--run-dir", "{tmp}/typo", "--resume", *TINY, "--train.steps", "2"], 0,
         r"warning: --resume: .*typo does not exist; starting a new run there"),
    Case("checkpoints-is-a-file", RESUME, 2, r"checkpoints is not a folder", checkpoints_is_a_file),
    Case("lock-is-a-folder", RESUME, 2, r"\.lock is not a file", lock_is_a_folder),
    # --- sizes beyond the machine: refused with the memory they would need
    Case("train-num-points-huge", ["train", "--run-dir", "{tmp}/new", *TINY, "--data.num-points", "100000000000"], 2,
         r"data\.num_points = 100000000000 needs about .* GiB", check=absent("new")),
    Case("sample-num-huge", ["sample", "--run-dir", "{run}", "--out", "{tmp}/s.npy", "--num", "1000000000000"], 2,
         r"--num 1000000000000 needs about .* GiB", check=absent("s.npy")),
    Case("bench-exact-huge", ["bench", "exact", "--sizes", "10000000"], 2, r"--sizes 10000000 needs about .* GiB"),
    Case("bench-match-huge", ["bench", "match", "--N", "10000000000"], 2, r"--N 10000000000 .*needs about .* GiB"),
    Case("resume-config-deleted", [*RESUME, "--train.steps", "30"], 2, r"config\.toml is missing.*checkpoints are intact",
         lambda run, tmp: (run / "config.toml").unlink()),
    # --- benchmarks with sizes that cannot run
    Case("bench-sinkhorn-negative", ["bench", "sinkhorn", "--sizes", "-5"], 2, r"--sizes -5 must be positive"),
    Case("bench-sinkhorn-zero", ["bench", "sinkhorn", "--sizes", "0"], 2, r"--sizes 0 must be positive"),
    Case("bench-sinkhorn-repeats", ["bench", "sinkhorn", "--repeats", "0", "--iters", "-1"], 2, r"must be positive"),
    Case("bench-exact-zero", ["bench", "exact", "--sizes", "0"], 2, r"--sizes 0"),
    Case("bench-exact-negative", ["bench", "exact", "--sizes", "-1", "--dims", "-2"], 2, r"must be positive"),
    Case("bench-match-zero", ["bench", "match", "--N", "0", "--B", "-1"], 2, r"must be positive"),
    Case("bench-potential-budget", ["bench", "potential", "--budget", "-1"], 2, r"--budget -1\.0 must be positive"),
]  # fmt: skip


def test_case_names_are_unique():
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest.mark.slow
def test_fault(case: Case, base_run: Path, tmp_path: Path, capsys):
    try:
        _run_case(case, base_run, tmp_path, capsys)
    finally:
        while _MOUNTS:
            subprocess.run(["umount", str(_MOUNTS.pop())], check=False)


def _run_case(case: Case, base_run: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    if case.setup is not None:
        case.setup(run, tmp_path)
    before = snapshot(run)
    checkpoints_before = snapshot(run / "checkpoints")
    argv = [a.replace("{run}", str(run)).replace("{tmp}", str(tmp_path)) for a in case.argv]
    code = run_cli(argv)
    err = capsys.readouterr().err
    assert code == case.code, f"exit {code}, expected {case.code}:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    if case.code == 2:
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert errors, err[-2000:]
        assert re.search(case.pattern, errors[0]), f"{case.pattern!r} not in {errors[0]!r}"
    else:
        assert re.search(case.pattern, err), f"{case.pattern!r} not in:\n{err[-3000:]}"
    if case.same == "run":
        assert snapshot(run) == before, "the run folder changed"
    elif case.same == "checkpoints":
        assert snapshot(run / "checkpoints") == checkpoints_before
    if case.check is not None:
        case.check(run, tmp_path)


def test_a_corrected_first_start_is_not_blocked(tmp_path, capsys):
    run = tmp_path / "new"
    assert run_cli(["train", "--run-dir", run, *TINY, "--train.steps", "4", "--train.batch-size", "0"]) == 2
    assert run_cli(["train", "--run-dir", run, *TINY, "--train.steps", "4"]) == 0
    assert (run / "checkpoints" / "step-00000004").is_dir()


def test_overwrite_replaces_a_run_only_once_the_new_one_checkpointed(base_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    assert run_cli(["train", "--run-dir", run, "--overwrite", *TINY, "--train.steps", "4"]) == 0
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-00000004"]
    assert not list(tmp_path.glob(".run.replaced-*"))


def _diverge_at(monkeypatch, step: int) -> None:
    """Make the trainer's loss NaN from ``step`` on (a diverging run, without waiting for one)."""
    from sdfm.trainer import Trainer

    real = Trainer.train_step

    def train_step(self):
        metrics = real(self)
        if self.step >= step:
            metrics["loss"] = float("nan")
        return metrics

    monkeypatch.setattr(Trainer, "train_step", train_step)


def test_a_new_run_that_diverges_before_its_first_checkpoint_gives_the_replaced_run_back(
    base_run, tmp_path, monkeypatch, capsys
):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    before = snapshot(run)
    _diverge_at(monkeypatch, 3)
    assert run_cli(["train", "--run-dir", run, "--overwrite", *TINY, "--train.steps", "30"]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: training diverged: the loss is nan at step 3; lower optim.lr"), err[-2000:]
    assert "no checkpoint was written" in last and "Traceback" not in err
    assert snapshot(run) == before and not list(tmp_path.glob(".run.replaced-*"))


def test_a_run_that_diverges_keeps_its_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    _diverge_at(monkeypatch, 13)
    assert run_cli(["train", "--run-dir", run, *TINY, "--train.steps", "30"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "at step 13" in last and "the last checkpoint (step 10) is intact" in last
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-00000010"]
    monkeypatch.undo()
    assert run_cli(["train", "--run-dir", run, "--resume", "--train.steps", "20"]) == 0


OAT = ["--method.kind", "oat", "--method.path", "hermite", "--train.steps", "4"]


def test_an_oat_run_resumed_before_its_first_checkpoint_starts_from_its_init_run_again(base_run, tmp_path, capsys):
    """--init-from is part of the run's config: a resume that finds no checkpoint (the first start was
    killed early) fine-tunes the init run's weights, not random ones; a resume naming another init
    run is refused."""
    assert run_cli(["train", "--run-dir", tmp_path / "full", *TINY, *OAT, "--init-from", base_run]) == 0
    assert run_cli(["train", "--run-dir", tmp_path / "early", *TINY, *OAT, "--init-from", base_run]) == 0
    shutil.rmtree(tmp_path / "early" / "checkpoints")  # what a kill before the first checkpoint leaves
    assert run_cli(["train", "--run-dir", tmp_path / "early", "--resume"]) == 0
    a = load_file(tmp_path / "full" / "checkpoints" / "step-00000004" / "model.safetensors")
    b = load_file(tmp_path / "early" / "checkpoints" / "step-00000004" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = tmp_path / "other"
    shutil.copytree(base_run, other)
    capsys.readouterr()
    code = run_cli(["train", "--run-dir", tmp_path / "early", "--resume", "--train.steps", "6", "--init-from", other])
    assert code == 2 and "method.init_from" in capsys.readouterr().err


LEARNED = ["--method.path", "learned", "--method.schedule-steps", "5", "--method.schedule-batch", "32"]


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(p.read_bytes()[:40]),
        lambda p: p.write_bytes(b"garbage"),
        lambda p: p.write_bytes(__import__("sdfm.checkpoint", fromlist=["x"]).save_tensors({"w": torch.zeros(3)}, {})),
        lambda p: (p.unlink(), p.mkdir()),
    ],
    ids=["truncated", "garbage", "other-degree", "folder"],
)
def test_a_damaged_learned_schedule_resumes_from_the_checkpoints_copy(tmp_path, damage, capsys):
    full, run = tmp_path / "full", tmp_path / "run"
    assert run_cli(["train", "--run-dir", full, *TINY, *LEARNED, "--train.steps", "20"]) == 0
    assert run_cli(["train", "--run-dir", run, *TINY, *LEARNED, "--train.steps", "10"]) == 0
    damage(run / "schedule.safetensors")
    capsys.readouterr()
    assert run_cli(["train", "--run-dir", run, "--resume", "--train.steps", "20"]) == 0
    err = capsys.readouterr().err + capsys.readouterr().out
    assert "schedule.safetensors cannot be used" in err and "Traceback" not in err
    a = load_file(full / "checkpoints" / "step-00000020" / "model.safetensors")
    b = load_file(run / "checkpoints" / "step-00000020" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same schedule, from the checkpoint


def test_a_replacement_killed_before_its_first_checkpoint_gives_the_replaced_run_back(base_run, tmp_path, capsys):
    """What a SIGKILL of an --overwrite start leaves (the old run aside, a new folder without a
    checkpoint) is undone by the next start, which then resumes the old run."""
    run = tmp_path / "run"
    shutil.copytree(base_run, tmp_path / ".run.replaced-999999999")  # no such process
    shutil.copytree(base_run, run)
    shutil.rmtree(run / "checkpoints")
    assert run_cli(["train", "--run-dir", run, "--resume", "--train.steps", "30"]) == 0
    assert "the replaced run is back in place" in capsys.readouterr().err
    assert (run / "checkpoints" / "step-00000030").is_dir() and (run / "checkpoints" / "step-00000020").is_dir()
    assert not list(tmp_path.glob(".run.replaced-*"))


def test_overwrite_on_a_full_disk_is_one_line_and_keeps_the_old_run(base_run, tmp_path, monkeypatch, capsys):
    import sdfm.rundir as rundir_mod

    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    before = snapshot(run)

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rundir_mod.os, "pwrite", full)
    assert run_cli(["train", "--run-dir", run, "--overwrite", *TINY, "--train.steps", "4"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and ".lock cannot be written (No space left on device)" in last
    assert snapshot(run) == before and not list(tmp_path.glob(".run.replaced-*"))


def test_disk_full_during_a_save_keeps_the_last_checkpoint_and_exits_2(
    base_run, tmp_path, monkeypatch, capsys
):
    import sdfm.checkpoint as ckpt_mod

    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    before = snapshot(run / "checkpoints")
    real_fsync = os.fsync

    def full(fd):
        if ".tmp-step-" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(ckpt_mod.os, "fsync", full)
    assert run_cli(["train", "--run-dir", run, "--resume", "--train.steps", "30"]) == 2
    first = capsys.readouterr().err.strip().splitlines()[-1]
    assert first.startswith("error: no space left") and "previous checkpoint" in first
    assert snapshot(run / "checkpoints") == before
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_a_cache_below_a_file_is_one_line(monkeypatch, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("SDFM_CACHE", str(tmp_path / "file" / "cache"))
    assert run_cli(["train-classifier", "--data", "digits"]) == 2
    assert "SDFM_CACHE=" in capsys.readouterr().err


def test_help_into_a_closed_pipe_is_quiet():
    """`sdfm train --help | head -1`: the reader leaves early; no BrokenPipeError traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "sdfm", "train", "--help"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip
    proc.stdout.readline()
    proc.stdout.close()  # as head -1 does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) in (0, 141) and "Traceback" not in err and "BrokenPipe" not in err, err


def test_run_files_follow_the_umask(tmp_path):
    """config.toml, dataset.json, latest and the potentials are readable by a teammate when the umask
    says so (they were 0600 whatever it was)."""
    from sdfm.checkpoint import write_atomic

    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "a.toml", b"x")
        os.umask(0o077)
        write_atomic(tmp_path / "b.toml", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.toml").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.toml").stat().st_mode & 0o777 == 0o600


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path):
    run = tmp_path / "run"
    proc = _train_proc(run, 100_000, "--train.ckpt-every", "100000", "--train.log-every", "1")
    for line in proc.stdout:  # wait for training to run, then press Ctrl-C
        if line.startswith("step "):
            break
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    saved = re.search(r"SIGINT: saved checkpoint .*step-(\d+) at step (\d+)", out)
    assert saved and (run / "checkpoints" / f"step-{int(saved.group(2)):08d}").is_dir(), out
    assert run_cli(["train", "--run-dir", run, "--resume", "--train.steps", str(int(saved.group(2)) + 2)]) == 0


def test_a_resumed_run_writes_the_bytes_of_an_uninterrupted_one(tmp_path):
    """Every file of the final checkpoint, byte for byte (so byte hashes can check reproducibility)."""
    assert run_cli(["train", "--run-dir", tmp_path / "a", *TINY, "--train.steps", "20"]) == 0
    assert run_cli(["train", "--run-dir", tmp_path / "b", *TINY, "--train.steps", "10"]) == 0
    assert run_cli(["train", "--run-dir", tmp_path / "b", "--resume", "--train.steps", "20"]) == 0
    a, b = (snapshot(tmp_path / r / "checkpoints" / "step-00000020") for r in "ab")
    assert a == b and "optimizer.safetensors" in a


def test_overwrite_through_a_symlink_replaces_the_run_it_names_and_keeps_the_link(base_run, tmp_path):
    shutil.copytree(base_run, tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert run_cli(["train", "--run-dir", tmp_path / "link", "--overwrite", *TINY, "--train.steps", "4"]) == 0
    assert (tmp_path / "link").is_symlink() and (tmp_path / "link").resolve() == (tmp_path / "real").resolve()
    assert sorted(p.name for p in (tmp_path / "real" / "checkpoints").glob("step-*")) == ["step-00000004"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]  # nothing stale left beside them


@pytest.mark.slow
def test_checkpoint_bytes_are_deterministic(tmp_path):
    """The same state saved twice, by two processes, gives byte-identical files."""
    code = (
        "import sys, torch; from sdfm.checkpoint import CheckpointManager\n"
        "torch.manual_seed(0); m = torch.nn.Linear(3, 2)\n"
        "opt = torch.optim.AdamW(m.parameters()); m(torch.ones(1, 3)).sum().backward(); opt.step()\n"
        "CheckpointManager(sys.argv[1], 1).save(5, {'model': m.state_dict()}, {'optimizer': opt.state_dict()},"
        " {'a': 1, 'b': 2}, metadata={'fingerprint': 'f', 'dataset': 'd', 'x': 'y'})\n"
    )
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / name)], check=True, timeout=120)
    a, b = snapshot(tmp_path / "a"), snapshot(tmp_path / "b")
    assert a == b and "checkpoints/step-00000005/optimizer.safetensors" in a


# ------------------------------------------------------------------------- real processes


def _train_proc(run: Path, steps: int, *extra: str, resume: bool = False) -> subprocess.Popen:
    argv = [sys.executable, "-m", "sdfm", "train", "--run-dir", str(run), *TINY, "--train.steps", str(steps)]
    argv += ["--train.ckpt-every", "5", *extra] + (["--resume"] if resume else [])
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip


@pytest.mark.slow
def test_sigkill_at_seeded_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path):
    steps = 60
    ref = _train_proc(tmp_path / "ref", steps)
    assert ref.wait(timeout=300) == 0, ref.stdout.read()
    rng = random.Random(12345)
    run = tmp_path / "run"
    for attempt in range(3):
        proc = _train_proc(run, steps, resume=attempt > 0)
        time.sleep(rng.uniform(2.0, 6.0))  # while importing, building, training or saving
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    final = _train_proc(run, steps, resume=True)
    out, _ = final.communicate(timeout=300)
    assert final.returncode == 0, out
    a = load_file(tmp_path / "ref" / "checkpoints" / f"step-{steps:08d}" / "model.safetensors")
    b = load_file(run / "checkpoints" / f"step-{steps:08d}" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_second_trainer_on_a_live_run_is_refused_with_the_holder(tmp_path):
    run = tmp_path / "run"
    first = _train_proc(run, 100000, "--train.log-every", "1000")
    try:
        _wait_until(lambda: (run / "config.toml").is_file(), 120)
        second = subprocess.run(
            [sys.executable, "-m", "sdfm", "train", "--run-dir", str(run), "--resume"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert second.returncode == 2, second.stderr
        line = second.stderr.strip().splitlines()[0]
        assert f"host {socket.gethostname()}, PID {first.pid}" in line and "in use by another trainer" in line
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    # the holder is dead: its lock is stale and the next resume takes it over without a question
    done = _latest_step(run)
    again = _train_proc(run, done + 5, resume=True)
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out


def _wait_until(condition: Callable[[], bool], seconds: float) -> None:
    """Poll ``condition`` until it holds or ``seconds`` pass (the caller asserts what it needs)."""
    deadline = time.time() + seconds
    while not condition() and time.time() < deadline:
        time.sleep(0.2)


def _latest_step(run: Path) -> int:
    pointer = run / "checkpoints" / "latest"
    return int(pointer.read_text().strip()[len("step-") :]) if pointer.is_file() else 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.is_file() and "State:\tZ" in status.read_text())


@pytest.mark.slow
def test_a_spawned_worker_dies_with_its_sigkilled_trainer_and_resume_starts_one_worker(tmp_path):
    run = tmp_path / "run"
    sd = ["--coupling.kind", "semidiscrete", "--potential.source", "worker", "--potential.spawn-worker", "True",
          "--potential.publish-every", "5", "--train.log-every", "1000"]  # fmt: skip
    trainer = _train_proc(run, 100000, *sd)
    lock = run / "potential" / ".lock"
    _wait_until(lambda: lock.is_file() and bool(lock.read_text().strip()), 120)
    worker_pid = json.loads(lock.read_text())["pid"]
    assert _alive(worker_pid)
    trainer.send_signal(signal.SIGKILL)
    trainer.wait(timeout=60)
    _wait_until(lambda: not _alive(worker_pid), 30)
    assert not _alive(worker_pid), "the spawned worker outlived its trainer"
    done = _latest_step(run)
    again = _train_proc(run, done + 5, *sd, resume=True)
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out
    assert out.count("started worker pid") == 1


@pytest.mark.slow
def test_sigterm_during_the_potential_fit_saves_it_and_resume_continues_it(tmp_path):
    run = tmp_path / "run"
    sd = ["--coupling.kind", "semidiscrete", "--potential.source", "fit", "--potential.target-chi2", "1e-9",
          "--potential.max-steps", "1000000", "--potential.max-seconds", "600"]  # fmt: skip
    proc = _train_proc(run, 10, *sd)
    lines = []
    for line in proc.stdout:  # wait until the fit has taken steps (it logs every 100)
        lines.append(line)
        if line.startswith("potential step "):
            break
    proc.send_signal(signal.SIGTERM)
    out = "".join(lines) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    assert "SIGTERM during the potential fit: saved its state at step" in out
    state = run / "potential" / "fit_state.safetensors"
    assert state.is_file()
    again = _train_proc(run, 10, *sd, "--potential.max-seconds", "1", resume=True)
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out
    assert "continuing the interrupted fit" in out and not state.exists()
    assert (run / "checkpoints" / "step-00000010").is_dir()


@pytest.mark.slow
def test_sigterm_during_a_standalone_fit_saves_it_and_resume_continues_it(tmp_path):
    out_file = tmp_path / "g.safetensors"
    argv = [sys.executable, "-m", "sdfm", "fit-potential", "--out", str(out_file), *TINY[:6],
            "--potential.target-chi2", "1e-9", "--potential.max-steps", "1000000"]  # fmt: skip
    proc = subprocess.Popen([*argv, "--potential.max-seconds", "600"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    for line in proc.stdout:  # wait until the fit has taken steps (it logs every 100)
        if line.startswith("potential step "):
            break
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    state = tmp_path / "g.fit-state.safetensors"
    assert proc.returncode == 143 and "saved its state at step" in out and "--resume continues it" in out, out
    assert state.is_file() and not out_file.exists() and "Traceback" not in out
    again = subprocess.run([*argv, "--potential.max-seconds", "1"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "pass --resume to continue it" in again.stderr
    again = subprocess.run([*argv, "--potential.max-seconds", "1", "--resume"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert out_file.is_file() and not state.exists()


@pytest.mark.slow
def test_sigterm_during_the_learned_schedule_fit_is_one_line_and_leaves_no_run(tmp_path):
    run = tmp_path / "run"
    proc = _train_proc(run, 10, "--method.path", "learned", "--method.schedule-steps", "1000000")
    for line in proc.stdout:
        if "fitting the schedule" in line:
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143 and "stopped: SIGTERM during the learned schedule's fit" in out, out
    assert "Traceback" not in out and not run.exists()


def test_a_worker_of_its_own_job_stops_once_the_trainer_it_saw_goes_silent(tmp_path):
    from sdfm.rundir import HEARTBEAT_FILE, write_heartbeat
    from sdfm.worker import _Liveness

    logs = []
    alive = _Liveness(tmp_path, parent=0, timeout_s=60.0, log=logs.append)
    assert not alive.gone()  # no trainer yet: a worker may pre-fit before training starts
    write_heartbeat(tmp_path, step=3)
    alive.checked = 0.0
    assert not alive.gone() and alive.seen
    rec = json.loads((tmp_path / HEARTBEAT_FILE).read_text())
    rec["time"] -= 120.0
    (tmp_path / HEARTBEAT_FILE).write_text(json.dumps(rec))
    alive.checked = 0.0
    assert alive.gone() and "no trainer heartbeat" in logs[-1]
    assert not _Liveness(tmp_path, parent=0, timeout_s=0.0, log=logs.append).gone()  # 0: never


def test_a_checkpoint_of_the_old_torch_save_layout_still_resumes(base_run, tmp_path, capsys):
    """Layout version 2 stored optimizer and scheduler with torch.save; it is read with weights_only."""
    from sdfm.checkpoint import state_from_bytes

    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    d = step20(run)
    state = json.loads((d / "trainer_state.json").read_text())
    for stem in ("optimizer", "scheduler"):
        obj = state_from_bytes((d / f"{stem}.safetensors").read_bytes())
        torch.save(obj, d / f"{stem}.pt")
        (d / f"{stem}.safetensors").unlink()
        state["files"].pop(f"{stem}.safetensors")
        state["files"][f"{stem}.pt"] = hashlib.sha256((d / f"{stem}.pt").read_bytes()).hexdigest()
    state["version"] = 2
    (d / "trainer_state.json").write_text(json.dumps(state))
    assert run_cli(["train", "--run-dir", run, "--resume", "--train.steps", "30"]) == 0
    err = capsys.readouterr().err
    assert "resumed from" in err and "step-00000020" in err and "skipping" not in err
