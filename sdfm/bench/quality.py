"""``sdfm bench quality``: the same model, steps and seeds trained with each coupling on the 2-D tasks,
then W2 to held-out data at Euler NFE 1, 2, 4, 8 and the normalized path energy (NPE).

Usage: sdfm bench quality [--steps 3000] [--tasks 8gaussians,moons,moons-8gaussians]
                          [--couplings independent,exact,sinkhorn] [--out runs/bench-quality] [--json FILE]
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
from sdfm.train import Trainer, prepare_run_dir

TASKS = {  # name -> (data.name, data.source)
    "8gaussians": ("8gaussians", "normal"),
    "moons": ("moons", "normal"),
    "moons-8gaussians": ("8gaussians", "moons"),
}


def task_config(task: str, coupling: str, steps: int, seed: int) -> Config:
    cfg = Config()
    cfg.data.name, cfg.data.source = TASKS[task]
    cfg.coupling.kind = coupling
    cfg.coupling.epsilon = 0.01
    cfg.train.steps, cfg.train.seed = steps, seed
    cfg.train.log_every, cfg.train.ckpt_every = max(1, steps // 4), steps
    cfg.train.eval_at_end = False
    return validate(cfg)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="sdfm bench quality", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--couplings", default="independent,exact,sinkhorn")
    p.add_argument("--nfe", default="1,2,4,8")
    p.add_argument("--out", type=Path, default=Path("runs/bench-quality"))
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    nfe = [int(k) for k in a.nfe.split(",")]
    rows = []
    for task in a.tasks.split(","):
        for coupling in a.couplings.split(","):
            cfg = task_config(task, coupling, a.steps, a.seed)
            run_dir = a.out / f"{task}-{coupling}"
            prepare_run_dir(run_dir, cfg, resume=False, overwrite=True)
            t0 = time.perf_counter()
            trainer = Trainer(cfg, run_dir)
            trainer.train()
            train_s = time.perf_counter() - t0
            run = LoadedRun(
                cfg=cfg,
                data=trainer.data,
                model=trainer.ema.module.eval(),
                step=trainer.step,
                run_dir=run_dir,
            )
            res = evaluate(run, num_samples=cfg.eval.num_samples, nfe=nfe, dopri5=False, log=lambda s: None)
            row = {
                "task": task,
                "coupling": coupling,
                "train_s": round(train_s, 1),
                "npe": res["flow"]["npe"],
            }
            row.update({f"w2_nfe{r['nfe']}": r["w2"] for r in res["rows"]})
            rows.append(row)
            print(json.dumps(row), flush=True)
    header = ["task", "coupling"] + [f"W2 @{k}" for k in nfe] + ["NPE", "train s"]
    print(
        f"\n{a.steps} steps, batch 256, seed {a.seed}; {platform.processor() or platform.machine()}, torch {torch.__version__}\n"
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        cells = (
            [r["task"], r["coupling"]]
            + [f"{r[f'w2_nfe{k}']:.3f}" for k in nfe]
            + [f"{r['npe']:.3f}", f"{r['train_s']:.0f}"]
        )
        print("| " + " | ".join(cells) + " |")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    return 0
