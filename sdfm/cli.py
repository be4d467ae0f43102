"""The ``sdfm`` command: train, sample, eval, bench, train-classifier.

Bad input ends with one ``error: ...`` line naming the input and the fix, and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sdfm.errors import AgreedError, UserError

COMMANDS = {
    "train": "train a flow-matching model (sdfm train --config FILE [--run-dir DIR] [--resume] [--section.field VALUE ...])",
    "sample": "draw samples from a trained run into a .npy or .png file",
    "eval": "evaluate a trained run (W2, MMD, NPE, straightness, classifier FD) and write RUN/eval/",
    "bench": "benchmarks: `sdfm bench suite` (named workloads beside every peer, with the goals), `sdfm bench sinkhorn`, `match`, `potential`, `quality`",
    "train-classifier": "train and cache the feature classifier used for Fréchet distances (digits, fashion-mnist)",
    "fit-potential": "fit the semidiscrete dual potential g of a dataset and save it (sdfm fit-potential --config FILE --out FILE)",
    "worker": "run the dual-potential worker of a run: keeps refitting g and publishes snapshots (sdfm worker --run-dir DIR)",
}

TRAIN_HELP = """\
usage: sdfm train [--config FILE] [--run-dir DIR] [--resume] [--overwrite] [--section.field VALUE ...]

Train a flow-matching model. The config is built from the defaults, then the TOML preset given by
--config (see launch/configs/), then the --section.field overrides listed below. The resolved config is
saved as RUN/config.toml. A run folder that already holds a run is refused unless --resume (continue
from its newest complete checkpoint) or --overwrite (delete it and start over) is given.

run options:
  --config FILE    TOML preset (default: the built-in defaults, or RUN/config.toml with --resume)
  --run-dir DIR    run folder (default: runs/<preset name>)
  --resume         continue the run in --run-dir from its newest complete checkpoint
  --overwrite      delete the run in --run-dir and start over

"""


def _tyro_cli(cls, default, args: list[str], prog: str, description: str):
    import tyro

    return tyro.cli(
        cls,
        default=default,
        args=args,
        prog=prog,
        description=description,
        config=(tyro.conf.FlagConversionOff,),
    )


def _config_from(config_path: Path | None, overrides: list[str], prog: str):
    """Defaults, then the TOML preset, then --section.field overrides; validated."""
    from sdfm import config as config_mod

    cfg = config_mod.load_config(config_path) if config_path else config_mod.Config()
    cfg = _tyro_cli(config_mod.Config, cfg, overrides, prog, "config overrides")
    return config_mod.validate(cfg)


def cmd_train(argv: list[str]) -> None:
    from sdfm import config as config_mod
    from sdfm.train import run_training

    parser = argparse.ArgumentParser(prog="sdfm train", add_help=False)
    parser.add_argument("--config", type=Path)
    parser.add_argument("--run-dir", "--run_dir", dest="run_dir", type=Path)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--overwrite", action="store_true")
    opts, rest = parser.parse_known_args(argv)
    if opts.resume and opts.overwrite:
        raise UserError("--resume and --overwrite contradict each other; pass one of them")
    if any(a in ("-h", "--help") for a in rest):
        print(TRAIN_HELP)
        _tyro_cli(config_mod.Config, config_mod.Config(), ["--help"], "sdfm train", "config overrides")
        return
    run_dir = opts.run_dir or Path("runs") / (opts.config.stem if opts.config else "default")
    config_path = opts.config
    if config_path is None and opts.resume and (run_dir / "config.toml").is_file():
        config_path = run_dir / "config.toml"
    cfg = _config_from(config_path, rest, "sdfm train")
    run_training(cfg, run_dir, resume=opts.resume, overwrite=opts.overwrite)


FIT_HELP = """\
usage: sdfm fit-potential [--config FILE] [--data NAME] --out FILE [--section.field VALUE ...]

