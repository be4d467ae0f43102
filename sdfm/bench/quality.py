"""``sdfm bench quality``: the same model, steps and seeds trained with each coupling, then sample
quality against held-out data at each Euler budget (and dopri5): W2 for the 2-D tasks, the classifier
Fréchet distance (FD) for images, plus the normalized path energy (NPE).

Usage:
  sdfm bench quality                                   # 2-D: 8gaussians, moons, moons->8gaussians
  sdfm bench quality --tasks digits,digits-cond --couplings independent,exact,semidiscrete --dopri5
  sdfm bench quality --tasks fashion-mnist,fashion-mnist-cond --couplings independent,exact,semidiscrete --dopri5
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from sdfm.config import Config, validate
from sdfm.evaluate import LoadedRun, evaluate
from sdfm.monitor import info
from sdfm.train import Trainer, prepare_run_dir

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


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="sdfm bench quality", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", default="8gaussians,moons,moons-8gaussians")
    p.add_argument("--couplings", default="independent,exact,sinkhorn")
    p.add_argument("--nfe", default="1,2,4,8")
    p.add_argument("--dopri5", action="store_true", help="also evaluate dopri5")
    p.add_argument(
        "--potential-seconds",
        type=float,
        default=300.0,
        help="time budget of each semidiscrete potential fit",
    )
    p.add_argument("--out", type=Path, default=Path("runs/bench-quality"))
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    nfe = [int(k) for k in a.nfe.split(",")]
    rows = []
    for task in a.tasks.split(","):
        if task not in TASKS:
            raise SystemExit(f"error: unknown task '{task}'; choose from {', '.join(TASKS)}")
        for coupling in a.couplings.split(","):
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
                potential=getattr(trainer.coupling, "g", None),
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
            if hasattr(trainer.coupling, "chi2"):  # how well the semidiscrete potential was fitted
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
