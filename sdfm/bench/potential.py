"""Benchmark: fitting the semidiscrete potential, χ̂² against steps and wall time, sdfm beside POT.

Every method gets the same data (flattened, optionally projected on its top ``--pca-dim`` principal
components, with noise drawn as N(0, I) in that space), the same target ε and the same wall-time
budget, and every potential it produces is scored by ONE evaluator: ``Chi2Evaluator`` on the same
``--eval-samples`` noise draws (fixed seed), so differences between rows are not evaluation noise
(its own noise is about sqrt(2N)/eval_samples).

- sdfm sgd_ema / averaged_sgd: ``PotentialFitter`` with its default step sizes; ``potential()`` is
  snapshotted at times budget/2^k (k = ``--checkpoints``-1 .. 0) without stopping the clock (a copy
  of N floats), and the snapshots are evaluated after the run.
- POT: ``ot.semidiscrete.solve_semidiscrete`` (averaged SGD with POT's defaults: lr0 = sqrt(N B),
  lr_t = lr0 t^(-2/3), ε_t = max(ε, 0.1/sqrt(t)), Polyak average) on torch tensors with the dot cost
  ``metric = -x @ y.T`` and the same noise law and batch size. It has no callback or iterate log (its
  ``log=True`` returns only the last iterate), so it is run afresh with 1, 2, 4, ... iterations while
  the next run is predicted to fit the budget, then once with as many iterations as the budget allows
  at the measured rate; each row is one run and its own wall time. (So POT spends up to about twice
  the budget in total, but no row uses more than the budget.)

Measured on a shared 2-core AMD EPYC CPU (torch 2.13, batch 1,024, ε = 0, χ̂² of the evaluator on
8,192 samples; its own noise is ±0.007 on digits, ±0.017 at N = 10,000):

| data | g = 0 | sdfm sgd_ema | sdfm averaged_sgd | POT |
|---|---|---|---|---|
| digits, N = 1,797, d = 64 | 2.18 | 0.017 at 0.5 s, noise floor by 2 s | 0.007 at 1.9 s | 0.046 at 1.8 s, 0.006 at 6 s |
| Fashion 10k, PCA 64 | 20.7 | 0.040 at 7.5 s (plateau ~0.03) | 0.038 at 60 s, 0.011 at 120 s | 0.48 at 110 s |
| Fashion 10k, d = 784 | 12.4 | 0.036 at 75 s | 0.018 at 75 s, 0.0003 at 150 s | 0.64 at 143 s |
| Fashion 60k, d = 784 | 26.1 | 1.87 at 120 s, 0.78 at 240 s | 1.21 at 120 s, 0.63 at 240 s | 4.9 at 80 s, 3.3 at 228 s |

Run: ``sdfm bench potential`` (digits, 60 s per method), or e.g.
``sdfm bench potential --data fashion-mnist --max-points 10000 --pca-dim 64 --budget 120``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from torch import Tensor

from sdfm.bench.common import machine_info, name_list, write_json
from sdfm.errors import UserError
from sdfm.semidiscrete import PCA, Chi2Evaluator, PotentialFitter

METHODS = ("sgd_ema", "averaged_sgd", "pot")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sdfm bench potential", description=__doc__.split("\n")[0])
    p.add_argument("--data", choices=["digits", "fashion-mnist", "gaussian"], default="digits")
    p.add_argument("--max-points", type=int, default=0, help="random subset of this many points (0: all)")
    p.add_argument("--pca-dim", type=int, default=0, help="solve in the top principal components (0: no PCA)")
    p.add_argument("--gaussian-n", type=int, default=5000, help="points of --data gaussian")
    p.add_argument("--gaussian-d", type=int, default=64, help="dimension of --data gaussian")
    p.add_argument("--methods", type=name_list, default=list(METHODS), help="sgd_ema, averaged_sgd, pot")
    p.add_argument("--budget", type=float, default=60.0, help="wall-time seconds per method")
    p.add_argument("--batch-size", type=int, default=1024, help="noise samples per step (all methods)")
    p.add_argument("--epsilon", type=float, default=0.0, help="target entropic regularization")
    p.add_argument("--eval-samples", type=int, default=8192, help="noise samples of the shared evaluator")
    p.add_argument("--checkpoints", type=int, default=8, help="snapshots per sdfm run (times budget/2^k)")
    p.add_argument("--target", type=float, default=0.05, help="χ̂² level whose first crossing is reported")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset and of each method's noise")
    p.add_argument("--json", type=Path, default=None, help="write all rows to this JSON file")
    return p


def _load(args: argparse.Namespace) -> tuple[str, Tensor]:
    """(name, (N, d) float32 points) of the requested data set."""
    from sdfm.data import files

    gen = torch.Generator().manual_seed(args.seed)
    if args.data == "digits":
        x, _ = files.load_digits()  # all 1,797 images, no held-out split: this is not training
        y = torch.from_numpy(x).flatten(1)
    elif args.data == "fashion-mnist":
        x, _ = files.load_fashion_mnist("train")
        y = torch.from_numpy(x).flatten(1)
    else:
        y = torch.randn(args.gaussian_n, args.gaussian_d, generator=gen)
    if 0 < args.max_points < len(y):
        keep = torch.randperm(len(y), generator=gen)[: args.max_points].sort().values
        y = y[keep]
    return args.data, y.contiguous().float()


def _run_sdfm(method: str, keys: Tensor, args: argparse.Namespace) -> tuple[list[dict], list[Tensor], dict]:
    fitter = PotentialFitter(
        keys, method=method, epsilon=args.epsilon, batch_size=args.batch_size, seed=args.seed
    )
    info = {"lr": fitter.lr, "eps0": fitter.eps0 if method == "averaged_sgd" else None}
    marks = [args.budget / 2**k for k in range(args.checkpoints - 1, -1, -1)]
    rows: list[dict] = []
    snaps: list[Tensor] = []
    start = time.perf_counter()
    while marks:
        fitter.step()
        elapsed = time.perf_counter() - start
        if elapsed >= marks[0]:
            snaps.append(fitter.potential())
            rows.append({"steps": fitter.t, "seconds": elapsed})
            while marks and elapsed >= marks[0]:
                marks.pop(0)
    return rows, snaps, info


def _run_pot(keys: Tensor, args: argparse.Namespace) -> tuple[list[dict], list[Tensor], dict]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from ot.semidiscrete import solve_semidiscrete

    n, p = keys.shape

    def run(iters: int) -> tuple[Tensor, float]:
        gen = torch.Generator().manual_seed(args.seed)
        start = time.perf_counter()
        g = solve_semidiscrete(
            keys,
            lambda b: torch.randn(b, p, generator=gen),
            metric=lambda x, y: -(x @ y.T),  # dot cost: POT's score g - C is g + <x, y>, as in sdfm
            reg=args.epsilon,
            max_iter=iters,
            batch_size=args.batch_size,
        )
        return g.float(), time.perf_counter() - start

    rows: list[dict] = []
    snaps: list[Tensor] = []
    iters, seconds = 1, 0.0
    while True:
        g, seconds = run(iters)
        rows.append({"steps": iters, "seconds": seconds})
        snaps.append(g)
        if 2 * seconds > args.budget:
            break
        iters *= 2
    rate = iters / seconds
    final = int(args.budget * rate * 0.95)
    if final > iters:
        g, seconds = run(final)
        rows.append({"steps": final, "seconds": seconds})
        snaps.append(g)
    return rows, snaps, {"lr": math.sqrt(n * args.batch_size), "eps0": 0.1}


def main(argv: list[str]) -> int:
    """Run the benchmark, print a table, optionally write JSON; returns the exit code."""
    args = _parser().parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        raise UserError(f"unknown --methods {bad}; choose from {', '.join(METHODS)}")
    machine = machine_info()
    name, y = _load(args)
    keys, explained = y, 1.0
    if args.pca_dim > 0:
        pca = PCA.fit(y, args.pca_dim)
        keys, explained = pca.keys(y).contiguous(), pca.explained
    n, d = keys.shape
    print("machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()))
    print(
        f"data: {name}, N={n}, d={y.shape[1]}"
        + (f", PCA {args.pca_dim} ({100 * explained:.1f}% of the variance)" if args.pca_dim else "")
        + f"; batch {args.batch_size}, epsilon {args.epsilon}, budget {args.budget:g} s per method; "
        f"chi2 by one evaluator on {args.eval_samples} fixed noise samples"
    )
    evaluator = Chi2Evaluator(
        keys, epsilon=args.epsilon, num_samples=args.eval_samples, seed=args.seed + 12_345
    )
    chi2_zero = evaluator(torch.zeros(n))
    print(f"chi2 of g = 0: {chi2_zero:.4f}")
    header = f"{'method':<14} {'steps':>7} {'seconds':>8} {'chi2':>9}"
    print(header)
    print("-" * len(header))
    results = []
    for method in args.methods:
        if method == "pot":
            rows, snaps, info = _run_pot(keys, args)
        else:
            rows, snaps, info = _run_sdfm(method, keys, args)
        for row, g in zip(rows, snaps, strict=True):
            row["chi2"] = evaluator(g)
            print(f"{method:<14} {row['steps']:>7} {row['seconds']:>8.2f} {row['chi2']:>9.4f}")
        reached = next((r for r in rows if r["chi2"] <= args.target), None)
        summary = {
            "method": method,
            "settings": info,
            "rows": rows,
            "final_chi2": rows[-1]["chi2"],
            "seconds_to_target": None if reached is None else reached["seconds"],
        }
        results.append(summary)
    print()
    print(f"{'method':<14} {'final chi2':>10} {'at s':>7} {'steps':>7}  first chi2 <= {args.target:g}")
    for r in results:
        last = r["rows"][-1]
        hit = "not reached" if r["seconds_to_target"] is None else f"{r['seconds_to_target']:.1f} s"
        print(f"{r['method']:<14} {r['final_chi2']:>10.4f} {last['seconds']:>7.1f} {last['steps']:>7}  {hit}")
    if args.json is not None:
        data = {"name": name, "n": n, "d": y.shape[1], "pca_dim": args.pca_dim, "explained": explained}
        write_json(args.json, machine, args, data=data, chi2_zero=chi2_zero, methods=results)
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
