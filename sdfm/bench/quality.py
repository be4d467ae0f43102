"""``sdfm bench quality``: the same model, steps and seeds trained with each coupling and method, then
sample quality against held-out data at each Euler budget (and dopri5): W2 for the 2-D tasks, the
classifier Fréchet distance (FD) for images, plus the normalized path energy (NPE).

Cells are task × coupling × method × path. ``--methods fm meanflow`` adds mean-flow rows (their
"Euler NFE k" columns are the k-step mean-flow maps); ``--paths linear learned`` adds learned-path
rows with the straightness objective of the schedule before and after its fit; ``--finetune-steps K``
adds, for every flow-matching cell, the OAT-FM fine-tune of its model for K steps beside the honest
control: the same model trained K more steps by its own method (a resumed copy of the run).

Usage:
  sdfm bench quality                                   # 2-D: 8gaussians, moons, moons->8gaussians
  sdfm bench quality --tasks digits digits-cond --couplings independent exact semidiscrete --dopri5
  sdfm bench quality --methods fm meanflow --couplings independent exact semidiscrete --dopri5
  sdfm bench quality --couplings independent exact --finetune-steps 1000 --dopri5
  sdfm bench quality --couplings independent exact --paths linear learned
  sdfm bench quality --tasks fashion-mnist-unet --cells independent:fm exact:fm semidiscrete:fm \
      semidiscrete:meanflow --steps 1200 --batch-size 64 --dopri5     # the image proof (hours on a CPU)
"""

from __future__ import annotations

import copy
import json
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import torch

from sdfm.config import Config, validate
from sdfm.evaluate import LoadedRun, evaluate
from sdfm.monitor import info
from sdfm.rundir import prepare_run_dir
from sdfm.trainer import Trainer

# name -> (data.name, data.source, conditional)
TASKS = {
    "8gaussians": ("8gaussians", "normal", False),
    "moons": ("moons", "normal", False),
    "moons-8gaussians": ("8gaussians", "moons", False),
    "digits": ("digits", "normal", False),
    "digits-cond": ("digits", "normal", True),
    "fashion-mnist": ("fashion-mnist", "normal", False),
    "fashion-mnist-cond": ("fashion-mnist", "normal", True),
    "fashion-mnist-unet": ("fashion-mnist", "normal", False),
}

CPU_UNET = {"kind": "unet", "channels": 24, "channel_mult": [1, 2, 2], "num_res_blocks": 1}
"""The U-Net of the ``fashion-mnist-unet`` task and of launch/configs/fashion-mnist-unet-cpu.toml:
0.60 M parameters, 0.67 s per training step of 64 images on one CPU thread (channels 32 with two
levels: 0.65 M and 1.1 s; three levels halve the work at 28x28 and 14x14)."""


