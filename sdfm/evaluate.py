"""Sampling and evaluation of a trained run (``sdfm sample``, ``sdfm eval`` and the end of training).

Quality is measured against held-out data: exact W2 and MMD for vector data, a Fréchet distance in the
features of a classifier trained by sdfm for digits / Fashion-MNIST (no Inception weights here), at
each Euler budget of ``eval.nfe`` and with dopri5; plus the flow's normalized path energy and
straightness from one fine simulation.
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sdfm import config as config_mod
from sdfm.checkpoint import CheckpointManager, check_writable, write_atomic
from sdfm.config import Config
from sdfm.data import Dataset, load_dataset
from sdfm.errors import UserError
from sdfm.memory import require_memory
from sdfm.models import build_model
from sdfm.monitor import info
from sdfm.solvers import SampleResult, Velocity, sample

CLASSIFIER_DATASETS = ("digits", "fashion-mnist")


@dataclass
class LoadedRun:
    """A trained model ready to sample: its config, data, EMA (or raw) network and step."""

    cfg: Config
    data: Dataset
    model: nn.Module
    step: int
    run_dir: Path
    potential: Tensor | None = None
    """(N,) dual potential of a semidiscrete run (for its exact velocity), else None."""


def load_run(run_dir: Path, ema: bool = True) -> LoadedRun:
    """Load the config, data and newest complete checkpoint of a run folder."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise UserError(
            f"--run-dir {run_dir} holds no sdfm run (no config.toml); point it at a folder made by `sdfm train`"
        )
    cfg = config_mod.load_config(run_dir / "config.toml")
    data = load_dataset(cfg.data)
    model = build_model(cfg.model, data.shape, data.num_classes if cfg.data.conditional else 0)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    def fits(ckpt) -> None:  # a checkpoint of other shapes is skipped like a damaged one, as by --resume
        if ckpt.shapes("ema" if ema else "model") != ours:
            raise ValueError(f"{'ema' if ema else 'model'}.safetensors does not hold this model's parameters")

    ckpt = CheckpointManager(run_dir, cfg.train.keep_last, warn=info).load_latest(accept=fits)
    if ckpt is None:
        raise UserError(
            f"run {run_dir} has no checkpoint yet; train it first (sdfm train --run-dir {run_dir} --resume)"
        )
    model.load_state_dict(ckpt.tensors("ema" if ema else "model"))
    model.eval()
    potential = ckpt.tensors("coupling").get("g") if cfg.coupling.kind == "semidiscrete" else None
    return LoadedRun(cfg=cfg, data=data, model=model, step=ckpt.step, run_dir=run_dir, potential=potential)


def exact_velocity_of(run: LoadedRun):
    """The exact SD-OT velocity of a semidiscrete run (epsilon = 0, no PCA), else None."""
    cfg = run.cfg
    if run.potential is None or cfg.potential.epsilon != 0 or cfg.potential.pca_dim:
        return None
    from sdfm.semidiscrete.velocity import ExactVelocity

    return ExactVelocity(run.data.x.dense(), run.potential, run.data.labels if cfg.data.conditional else None)


def velocity_of(model: nn.Module, labels: Tensor | None) -> Velocity:
    """The model as a solver velocity, with fixed class labels for a conditional model."""

    def v(t: Tensor, x: Tensor) -> Tensor:
        return model(t, x, labels)

    return v


@torch.no_grad()
def generate(
    model: nn.Module,
    x0: Tensor,
    labels: Tensor | None,
    method: str,
    nfe: int,
    *,
    rtol=1e-4,
    atol=1e-4,
    trajectory=False,
) -> SampleResult:
    """Integrate the model from noise x0 (B, *shape) to t = 1; ``method = 'meanflow'``: the k-step map
    of a mean-flow model (k = ``nfe``)."""
    if method == "meanflow":
        from sdfm.methods.meanflow import as_meanflow, meanflow_sample

        x, traj = meanflow_sample(as_meanflow(model, labels), x0, nfe, return_trajectory=trajectory)
        grid = torch.linspace(0.0, 1.0, nfe + 1) if trajectory else None
        return SampleResult(x=x, nfe=nfe, trajectory=traj, times=grid)
    return sample(
        velocity_of(model, labels),
        x0,
        method=method,
        nfe=nfe,
        rtol=rtol,
        atol=atol,
        return_trajectory=trajectory,
    )


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def sample_model(
    model: nn.Module, x0: Tensor, *, nfe: int = 8, solver: str = "euler", labels: Tensor | None = None
) -> Tensor:
    """Samples of a trained velocity model: integrate it from x0 (B, *shape) to t = 1 with ``solver``
    (euler, midpoint, heun, rk4 at ``nfe`` evaluations; dopri5; 'meanflow': the nfe-step map of a
    mean-flow model), conditioned on ``labels`` (B,) for a conditional model.

    Example:
        >>> run = sdfm.load_run("runs/moons")
        >>> x = sdfm.sample(run.model, torch.randn(1000, *run.data.shape), nfe=4, solver="rk4")
    """
    model.eval()
    return generate(model, x0, labels, solver, nfe).x


