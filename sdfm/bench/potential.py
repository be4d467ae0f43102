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

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from sdfm.bench.common import machine_info, write_json
from sdfm.bench.peers import pot_semidiscrete
from sdfm.semidiscrete import PCA, Chi2Evaluator, FitterOptions, PotentialFitter

METHODS = ("sgd_ema", "averaged_sgd", "pot")


@dataclass(kw_only=True)
class PotentialBench:
    """Fitting the semidiscrete potential: χ̂² against steps and wall time, sdfm beside POT."""

    data: Literal["digits", "fashion-mnist", "gaussian"] = "digits"
    """Dataset."""
    max_points: int = 0
    """Random subset of this many points (0: all)."""
    pca_dim: int = 0
    """Solve in the top principal components (0: no PCA)."""
    gaussian_n: int = 5000
    """Points of --data gaussian."""
    gaussian_d: int = 64
    """Dimension of --data gaussian."""
    methods: list[Literal["sgd_ema", "averaged_sgd", "pot"]] = field(default_factory=lambda: list(METHODS))
    """Methods to run."""
    budget: float = 60.0
    """Wall-time seconds per method."""
    batch_size: int = 1024
    """Noise samples per step (all methods)."""
    epsilon: float = 0.0
    """Target entropic regularization."""
    eval_samples: int = 8192
    """Noise samples of the shared evaluator."""
    checkpoints: int = 8
    """Snapshots per sdfm run (times budget/2^k)."""
    target: float = 0.05
    """χ̂² level whose first crossing is reported."""
    threads: int = 0
    """torch CPU threads (0: torch's default)."""
    seed: int = 0
    """Seed of the subset and of each method's noise."""
    json: Path | None = None
    """Write all rows to this JSON file."""

    def run(self) -> int:
        """Run the benchmark, print a table, optionally write JSON; returns the exit code."""
        return _main(self)


def _load(args: PotentialBench) -> tuple[str, Tensor]:
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


def _run_sdfm(method: str, keys: Tensor, args: PotentialBench) -> tuple[list[dict], list[Tensor], dict]:
    options = FitterOptions(method=method, epsilon=args.epsilon, batch_size=args.batch_size, seed=args.seed)
    fitter = PotentialFitter(keys, options)
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


def _main(args: PotentialBench) -> int:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
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
            rows, snaps, info = pot_semidiscrete(
                keys, epsilon=args.epsilon, batch_size=args.batch_size, seed=args.seed, budget=args.budget
            )
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