def task_config(
    task: str,
    coupling: str,
    steps: int,
    seed: int,
    batch_size: int,
    potential_seconds: float = 300.0,
    method: str = "fm",
    path: str = "linear",
) -> Config:
    """The shared config of one (task, coupling, method, path) cell: only those keys (and the model's
    horizon input, which a mean flow needs) differ within a task."""
    cfg = Config()
    cfg.data.name, cfg.data.source, cfg.data.conditional = TASKS[task]
    cfg.coupling.kind = coupling
    cfg.method.kind, cfg.method.path = method, path
    cfg.model.horizon_input = method == "meanflow"
    cfg.train.steps, cfg.train.seed, cfg.train.batch_size = steps, seed, batch_size
    cfg.train.log_every, cfg.train.ckpt_every = max(1, steps // 4), steps
    cfg.train.eval_at_end = False
    cfg.potential.source = "fit"
    cfg.potential.max_seconds = potential_seconds
    if cfg.data.name == "digits":  # 64-d vectors: an MLP trains in minutes on a CPU
        cfg.model.kind, cfg.model.hidden = "mlp", 256
        cfg.eval.num_samples = 1000
    elif task == "fashion-mnist-unet":
        # The image proof: the full 60,000 training images, a U-Net sized for a CPU, FD against the
        # held-out 10,000. The potential is fitted in 64 principal components, where it reaches a far
        # lower chi2 within minutes than at d = 784 (docs/results.md).
        for key, value in CPU_UNET.items():
            setattr(cfg.model, key, value)
        cfg.potential.pca_dim = 64
        cfg.eval.num_samples = 1000
        cfg.eval.rtol = cfg.eval.atol = 1e-3  # dopri5 at 1e-4 costs ~10 minutes a cell on one thread
    elif cfg.data.name == "fashion-mnist":
        # CPU-sized: a 784-d MLP (a U-Net step costs ~1 s on 2 cores) on a 10,000-image subset, on
        # which the semidiscrete potential reaches chi2 ~ 0.05 in about a minute (the full 60,000
        # stay near chi2 ~ 0.7 after 5 minutes). FD is measured against the held-out test set.
        cfg.model.kind, cfg.model.hidden, cfg.model.depth = "mlp", 512, 3
        cfg.data.max_points = 10000
        cfg.eval.num_samples = 1000
    return validate(cfg)


TaskName = Literal[
    "8gaussians",
    "moons",
    "moons-8gaussians",
    "digits",
    "digits-cond",
    "fashion-mnist",
    "fashion-mnist-cond",
    "fashion-mnist-unet",
]
Coupling = Literal["independent", "exact", "sinkhorn", "semidiscrete"]
Method = Literal["fm", "meanflow"]


@dataclass(kw_only=True)
class QualityBench:
    """The same model, steps and seeds trained with each coupling, then sample quality at each Euler
    budget (and dopri5): W2 for 2-D tasks, classifier FD for images, and the path energy (NPE)."""

    steps: int = 3000
    """Training steps of every cell."""
    batch_size: int = 256
    """Global batch of every cell."""
    seed: int = 0
    """Seed of every cell."""
    tasks: list[TaskName] = field(default_factory=lambda: ["8gaussians", "moons", "moons-8gaussians"])
    """Tasks (rows of the table)."""
    couplings: list[Coupling] = field(default_factory=lambda: ["independent", "exact", "sinkhorn"])
    """Couplings trained on every task."""
    methods: list[Method] = field(default_factory=lambda: ["fm"])
    """Training objectives of every (task, coupling): flow matching, mean flow."""
    cells: list[str] = field(default_factory=list)
    """Instead of every coupling x method: only these 'coupling:method' pairs, in this order (e.g.
    independent:fm exact:fm semidiscrete:fm semidiscrete:meanflow, the image proof's four rows)."""
    paths: list[Literal["linear", "learned"]] = field(default_factory=lambda: ["linear"])
    """Interpolation paths of the flow-matching cells: linear, learned (its schedule fitted first)."""
    finetune_steps: int = 0
    """> 0: for every linear flow-matching cell, also OAT-FM fine-tune its model for this many steps,
    beside the same model trained this many more steps by flow matching (the control)."""
    nfe: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    """Euler budgets evaluated."""
    dopri5: bool = False
    """Also evaluate dopri5."""
    potential_seconds: float = 300.0
    """Time budget of each semidiscrete potential fit."""
    out: Path = Path("runs/bench-quality")
    """Where the runs of the cells go."""
    json: Path | None = None
    """Write all rows to this JSON file."""

    def run(self) -> int:
        """Train and evaluate every cell, print the table, optionally write JSON."""
        return _main(self)


def _pairs(a: QualityBench) -> list[tuple[str, str]]:
    """(coupling, method) of the cells: ``cells`` when given (checked), else couplings x methods."""
    if not a.cells:
        return [(c, m) for c in a.couplings for m in a.methods]
    couplings, methods = get_args(Coupling), get_args(Method)
    pairs = []
    for cell in a.cells:
        coupling, _, method = cell.partition(":")
        if coupling not in couplings or method not in methods:
            from sdfm.errors import UserError

            raise UserError(
                f"--cells {cell!r} is not coupling:method; use a coupling of {', '.join(couplings)} and a "
                f"method of {', '.join(methods)}, e.g. semidiscrete:meanflow"
            )
        pairs.append((coupling, method))
    return pairs


def _cells(a: QualityBench):
    """(task, coupling, method, path) of every trained-from-scratch cell, in table order."""
    pairs = _pairs(a)
    for task in a.tasks:
        for coupling, method in pairs:
            for path in a.paths if method == "fm" else ["linear"]:
                yield task, coupling, method, path


def _train_cell(cfg: Config, run_dir: Path, *, init_from: Path | None = None, resume: bool = False):
    """Train one cell in ``run_dir`` (a fresh run, an OAT fine-tune from ``init_from``, or a resumed
    run trained on to ``cfg.train.steps``); returns (trainer, seconds)."""
    prepare_run_dir(run_dir, cfg, resume=resume, overwrite=not resume)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, run_dir, init_from=init_from)
    if resume:
        trainer.resume()
    if cfg.method.kind != "oat":
        trainer.start_potential(resumed=resume)
    trainer.train()
    return trainer, time.perf_counter() - t0