def eval_noise(cfg: Config, data: Dataset, n: int) -> tuple[Tensor, Tensor | None]:
    """The fixed evaluation noise (n, *shape) and, for a conditional model, labels following the
    held-out class frequencies."""
    gen = torch.Generator().manual_seed(cfg.eval.seed)
    x0 = data.source.draw(n, data.shape, gen)
    labels = None
    if cfg.data.conditional:
        pick = torch.randint(0, len(data.labels_eval), (n,), generator=gen)
        labels = data.labels_eval[pick]
    return x0, labels


def ensure_classifier(name: str, force: bool = False):
    """The cached feature classifier of dataset ``name``, trained (and cached) when missing."""
    from sdfm.metrics.classifier import classifier_path, get_classifier

    if name not in CLASSIFIER_DATASETS:
        raise UserError(
            f"no feature classifier for data '{name}'; choose one of {', '.join(CLASSIFIER_DATASETS)}"
        )
    data = load_dataset(config_mod.DataConfig(name=name))  # the full dataset, whatever a run's subset
    path = classifier_path(name, data.fingerprint)
    if force and path.exists():
        path.unlink()
    model = get_classifier(
        name, data.fingerprint, data.x.dense(), data.labels, data.x_eval.dense(), data.labels_eval, log=info
    )
    info(f"feature classifier for {name}: {path}")
    return model


def _quality(samples: Tensor, run: LoadedRun, classifier) -> dict[str, float]:
    from sdfm.metrics import classifier_frechet, mmd, wasserstein2

    ref = run.data.x_eval.dense()
    if run.data.is_image:
        return {"fd": classifier_frechet(classifier, samples, ref)} if classifier is not None else {}
    return {"w2": wasserstein2(samples, ref), "mmd": mmd(samples, ref)}


def evaluate(run: LoadedRun, *, num_samples: int, nfe: list[int], dopri5: bool, log=info) -> dict[str, Any]:
    """Quality at each Euler budget and with dopri5, plus path energy / NPE / straightness.

    Returns:
        {"step", "num_samples", "rows": [{"solver", "nfe", metric...}], "flow": {...}, "picture": ...}
    """
    if len(run.data.x_eval) == 0:
        raise UserError(
            f"{run.run_dir} was trained with data.num_eval = 0: it has no held-out data to evaluate against; "
            "sample it with `sdfm sample`, or train with data.num_eval >= 2"
        )
    from sdfm.metrics import flow_stats, normalized_path_energy, wasserstein2
    from sdfm.semidiscrete.velocity import velocity_gap

    cfg, data = run.cfg, run.data
    classifier = (
        ensure_classifier(cfg.data.name) if data.is_image and cfg.data.name in CLASSIFIER_DATASETS else None
    )
    x0, labels = eval_noise(cfg, data, num_samples)
    rows = []
    # A mean-flow model's budgets are its k-step maps; dopri5 integrates its instantaneous velocity
    # u(x, t, t) = v(t, x) (the horizon input at 0), as do the path-energy statistics below.
    fixed = "meanflow" if cfg.method.kind == "meanflow" else "euler"
    settings = [(fixed, k) for k in nfe] + ([("dopri5", 0)] if dopri5 else [])
    final = None
    for method, k in settings:
        t0 = time.perf_counter()
        res = generate(run.model, x0, labels, method, k, rtol=cfg.eval.rtol, atol=cfg.eval.atol)
        row = {
            "solver": method,
            "nfe": res.nfe,
            **_quality(res.x, run, classifier),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        rows.append(row)
        log(
            "eval  "
            + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
        )
        final = res.x
    exact = exact_velocity_of(run)
    gap = None
    if exact is not None:
        # The coupling's own flow (one Euler step lands exactly on the matched data points) and the
        # gap between the model and that teacher field along its straight paths.
        xe = exact.y[exact.target(0.0, x0, labels)].view(x0.shape)
        rows.append({"solver": "exact-sd-flow", "nfe": 1, **_quality(xe, run, classifier), "seconds": 0.0})
        n_gap = min(num_samples, 500)
        gap = velocity_gap(
            velocity_of(run.model, None if labels is None else labels[:n_gap]),
            exact,
            x0[:n_gap],
            None if labels is None else labels[:n_gap],
            times=[0.0, 0.25, 0.5, 0.75, 0.9],
        )
        log(
            f"eval  exact-velocity gap {gap['mean']:.4g} (per t: "
            + ", ".join(f"{k}: {v:.3g}" for k, v in gap.items() if k != "mean")
            + ")"
        )
    # Path energy over a fine Euler grid; NPE compares it with W2^2(source, data) of the same samples.
    n_flow = min(num_samples, 500 if data.is_image else num_samples)
    steps = 20 if data.is_image else 100
    stats = flow_stats(
        velocity_of(run.model, None if labels is None else labels[:n_flow]), x0[:n_flow], nfe=steps
    )
    w2_sq = wasserstein2(x0[:n_flow], data.x_eval[: max(n_flow, 2)]) ** 2
    flow = {
        "path_energy": stats.path_energy,
        "w2_source_data_sq": w2_sq,
        "npe": normalized_path_energy(stats.path_energy, w2_sq),
        "straightness": stats.straightness,
        "euler_steps": steps,
        "num_samples": n_flow,
    }
    log("eval  " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in flow.items()))
    if gap is not None:
        flow["exact_velocity_gap"] = gap["mean"]
    return {
        "step": run.step,
        "num_samples": num_samples,
        "rows": rows,
        "flow": flow,
        "samples": final,
        "velocity_gap": gap,
    }


