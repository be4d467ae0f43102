"""The ``sdfm`` command: one tyro subcommand per job (train, sample, eval, fit-potential, worker,
train-classifier, bench ...), each a dataclass whose fields are its flags and whose ``run`` does it.

Commands with a config (``train``, ``fit-potential``) layer it as torchtitan's config manager does:
the defaults, then the TOML preset of ``--config`` (pre-parsed first), then ``--section.field value``
overrides parsed by tyro on top. Help is generated from the dataclasses' docstrings.

Bad input ends with one ``error: ...`` line naming the input and the fix, and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Annotated, Literal, Union

import tyro

from sdfm import config as config_mod
from sdfm.bench.data import DataBench
from sdfm.bench.exact import ExactBench
from sdfm.bench.gpu_check import GpuCheck
from sdfm.bench.match import MatchBench
from sdfm.bench.overhead import OverheadBench
from sdfm.bench.potential import PotentialBench
from sdfm.bench.quality import QualityBench
from sdfm.bench.sinkhorn import SinkhornBench
from sdfm.bench.suite import SuiteBench
from sdfm.config import Config
from sdfm.errors import AgreedError, UserError
from sdfm.signals import Interrupted

ConfigFlags = Annotated[Config, tyro.conf.arg(name=""), tyro.conf.FlagConversionOff]
"""The whole config as --section.field flags (booleans as True/False, lists as space-separated values)."""
Switch = Annotated[bool, tyro.conf.FlagConversionOff]
"""A boolean option given a value, --name True / --name False (as config booleans are)."""


@dataclass(kw_only=True)
class TrainCommand:
    """Train a flow-matching model (one process, or every rank of a torchrun / accelerate job).

    The config is the defaults, then the TOML preset of --config (see launch/configs/), then the
    --section.field overrides; the resolved config is saved as RUN/config.toml. A run folder that
    already holds a run is refused unless --resume or --overwrite is given.
    """

    config: Path | None = None
    """TOML preset (default: the built-in defaults, or RUN/config.toml with --resume)."""
    run_dir: Path | None = None
    """Run folder (default: runs/<preset name>)."""
    resume: bool = False
    """Continue the run in --run-dir from its newest complete checkpoint."""
    overwrite: bool = False
    """Delete the run in --run-dir and start over."""
    init_from: Path | None = None
    """A trained run whose EMA weights this run starts from (OAT fine-tuning, method.kind = 'oat')."""
    cfg: ConfigFlags = field(default_factory=Config)

    def run(self) -> None:
        from sdfm.trainer import run_training

        if self.resume and self.overwrite:
            raise UserError("--resume and --overwrite contradict each other; pass one of them")
        run_dir = self.run_dir or Path("runs") / (self.config.stem if self.config else "default")
        saved = run_dir / "config.toml"
        if self.resume and self.config is None and (run_dir / "checkpoints").is_dir() and not saved.exists():
            raise UserError(
                f"{saved} is missing, and it records the run's settings (the checkpoints are intact): restore it, "
                "or resume with --config set to the run's preset and the flags it was started with"
            )
        if self.init_from is not None:  # the flag is a short form of --method.init-from
            self.cfg.method.init_from = str(self.init_from)
        run_training(config_mod.validate(self.cfg), run_dir, resume=self.resume, overwrite=self.overwrite)


@dataclass(kw_only=True)
class FitPotentialCommand:
    """Fit the semidiscrete dual potential g of a dataset and save it.

    The problem is the config's [data] and [potential] sections; the fit runs until
    potential.target_chi2, potential.max_steps or potential.max_seconds, and the file holds g with
    its chi^2, epsilon and the dataset fingerprint. Train with it: --coupling.kind semidiscrete
    --potential.source file --potential.path FILE.
    """

    out: Path
    """Where to save the potential (a .safetensors file)."""
    config: Path | None = None
    """TOML preset (default: the built-in defaults)."""
    resume: bool = False
    """Continue a fit that SIGTERM stopped (its state was saved beside --out)."""
    cfg: ConfigFlags = field(default_factory=Config)

    def run(self) -> None:
        from sdfm.checkpoint import check_writable
        from sdfm.data import load_dataset
        from sdfm.distributed.env import DistEnv, potential_device
        from sdfm.monitor import info
        from sdfm.semidiscrete import fit_and_save
        from sdfm.semidiscrete.chi2 import describe_chi2
        from sdfm.semidiscrete.fit import FitInterrupted

        if self.out.suffix != ".safetensors":
            raise UserError(f"--out {self.out} must end in .safetensors: where to save the potential")
        check_writable(self.out, "--out")  # before the fit, not after it
        self.cfg.train.eval_at_end = False  # a fit evaluates no model: data.num_eval = 0 is fine here
        cfg = config_mod.validate(self.cfg)
        data = load_dataset(cfg.data)
        p = cfg.potential
        info(
            f"fitting the potential of {data.name}: N={len(data)}, d={data.x[0].numel()}, eps={p.epsilon}, {p.method}"
        )
        device = potential_device(DistEnv(), cfg)
        state = self.out.with_name(self.out.stem + ".fit-state.safetensors")  # where SIGTERM saves the fit
        if state.exists() and not self.resume:
            raise UserError(
                f"{state} holds a fit that SIGTERM stopped; pass --resume to continue it, or delete the file to start over"
            )
        if self.resume and not state.exists():
            raise UserError(f"--resume: no saved fit at {state}; run without --resume to start one")
        try:
            res = fit_and_save(cfg, data, self.out, device=device, log=info, state_path=state)
        except FitInterrupted as e:
            raise Interrupted(f"{e}; the same command with --resume continues it") from None
        info(
            f"saved {self.out}: {res.steps} steps, {res.seconds:.1f} s, "
            f"{describe_chi2(res.chi2, res.chi2_se, cfg.potential.target_chi2)}"
        )


@dataclass(kw_only=True)
class WorkerCommand:
    """Run the dual-potential worker of a run: keeps refitting g and publishes snapshots."""

    run_dir: Path
    """Run folder (its config.toml gives the data and the [potential] settings)."""
    config: Path | None = None
    """Use this config instead of RUN/config.toml (its data must match the run's)."""
    max_steps: int = 0
    """Stop after this many SGD steps in this process (0: run until SIGTERM/SIGINT)."""
    trainer_timeout_s: float = 900.0
    """Stop once the run's trainer, seen alive, has not refreshed RUN/heartbeat.json for this many
    seconds (0: never; a worker spawned by its trainer also dies with it)."""

    def run(self) -> None:
        from sdfm.worker import run_worker

        run_worker(
            self.run_dir,
            config_path=self.config,
            max_steps=self.max_steps,
            trainer_timeout_s=self.trainer_timeout_s,
        )


@dataclass(kw_only=True)
class SampleCommand:
    """Draw samples from a trained run into a .npy or .png file."""

    run_dir: Path
    """Run folder to sample from (its newest complete checkpoint is used)."""
    out: Path
    """Output file: .npy (the raw samples) or .png (a scatter plot or an image grid)."""
    num: int = 1000
    """Number of samples."""
    nfe: int = 8
    """Function evaluations for the fixed-step solvers (ignored by dopri5)."""
    solver: Literal["auto", "euler", "midpoint", "heun", "rk4", "dopri5", "meanflow"] = "auto"
    """ODE solver, or 'meanflow' (the k-step map of a mean-flow run, k = --nfe); 'auto': meanflow for a
    mean-flow run, else euler."""
    seed: int = 0
    """Seed of the noise (and of the labels of a conditional model)."""
    label: int = -1
    """Class to generate for a conditional model (-1: classes drawn uniformly)."""
    ema: Switch = True
    """Use the EMA weights."""
    exact: Switch = False
    """Sample the exact flow of a semidiscrete run's coupling (its potential) instead of the model."""

    def run(self) -> None:
        from sdfm.evaluate import sample_to_file

        sample_to_file(self)


@dataclass(kw_only=True)
class EvalCommand:
    """Evaluate a trained run (W2, MMD, NPE, straightness, classifier FD) and write RUN/eval/."""

    run_dir: Path
    """Run folder to evaluate (its newest complete checkpoint is used)."""
    num_samples: int = 0
    """Samples per solver setting (0: the run's eval.num_samples)."""
    nfe: list[int] | None = None
    """Euler budgets to evaluate (default: the run's eval.nfe)."""
    dopri5: Switch = True
    """Also evaluate dopri5."""

    def run(self) -> None:
        from sdfm.evaluate import evaluate_run

        evaluate_run(self.run_dir, num_samples=self.num_samples, nfe=self.nfe, dopri5=self.dopri5)


@dataclass(kw_only=True)
class TrainClassifierCommand:
    """Train and cache the feature classifier used for Fréchet distances (digits, fashion-mnist)."""

    data: Literal["digits", "fashion-mnist"] = "digits"
    """Dataset whose classifier to train."""
    force: Switch = False
    """Retrain even when a cached classifier exists."""

    def run(self) -> None:
        from sdfm.evaluate import ensure_classifier

        ensure_classifier(self.data, force=self.force)


@dataclass(kw_only=True)
class DataPackCommand:
    """Pack a dataset into one memory-mapped file that every training process shares.

    SRC is a folder of images (class sub-folders give labels), a .npy/.npz/.safetensors array file,
    or a built-in set (fashion-mnist, digits). Images are stored as uint8, vectors as float16/float32.
    Train on it with --data.name file --data.path OUT.
    """

    src: tyro.conf.Positional[str]
    """What to pack: an image folder, an array file, 'fashion-mnist' or 'digits'."""
    out: tyro.conf.Positional[Path]
    """The pack to write (a .safetensors file)."""
    size: int | None = None
    """Resize the shorter side of every image to SIZE and centre-crop SIZE x SIZE (image folders)."""
    channels: Literal["auto", "1", "3"] = "auto"
    """Channels of packed images (auto: 1 when the first image is grayscale, else 3)."""
    workers: int = 0
    """Image-decoding processes (0: one per core)."""
    strict: bool = False
    """Refuse a folder with an unreadable image instead of skipping it."""
    overwrite: bool = False
    """Replace OUT if it exists (the old pack stays until the new one is complete)."""

    def run(self) -> None:
        from sdfm.data.packer import pack_source

        if self.workers < 0:
            raise UserError(f"--workers {self.workers} must be 0 (one per core) or more")
        r = pack_source(
            self.src, self.out, size=self.size, channels=self.channels, workers=self.workers,
            strict=self.strict, overwrite=self.overwrite, log=lambda m: print(m, file=sys.stderr),
        )  # fmt: skip
        rate = r.n / max(r.seconds, 1e-9)
        skipped = f", {r.skipped} skipped" if r.skipped else ""
        print(f"packed {r.n} points{skipped} into {r.path} in {r.seconds:.1f} s ({rate:.0f}/s), fingerprint {r.fingerprint}")


@dataclass(kw_only=True)
class DataInfoCommand:
    """Print a pack's header: points, shape, stored dtype, scaling, classes, fingerprint."""

    path: tyro.conf.Positional[Path]
    """The pack."""

    def run(self) -> None:
        from sdfm.data.pack import open_pack

        pack = open_pack(self.path)
        for key, value in pack.meta.items():
            print(f"{key:14s} {value}")
        print(f"{'bytes':14s} {self.path.stat().st_size}")


@dataclass(kw_only=True)
class DataVerifyCommand:
    """Re-hash a whole pack and compare with the fingerprint recorded when it was packed."""

    path: tyro.conf.Positional[Path]
    """The pack."""

    def run(self) -> None:
        from tqdm import tqdm

        from sdfm.data.pack import open_pack, verify_pack

        n = len(open_pack(self.path).x)
        with tqdm(total=n, unit=" rows", desc="verifying", disable=not sys.stderr.isatty()) as bar:
            pack = verify_pack(self.path, progress=bar.update)
        print(f"{self.path}: ok, {n} points, fingerprint {pack.fingerprint}")


DATA_COMMANDS = {"pack": DataPackCommand, "info": DataInfoCommand, "verify": DataVerifyCommand}
DATA_HELP = "packed datasets: pack (make one), info (print its header), verify (re-hash it)"
BENCHES = {
    "suite": SuiteBench,
    "sinkhorn": SinkhornBench,
    "match": MatchBench,
    "potential": PotentialBench,
    "quality": QualityBench,
    "exact": ExactBench,
    "overhead": OverheadBench,
    "data": DataBench,
    "gpu-check": GpuCheck,
}
COMMANDS = {
    "train": TrainCommand,
    "sample": SampleCommand,
    "eval": EvalCommand,
    "fit-potential": FitPotentialCommand,
    "worker": WorkerCommand,
    "train-classifier": TrainClassifierCommand,
}
BENCH_HELP = (
    "benchmarks beside their peers: suite (named workloads with the goals), sinkhorn, match, potential, "
    "quality, exact, overhead, data (packed datasets of ImageNet size); gpu-check (the one-shot GPU check of launch/gpu-check.sh)"
)


def _preset(name: str, argv: list[str]):
    """The default instance of command ``name`` with its config loaded from --config (train: or from
    RUN/config.toml with --resume), or None when the command has no config or none is given."""
    cls = COMMANDS.get(name)
    if cls is None or "cfg" not in cls.__dataclass_fields__:
        return None
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--config", type=Path)
    parser.add_argument("--run-dir", "--run_dir", dest="run_dir", type=Path)
    parser.add_argument("--resume", action="store_true")
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            opts, _ = parser.parse_known_args(argv)
    except SystemExit:  # a flag without its value: tyro reports it below
        return None
    path = opts.config
    if path is None and name == "train" and opts.resume and opts.run_dir is not None:
        saved = opts.run_dir / "config.toml"
        path = saved if saved.is_file() else None
    if path is None:
        return None
    # Fields without a default stay required: tyro.MISSING marks them so in the preset.
    required = {
        f.name: tyro.MISSING for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
    }
    return cls(cfg=config_mod.load_config(path), **required)


def _command_type(name: str | None, argv: list[str]):
    """The union of every command (bench: of every benchmark), the named one with its preset."""
    preset = _preset(name, argv) if name else None
    members = []
    for key, cls in COMMANDS.items():
        marker = tyro.conf.subcommand(key, default=preset) if key == name and preset is not None else None
        members.append(Annotated[cls, marker or tyro.conf.subcommand(key)])
    benches = Union[tuple(Annotated[cls, tyro.conf.subcommand(key)] for key, cls in BENCHES.items())]  # noqa: UP007
    members.append(Annotated[benches, tyro.conf.subcommand("bench", description=BENCH_HELP)])
    data = Union[tuple(Annotated[cls, tyro.conf.subcommand(key)] for key, cls in DATA_COMMANDS.items())]  # noqa: UP007
    members.append(Annotated[data, tyro.conf.subcommand("data", description=DATA_HELP)])
    return Union[tuple(members)]  # noqa: UP007


def parse(argv: list[str]):
    """The command object that ``argv`` (without the program name) describes (tyro exits on bad flags)."""
    name = argv[0] if argv and not argv[0].startswith("-") else None
    command = _command_type(name, argv[1:])
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return tyro.cli(command, args=argv, prog="sdfm", config=(tyro.conf.OmitSubcommandPrefixes,))
    except SystemExit as e:
        text = captured.getvalue()
        if e.code not in (0, None):
            print(f"error: {_first_message(text) or 'bad command line'}", file=sys.stderr)
        sys.stderr.write(text)
        raise


def _first_message(text: str) -> str | None:
    """The line of tyro's boxed message that names the flag (the one after the box's title), without
    the box drawing (rich's, or the plain one it prints without a terminal)."""
    lines = [line.strip().strip("│╭╮╰╯─-| ").strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("usage:")]
    return lines[1] if len(lines) > 1 else (lines[0] if lines else None)


ZERO_MEANS_SOMETHING = {"threads", "ranks", "pca_dim", "warmup", "folder_images", "max_points", "clusters",
                        "finetune_steps", "seed", "epsilon"}  # fmt: skip
"""Benchmark settings whose 0 is documented ("0: the default threads", "0: skip it", "0: no PCA" ...)."""


def check_bench_args(bench) -> None:
    """Refuse (one line) a benchmark setting that cannot be run: a negative number anywhere, and 0 for
    a size, count or budget (``ZERO_MEANS_SOMETHING`` names the settings where 0 has a meaning)."""
    for f in fields(bench):
        value, default = getattr(bench, f.name), f.default
        if default is MISSING and f.default_factory is not MISSING:
            default = f.default_factory()
        values = value if isinstance(value, list) else [value]
        defaults = default if isinstance(default, list) else [default]
        flag = "--" + f.name.replace("_", "-")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int | float):
                continue
            if v < 0 or (v == 0 and 0 not in defaults and f.name not in ZERO_MEANS_SOMETHING) or v != v:
                raise UserError(f"{flag} {v} must be positive; pass a size, count or budget above 0")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        command = parse(argv)
        if isinstance(command, tuple(BENCHES.values())):
            check_bench_args(command)
        code = command.run()
    except UserError as e:
        rank = os.environ.get("RANK", "0")
        if rank == "0" or not isinstance(e, AgreedError):  # an agreed error is printed once, by rank 0
            print(f"error: {e}" if rank == "0" else f"error (rank {rank}): {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Interrupted as e:  # SIGTERM stopped a loop at a step boundary; the message says what was saved
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(143)
    except BrokenPipeError:  # `sdfm train --help | head -1`: the reader left; no traceback, and the
        devnull = os.open(os.devnull, os.O_WRONLY)  # shell's code for a closed pipe (128 + SIGPIPE)
        os.dup2(devnull, sys.stdout.fileno())  # Python flushes stdout at exit: into nothing now
        sys.exit(141)
    if code:
        sys.exit(code)