def _main(a: QualityBench) -> int:
    if a.finetune_steps < 0:
        from sdfm.errors import UserError

        raise UserError(f"--finetune-steps must be >= 0, got {a.finetune_steps}")
    rows = []
    for task, coupling, method, path in _cells(a):
        cfg = task_config(task, coupling, a.steps, a.seed, a.batch_size, a.potential_seconds, method, path)
        run_dir = a.out / "-".join(
            [task, coupling] + ([method] if method != "fm" else []) + ([path] if path != "linear" else [])
        )
        trainer, train_s = _train_cell(cfg, run_dir)
        rows.append(
            _evaluate_cell(
                a,
                trainer,
                cfg,
                run_dir,
                train_s,
                task,
                coupling,
                method if path == "linear" else "fm, learned path",
            )
        )
        if a.finetune_steps and method == "fm" and path == "linear":
            cont = validate(_with_steps(cfg, a.steps + a.finetune_steps))
            cont_dir = run_dir.with_name(run_dir.name + "-continued")
            shutil.rmtree(cont_dir, ignore_errors=True)
            shutil.copytree(run_dir, cont_dir)
            trainer, secs = _train_cell(cont, cont_dir, resume=True)
            rows.append(
                _evaluate_cell(
                    a, trainer, cont, cont_dir, secs, task, coupling, f"fm +{a.finetune_steps} (control)"
                )
            )
            oat = _with_steps(cfg, a.finetune_steps)
            oat.method.kind, oat.method.path = "oat", "hermite"
            oat.method.oat_target_every = min(oat.method.oat_target_every, max(1, a.finetune_steps // 4))
            oat = validate(oat)
            oat_dir = run_dir.with_name(run_dir.name + "-oat")
            oat.method.init_from = str(run_dir)
            trainer, secs = _train_cell(oat, oat_dir, init_from=run_dir)
            rows.append(
                _evaluate_cell(a, trainer, oat, oat_dir, secs, task, coupling, f"oat +{a.finetune_steps}")
            )
    _print_table(a, rows)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    return 0


def _with_steps(cfg: Config, steps: int) -> Config:
    out = copy.deepcopy(cfg)
    out.train.steps = steps
    out.train.log_every, out.train.ckpt_every = max(1, steps // 4), steps
    return out


def _evaluate_cell(
    a: QualityBench,
    trainer: Trainer,
    cfg: Config,
    run_dir: Path,
    train_s: float,
    task: str,
    coupling: str,
    method: str,
) -> dict:
    """One table row: the metric at each budget, NPE, and what the cell's method reports."""
    nfe = a.nfe
    run = LoadedRun(
        cfg=cfg,
        data=trainer.data,
        model=trainer.ema.module.eval(),
        step=trainer.step,
        run_dir=run_dir,
        potential=trainer.potential,
    )
    res = evaluate(run, num_samples=cfg.eval.num_samples, nfe=nfe, dopri5=a.dopri5, log=info)
    metric = "fd" if run.data.is_image else "w2"
    row = {
        "task": task,
        "coupling": coupling,
        "method": method,
        "metric": metric,
        "train_s": round(train_s, 1),
        "npe": res["flow"]["npe"],
    }
    for r in res["rows"]:
        key = (
            "dopri5"
            if r["solver"] == "dopri5"
            else ("exact" if r["solver"] == "exact-sd-flow" else f"nfe{r['nfe']}")
        )
        row[key] = r.get(metric)
        if r["solver"] == "dopri5":
            row["dopri5_nfe"] = r["nfe"]
    chi2 = getattr(trainer.coupling, "chi2", None)
    if coupling == "semidiscrete" and chi2 is not None:  # how well the semidiscrete potential was fitted
        row["potential_chi2"] = chi2
    if "exact_velocity_gap" in res["flow"]:
        row["velocity_gap"] = res["flow"]["exact_velocity_gap"]
    schedule = run_dir / "schedule.safetensors"
    if cfg.method.path == "learned" and schedule.is_file():
        from safetensors import safe_open

        with safe_open(str(schedule), "pt") as f:
            meta = f.metadata() or {}
        row["straightness_linear"] = float(meta["straightness_before"])
        row["straightness_learned"] = float(meta["straightness_after"])
    print(json.dumps(row), flush=True)
    return row


def _print_table(a: QualityBench, rows: list[dict]) -> None:
    nfe = a.nfe
    cols = [f"nfe{k}" for k in nfe] + (["dopri5"] if a.dopri5 else [])
    header = (
        ["task", "coupling", "method", "metric"]
        + [f"@{c[3:]}" if c.startswith("nfe") else c for c in cols]
        + ["NPE", "potential chi2", "straightness linear -> learned", "train s"]
    )
    print(
        f"\n{a.steps} steps, batch {a.batch_size}, seed {a.seed}; {platform.machine()}, torch {torch.__version__}\n"
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        vals = [f"{r[c]:.3f}" if isinstance(r.get(c), float) else "-" for c in cols]
        if a.dopri5 and "dopri5_nfe" in r:
            vals[-1] += f" ({r['dopri5_nfe']} NFE)"
        print(
            "| "
            + " | ".join(
                [
                    r["task"],
                    r["coupling"],
                    r["method"],
                    r["metric"],
                    *vals,
                    f"{r['npe']:.3f}",
                    f"{r['potential_chi2']:.3g}" if "potential_chi2" in r else "-",
                    f"{r['straightness_linear']:.3g} -> {r['straightness_learned']:.3g}"
                    if "straightness_learned" in r
                    else "-",
                    f"{r['train_s']:.0f}",
                ]
            )
            + " |"
        )