def _picture(run: LoadedRun, samples: Tensor, x0: Tensor, labels: Tensor | None) -> np.ndarray:
    from sdfm.plots import image_grid, scatter_2d

    if run.data.is_image:
        return image_grid(samples[:64])
    if run.data.shape == (2,):
        traj = generate(
            run.model, x0[:300], None if labels is None else labels[:300], "euler", 32, trajectory=True
        )
        return scatter_2d(
            samples, run.data.x_eval.dense(), traj.trajectory, title=f"{run.cfg.data.name}, step {run.step}"
        )
    return scatter_2d(samples[:, :2], run.data.x_eval.dense()[:, :2], title="first two coordinates")


def write_summary(result: dict[str, Any], path: Path, title: str) -> None:
    rows = result["rows"]
    keys = [k for k in rows[0] if k not in ("solver", "nfe", "seconds")] if rows else []
    lines = [
        f"# {title}",
        "",
        "| solver | NFE | " + " | ".join(keys) + " |",
        "|---|---|" + "---|" * len(keys),
    ]
    for r in rows:
        lines.append(f"| {r['solver']} | {r['nfe']} | " + " | ".join(f"{r[k]:.4g}" for k in keys) + " |")
    f = result["flow"]
    lines += [
        "",
        f"Flow (Euler {f['euler_steps']} steps, {f['num_samples']} samples): path energy {f['path_energy']:.4g}, "
        f"W2^2(source, data) {f['w2_source_data_sq']:.4g}, NPE {f['npe']:.4g}, straightness {f['straightness']:.4g}",
        "",
    ]
    if "exact_velocity_gap" in f:
        lines += [f"Mean squared gap to the exact semidiscrete velocity: {f['exact_velocity_gap']:.4g}", ""]
    write_atomic(path, "\n".join(lines).encode())


def evaluate_run(
    run_dir: Path,
    *,
    num_samples: int = 0,
    nfe: list[int] | None = None,
    dopri5: bool | None = None,
    monitor=None,
    trainer=None,
) -> dict[str, Any]:
    """Evaluate the newest checkpoint of a run; write RUN/eval/{eval.json, summary.md, samples.png}."""
    run_dir = Path(run_dir)
    if num_samples < 0 or num_samples == 1:
        raise UserError(f"--num-samples {num_samples} must be >= 2 (or 0: the run's eval.num_samples)")
    if nfe is not None and (not nfe or any(k < 1 for k in nfe)):
        raise UserError(f"--nfe {' '.join(map(str, nfe))} must be positive step counts (e.g. --nfe 1 2 4 8)")
    if trainer is not None:
        run = LoadedRun(
            cfg=trainer.cfg,
            data=trainer.data,
            model=trainer.ema.module.cpu().eval(),
            step=trainer.step,
            run_dir=run_dir,
            potential=trainer.potential,
        )
    else:
        check_writable(run_dir / "eval" / "eval.json", "--run-dir")  # before the work: eval writes RUN/eval/
        run = load_run(run_dir)
    cfg = run.cfg
    n = num_samples or cfg.eval.num_samples
    result = evaluate(
        run,
        num_samples=n,
        nfe=nfe or cfg.eval.nfe,
        dopri5=cfg.eval.dopri5 if dopri5 is None else dopri5,
        log=monitor.print if monitor is not None else info,
    )
    out = run_dir / "eval"
    samples = result.pop("samples")
    x0, labels = eval_noise(cfg, run.data, n)
    picture = _picture(run, samples, x0, labels)
    from sdfm.plots import png_bytes

    write_atomic(out / "samples.png", png_bytes(picture))
    write_atomic(out / "eval.json", json.dumps(result, indent=1).encode())
    write_summary(
        result, out / "summary.md", f"{cfg.data.name}, {cfg.coupling.kind} coupling, step {run.step}"
    )
    if monitor is not None:
        monitor.image("samples", picture, run.step)
        for r in result["rows"]:
            monitor.log(
                run.step,
                {f"eval/{r['solver']}_nfe{r['nfe']}/{k}": v for k, v in r.items() if isinstance(v, float)},
            )
        monitor.log(run.step, {f"eval/flow/{k}": v for k, v in result["flow"].items()})
    say = monitor.print if monitor is not None else info
    say(
        "\n".join(
            [
                f"run folder      {run_dir}",
                f"checkpoints     {run_dir / 'checkpoints'}",
                f"config          {run_dir / 'config.toml'}",
                f"metrics         {run_dir / 'metrics.jsonl'}",
                f"tensorboard     {run_dir / 'tensorboard'}   (tensorboard --logdir {run_dir / 'tensorboard'})",
                f"samples picture {out / 'samples.png'}",
                f"eval summary    {out / 'summary.md'}  and  {out / 'eval.json'}",
            ]
        )
    )
    return result


