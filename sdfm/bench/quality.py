"""``sdfm bench quality``: the same model, steps and seeds trained with each coupling, then sample
quality against held-out data at each Euler budget (and dopri5): W2 for the 2-D tasks, the classifier
Fréchet distance (FD) for images, plus the normalized path energy (NPE).

Usage:
  sdfm bench quality                                   # 2-D: 8gaussians, moons, moons->8gaussians
  sdfm bench quality --tasks digits digits-cond --couplings independent exact semidiscrete --dopri5
  sdfm bench quality --tasks fashion-mnist fashion-mnist-cond --couplings independent exact semidiscrete --dopri5
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

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
}


def task_config(
    task: str, coupling: str, steps: int, seed: int, batch_size: int, potential_seconds: float = 300.0
) -> Config:
    """The shared config of one (task, coupling) cell: only coupling.kind differs within a task."""
    cfg = Config()
    cfg.data.name, cfg.data.source, cfg.data.conditional = TASKS[task]
    cfg.coupling.kind = coupling
    cfg.train.steps, cfg.train.seed, cfg.train.batch_size = steps, seed, batch_size
    cfg.train.log_every, cfg.train.ckpt_every = max(1, steps // 4), steps
    cfg.train.eval_at_end = False
    cfg.potential.source = "fit"
    cfg.potential.max_seconds = potential_seconds
    if cfg.data.name == "digits":  # 64-d vectors: an MLP trains in minutes on a CPU
        cfg.model.kind, cfg.model.hidden = "mlp", 256
        cfg.eval.num_samples = 1000
    elif cfg.data.name == "fashion-mnist":
        # CPU-sized: a 784-d MLP (a U-Net step costs ~1 s on 2 cores) on a 10,000-image subset, on
        # which the semidiscrete potential reaches chi2 ~ 0.05 in about a minute (the full 60,000
        # stay near chi2 ~ 0.7 after 5 minutes). FD is measured against the held-out test set.
        cfg.model.kind, cfg.model.hidden, cfg.model.depth = "mlp", 512, 3
        cfg.data.max_points = 10000
        cfg.eval.num_samples = 1000
    return validate(cfg)


TaskName = Literal[
    "8gaussians", "moons", "moons-8gaussians", "digits", "digits-cond", "fashion-mnist", "fashion-mnist-cond"
]


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
    couplings: list[Literal["independent", "exact", "sinkhorn", "semidiscrete"]] = field(
        default_factory=lambda: ["independent", "exact", "sinkhorn"]
    )
    """Couplings trained on every task."""
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


def _main(a: QualityBench) -> int:
    nfe = a.nfe
    rows = []
    for task in a.tasks:
        for coupling in a.couplings:
            cfg = task_config(task, coupling, a.steps, a.seed, a.batch_size, a.potential_seconds)
            run_dir = a.out / f"{task}-{coupling}"
            prepare_run_dir(run_dir, cfg, resume=False, overwrite=True)
            t0 = time.perf_counter()
            trainer = Trainer(cfg, run_dir)
            trainer.start_potential(resumed=False)
            trainer.train()
            train_s = time.perf_counter() - t0
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
            if coupling == "semidiscrete":  # how well the semidiscrete potential was fitted
                row["potential_chi2"] = trainer.coupling.chi2
            if "exact_velocity_gap" in res["flow"]:
                row["velocity_gap"] = res["flow"]["exact_velocity_gap"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    cols = [f"nfe{k}" for k in nfe] + (["dopri5"] if a.dopri5 else [])
    header = (
        ["task", "coupling", "metric"]
        + [f"@{c[3:]}" if c.startswith("nfe") else c for c in cols]
        + ["NPE", "potential chi2", "train s"]
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
                    r["metric"],
                    *vals,
                    f"{r['npe']:.3f}",
                    f"{r['potential_chi2']:.3g}" if "potential_chi2" in r else "-",
                    f"{r['train_s']:.0f}",
                ]
            )
            + " |"
        )
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    return 0