Fit the dual potential g of semidiscrete OT between the source and the dataset of a config (its
[data] and [potential] sections; `--data NAME` is short for --data.name NAME) until
potential.target_chi2, potential.max_steps or potential.max_seconds, and save it as safetensors with
its chi^2, epsilon and the dataset fingerprint. Train with it: --coupling.kind semidiscrete
--potential.source file --potential.path FILE.
"""


def cmd_fit_potential(argv: list[str]) -> None:
    from sdfm import config as config_mod
    from sdfm.data import load_dataset
    from sdfm.monitor import info
    from sdfm.semidiscrete import fit_potential, save_potential
    from sdfm.semidiscrete.worker import fitter_kwargs

    parser = argparse.ArgumentParser(prog="sdfm fit-potential", add_help=False)
    parser.add_argument("--config", type=Path)
    parser.add_argument("--data")
    parser.add_argument("--out", type=Path)
    opts, rest = parser.parse_known_args(argv)
    if any(a in ("-h", "--help") for a in rest):
        print(FIT_HELP)
        _tyro_cli(
            config_mod.Config, config_mod.Config(), ["--help"], "sdfm fit-potential", "config overrides"
        )
        return
    if opts.out is None or opts.out.suffix != ".safetensors":
        raise UserError("--out FILE.safetensors is required: where to save the potential")
    cfg = _config_from(
        opts.config, (["--data.name", opts.data] if opts.data else []) + rest, "sdfm fit-potential"
    )
    data = load_dataset(cfg.data)
    p = cfg.potential
    info(
        f"fitting the potential of {data.name}: N={len(data)}, d={data.x[0].numel()}, eps={p.epsilon}, {p.method}"
    )
    res = fit_potential(
        data.x.flatten(1),
        **fitter_kwargs(cfg, data),
        max_steps=p.max_steps,
        target_chi2=p.target_chi2,
        max_seconds=p.max_seconds or None,
        log=info,
    )
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    save_potential(
        opts.out,
        res.g,
        version=1,
        step=res.steps,
        epsilon=p.epsilon,
        chi2=res.chi2,
        fingerprint=data.fingerprint,
        pca_dim=p.pca_dim,
    )
    info(
        f"saved {opts.out}: {res.steps} steps, {res.seconds:.1f} s, chi2 {res.chi2:.4g} ({'converged' if res.converged else 'budget reached'})"
    )


@dataclass(kw_only=True)
class WorkerArgs:
    """Run the dual-potential worker of a run folder."""

    run_dir: Path
    """Run folder (its config.toml gives the data and the [potential] settings)."""
    config: Path | None = None
    """Use this config instead of RUN/config.toml (its data must match the run's)."""
    max_steps: int = 0
    """Stop after this many SGD steps in this process (0: run until SIGTERM/SIGINT)."""


def cmd_worker(argv: list[str]) -> None:
    from sdfm.semidiscrete.worker import run_worker

    args = _tyro_cli(WorkerArgs, None, argv, "sdfm worker", "Run the dual-potential worker of a run.")
    run_worker(args.run_dir, config_path=args.config, max_steps=args.max_steps)


@dataclass(kw_only=True)
class SampleArgs:
    """Draw samples from a trained run."""

    run_dir: Path
    """Run folder to sample from (its newest complete checkpoint is used)."""
    out: Path
    """Output file: .npy (the raw samples) or .png (a scatter plot or an image grid)."""
    num: int = 1000
    """Number of samples."""
    nfe: int = 8
    """Function evaluations for the fixed-step solvers (ignored by dopri5)."""
    solver: Literal["euler", "midpoint", "heun", "rk4", "dopri5"] = "euler"
    """ODE solver."""
    seed: int = 0
    """Seed of the noise (and of the labels of a conditional model)."""
    label: int = -1
    """Class to generate for a conditional model (-1: classes drawn uniformly)."""
    ema: bool = True
    """Use the EMA weights."""
    exact: bool = False
    """Sample the exact flow of a semidiscrete run's coupling (its potential) instead of the model."""


def cmd_sample(argv: list[str]) -> None:
    from sdfm.evaluate import sample_to_file

    args = _tyro_cli(SampleArgs, None, argv, "sdfm sample", "Draw samples from a trained run.")
    sample_to_file(args)


@dataclass(kw_only=True)
class EvalArgs:
    """Evaluate a trained run."""

    run_dir: Path
    """Run folder to evaluate (its newest complete checkpoint is used)."""
    num_samples: int = 0
    """Samples per solver setting (0: the run's eval.num_samples)."""
    nfe: list[int] | None = None
    """Euler budgets to evaluate (default: the run's eval.nfe)."""
    dopri5: bool = True
    """Also evaluate dopri5."""


def cmd_eval(argv: list[str]) -> None:
    from sdfm.evaluate import evaluate_run

    args = _tyro_cli(EvalArgs, None, argv, "sdfm eval", "Evaluate a trained run and write RUN/eval/.")
    evaluate_run(args.run_dir, num_samples=args.num_samples, nfe=args.nfe, dopri5=args.dopri5)


def cmd_bench(argv: list[str]) -> None:
    workloads = {
        "sinkhorn": "sdfm.bench.sinkhorn",
        "quality": "sdfm.bench.quality",
        "potential": "sdfm.bench.potential",
        "match": "sdfm.bench.match",
        "suite": "sdfm.bench.suite",
    }
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: sdfm bench WORKLOAD [options]\n\nworkloads:\n" + "\n".join(f"  {k}" for k in workloads))
        return
    if argv[0] not in workloads:
        raise UserError(f"unknown benchmark '{argv[0]}'; choose one of: {', '.join(workloads)}")
    import importlib

    sys.exit(importlib.import_module(workloads[argv[0]]).main(argv[1:]))


@dataclass(kw_only=True)
class ClassifierArgs:
    """Train and cache the feature classifier used for Fréchet distances."""

    data: Literal["digits", "fashion-mnist"] = "digits"
    """Dataset whose classifier to train."""
    force: bool = False
    """Retrain even when a cached classifier exists."""


def cmd_train_classifier(argv: list[str]) -> None:
    from sdfm.evaluate import ensure_classifier

    args = _tyro_cli(
        ClassifierArgs, None, argv, "sdfm train-classifier", "Train the feature classifier for FD."
    )
    ensure_classifier(args.data, force=args.force)


HANDLERS = {
    "train": cmd_train,
    "sample": cmd_sample,
    "eval": cmd_eval,
    "bench": cmd_bench,
    "train-classifier": cmd_train_classifier,
    "fit-potential": cmd_fit_potential,
    "worker": cmd_worker,
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: sdfm COMMAND [options]   (sdfm COMMAND --help for details)\n\ncommands:")
        for name, text in COMMANDS.items():
            print(f"  {name:<17} {text}")
        sys.exit(0 if argv else 2)
    cmd, rest = argv[0], argv[1:]
    if cmd not in HANDLERS:
        print(f"error: unknown command '{cmd}'; choose one of: {', '.join(HANDLERS)}", file=sys.stderr)
        sys.exit(2)
    try:
        HANDLERS[cmd](rest)
    except UserError as e:
        rank = os.environ.get("RANK", "0")
        if rank == "0" or not isinstance(e, AgreedError):  # an agreed error is printed once, by rank 0
            print(f"error: {e}" if rank == "0" else f"error (rank {rank}): {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