def sample_to_file(args) -> Path:
    """``sdfm sample``: draw ``args.num`` samples and write them to a .npy or .png file."""
    out = Path(args.out)
    if out.suffix not in (".npy", ".png"):
        raise UserError(f"--out {out} must end in .npy (raw samples) or .png (a picture)")
    check_writable(out, "--out")
    if args.num < 1:
        raise UserError(f"--num {args.num} must be >= 1")
    run = load_run(args.run_dir, ema=args.ema)
    # noise, state and the solver's evaluations: a few float32 copies of the samples
    require_memory(4.0 * 4 * args.num * math.prod(run.data.shape), f"--num {args.num}", "sample fewer at a time")
    gen = torch.Generator().manual_seed(args.seed)
    x0 = run.data.source.draw(args.num, run.data.shape, gen)
    labels = None
    if not run.cfg.data.conditional and args.label != -1:
        raise UserError(
            f"--label {args.label} needs a class-conditional run; {args.run_dir} is unconditional: drop --label"
        )
    if args.nfe < 1:
        raise UserError(f"--nfe {args.nfe} must be >= 1")
    if run.cfg.data.conditional:
        if args.label >= run.data.num_classes or args.label < -1:
            raise UserError(
                f"--label {args.label} is out of range; the model has classes 0..{run.data.num_classes - 1}"
            )
        labels = (
            torch.full((args.num,), args.label, dtype=torch.long)
            if args.label >= 0
            else torch.randint(0, run.data.num_classes, (args.num,), generator=gen)
        )
    solver = args.solver
    meanflow = run.cfg.method.kind == "meanflow"
    if solver == "auto":
        solver = "meanflow" if meanflow else "euler"
    if meanflow and solver not in ("meanflow", "dopri5"):
        raise UserError(
            f"{args.run_dir} is a mean-flow run, which is sampled by its k-step map: use --solver meanflow "
            f"(or dopri5 on its instantaneous velocity), not --solver {solver}"
        )
    if solver == "meanflow" and not meanflow:
        raise UserError(
            f"--solver meanflow needs a mean-flow run (method.kind = 'meanflow'); {args.run_dir} trained "
            f"{run.cfg.method.kind!r}: use --solver euler, midpoint, heun, rk4 or dopri5"
        )
    field = run.model
    if args.exact:
        exact = exact_velocity_of(run)
        if exact is None:
            raise UserError("--exact needs a semidiscrete run with potential.epsilon = 0 and no PCA")
        field = lambda t, x, lab: exact(t, x, lab)  # noqa: E731  (the model's call signature)
    try:
        res = generate(field, x0, labels, solver, args.nfe)
    except ValueError as e:
        raise UserError(f"--nfe {args.nfe} does not fit --solver {solver}: {e}") from None
    # Written atomically: a full disk ends in one line and leaves no empty or torn file behind.
    if out.suffix == ".npy":
        write_atomic(out, _npy_bytes(res.x.numpy()))
        if labels is not None:
            write_atomic(out.with_name(out.stem + "_labels.npy"), _npy_bytes(labels.numpy()))
    else:
        from sdfm.plots import image_grid, png_bytes, scatter_2d

        pic = (
            image_grid(res.x[:256], nrow=16)
            if run.data.is_image
            else scatter_2d(res.x[:, :2], run.data.x_eval.dense()[:, :2])
        )
        write_atomic(out, png_bytes(pic))
    info(f"wrote {args.num} samples ({solver}, {res.nfe} NFE, step {run.step}) to {out}")
    return out
