"""Benchmark: fitting the semidiscrete potential, χ̂² against steps and wall time, sdfm beside POT.

Every method gets the same data (flattened, optionally projected on its top ``--pca-dim`` principal
components, with noise drawn as N(0, I) in that space), the same target ε and the same wall-time
budget, and every potential it produces is scored by ONE evaluator: ``Chi2Evaluator`` on the same
``--eval-samples`` noise draws (fixed seed), so differences between rows are not evaluation noise
(its own noise is about sqrt(2N)/eval_samples).

- sdfm sgd_tail / sgd_ema / averaged_sgd: ``PotentialFitter`` with its default step sizes and start;
  ``potential()`` is snapshotted at the ``--at`` times (default: budget/2^k, k = ``--checkpoints``-1
  .. 0) without stopping the clock (a copy of N floats), and the snapshots are evaluated after the
  run. The fitter's default, ``auto``, is not a row of its own: it runs averaged_sgd when the
  matching space has 256 or more dimensions and sgd_tail below, so one of those rows is it.
- POT: ``ot.semidiscrete.solve_semidiscrete`` (averaged SGD with POT's defaults: lr0 = sqrt(N B),
  lr_t = lr0 t^(-2/3), ε_t = max(ε, 0.1/sqrt(t)), Polyak average) on torch tensors with the dot cost
  ``metric = -x @ y.T`` and the same noise law and batch size. It has no callback or iterate log (its
  ``log=True`` returns only the last iterate), so it is run afresh with 1, 2, 4, ... iterations while
  the next run is predicted to fit the budget, then once with as many iterations as the budget allows
  at the measured rate; each row is one run and its own wall time. (So POT spends up to about twice
  the budget in total, but no row uses more than the budget.)

The "Semidiscrete potential fitting" table of docs/results.md is this benchmark on one thread, with its
commands. The evaluator's own noise is about sqrt(2N)/eval_samples: use 65,536 samples at N =
20,000 (±0.003), where the default 8,192 (±0.024) cannot tell 0.05 from 0.02.

``--ranks 1 2``: each sdfm method also runs as a multi-rank fit (``PotentialFitter(comm=...)``, the
fit of ``sdfm worker`` under ``torchrun``) on that many local gloo processes, each with
cpu_count / ranks threads (or ``--threads``), so every row uses the same cores: every rank scores
its share of each noise batch against all N points and one all-reduce of the counts gives every rank
the same step. Rank 0 keeps the clock and tells the others when to snapshot and when to stop. On a
GPU node this is the multi-GPU worker's scaling; on one CPU it shows what the collectives cost.

``--at-steps 100 200 400 800`` snapshots at step counts instead of times: χ̂² against the noise samples
(steps x batch) and the B x N x d products spent, whatever a step costs on the machine; every row
prints both. POT then runs once with each iteration count. The "x floor" column is χ̂² x samples / N:
how far a potential is above N / samples, the least χ̂² that a fit from that many independent
one-hot samples reaches (docs/design.md §7); ``--tail-power`` sets sgd_tail's η.

Run: ``sdfm bench potential`` (digits, 60 s per method), or e.g.
``sdfm bench potential --data moons --points 20000 --at 5 30 60 240 --threads 1 --eval-samples 65536``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from sdfm.bench.common import machine_info, write_json
from sdfm.bench.peers import pot_semidiscrete
from sdfm.ot.collectives import LOCAL, Collectives
from sdfm.semidiscrete import PCA, Chi2Evaluator, FitterOptions, PotentialFitter
from sdfm.semidiscrete.problem import SemidiscreteProblem

METHODS = ("sgd_tail", "sgd_ema", "averaged_sgd", "pot")
SYNTHETIC = ("8gaussians", "moons", "checkerboard")


@dataclass(kw_only=True)
class PotentialBench:
    """Fitting the semidiscrete potential: χ̂² against steps and wall time, sdfm beside POT."""

    data: Literal["digits", "fashion-mnist", "gaussian", "8gaussians", "moons", "checkerboard"] = "digits"
    """Dataset (8gaussians, moons, checkerboard: 2-D sets of --points samples)."""
    max_points: int = 0
    """Random subset of this many points (0: all)."""
    pca_dim: int = 0
    """Solve in the top principal components (0: no PCA)."""
    points: int = 20000
    """Samples of a 2-D set (8gaussians, moons, checkerboard), drawn with --seed."""
    gaussian_n: int = 5000
    """Points of --data gaussian."""
    gaussian_d: int = 64
    """Dimension of --data gaussian."""
    methods: list[Literal["sgd_tail", "sgd_ema", "averaged_sgd", "pot"]] = field(
        default_factory=lambda: list(METHODS)
    )
    """Methods to run."""
    budget: float = 60.0
    """Wall-time seconds per method (with --at: the largest of those times)."""
    at: list[float] = field(default_factory=list)
    """Wall times (s) at which each sdfm fit is snapshotted, e.g. 5 30 60 240 (empty: budget/2^k)."""
    at_steps: list[int] = field(default_factory=list)
    """Step counts at which each fit is snapshotted instead, e.g. 100 200 400 800: χ̂² per noise sample,
    whatever a step costs (POT runs once with each count). Overrides --at and --budget."""
    batch_size: int = 1024
    """Noise samples per step (all methods)."""
    tail_power: float = 3.0
    """η of sgd_tail's average (iterate s weighs ∝ s^η; 0: uniform)."""
    init: Literal["auto", "coarse", "gaussian", "zero"] = "auto"
    """Start of every sdfm fit (auto: coarse where cells are narrow, 2-D data; else zero)."""
    epsilon: float = 0.0
    """Target entropic regularization."""
    eval_samples: int = 8192
    """Noise samples of the shared evaluator."""
    checkpoints: int = 8
    """Snapshots per sdfm run (times budget/2^k) when --at is empty."""
    target: float = 0.05
    """χ̂² level whose first crossing is reported."""
    threads: int = 0
    """torch CPU threads (0: torch's default; with --ranks, per rank: cpu_count / ranks)."""
    ranks: list[int] = field(default_factory=lambda: [1])
    """Process counts of each sdfm fit (2 or more: a multi-rank fit on local gloo processes)."""
    seed: int = 0
    """Seed of the subset and of each method's noise."""
    clusters: int = 0
    """With K > 0, also report the share of each sdfm fit's final χ̂² that sits in the masses of K
    k-means clusters of the data (long-wavelength error; white sampling noise puts about K/N there)."""
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
        y = x.flat().dense()
    elif args.data == "fashion-mnist":
        x, _ = files.load_fashion_mnist("train")
        y = x.flat().dense()
    elif args.data in SYNTHETIC:
        from sdfm.data.synthetic import SETS

        y = SETS[args.data](args.points, gen)
    else:
        y = torch.randn(args.gaussian_n, args.gaussian_d, generator=gen)
    if 0 < args.max_points < len(y):
        keep = torch.randperm(len(y), generator=gen)[: args.max_points].sort().values
        y = y[keep]
    return args.data, y.contiguous().float()


def _run_sdfm(
    method: str, keys: Tensor, args: PotentialBench, comm: Collectives = LOCAL
) -> tuple[list[dict], list[Tensor], dict]:
    """Fit until the last of ``_marks``, snapshotting ``potential()`` at each mark without stopping the
    clock. With several ranks, rank 0's clock is broadcast at every step, so all ranks step, snapshot
    and stop together."""
    options = FitterOptions(
        method=method,
        epsilon=args.epsilon,
        batch_size=args.batch_size,
        seed=args.seed,
        tail_power=args.tail_power,
        init=args.init,
    )
    fitter = PotentialFitter(keys, options, comm=comm)
    info = {
        "lr": fitter.lr,
        "eps0": fitter.eps0 if method == "averaged_sgd" else None,
        "init": fitter.init,
        "ranks": comm.world,
    }
    marks = _marks(args)
    rows: list[dict] = []
    snaps: list[Tensor] = []
    start = time.perf_counter()
    while marks:
        fitter.step()
        elapsed = time.perf_counter() - start
        if comm.world > 1:  # rank 0's clock for every rank
            elapsed = float(comm.broadcast(torch.tensor([elapsed], dtype=torch.float64))[0])
        if args.at_steps and fitter.t >= marks[0]:  # step marks: the same on every rank
            snaps.append(fitter.potential())
            rows.append({"steps": fitter.t, "seconds": elapsed})
            marks.pop(0)
        elif not args.at_steps and elapsed >= marks[0]:
            snaps.append(fitter.potential())
            rows.append({"steps": fitter.t, "seconds": elapsed})
            while marks and elapsed >= marks[0]:
                marks.pop(0)
    return rows, snaps, info


def _marks(args: PotentialBench) -> list[float]:
    """Snapshot marks of an sdfm fit, increasing: step counts with --at-steps, else times."""
    if args.at_steps:
        return sorted(float(t) for t in args.at_steps)
    if args.at:
        return sorted(float(t) for t in args.at)
    return [args.budget / 2**k for k in range(args.checkpoints - 1, -1, -1)]


def cluster_share(
    problem: SemidiscreteProblem, g: Tensor, k: int, samples: int, seed: int
) -> tuple[float, float]:
    """(plug-in χ² of the cell masses, the part of it in the masses of k k-means clusters) of g on
    about ``samples`` fresh noise samples of ``problem`` (whole batches). The plug-in χ² includes the
    sampling noise N/samples; the cluster part is Σ_c (m_c - w_c)² / w_c over clusters of mass w_c."""
    from sdfm.semidiscrete.coarse import kmeans

    gen = torch.Generator(device=problem.device).manual_seed(seed)
    counts = sum(
        problem.sums(problem.draw(gen), g, 0.0)[0] for _ in range(max(1, samples // problem.total_batch))
    )
    m = counts / counts.sum()
    n = problem.n
    _, assign = kmeans(problem.index.keys(problem.y), k, gen)
    w = torch.bincount(assign, minlength=k).float() / n
    mc = torch.bincount(assign, weights=m, minlength=k)
    filled = w > 0
    return float(n * m.square().sum() - 1), float(((mc[filled] - w[filled]).square() / w[filled]).sum())


def _rank_fit(rank: int, world: int, method: str, keys: Tensor, args: PotentialBench):
    """One rank of a multi-rank fit (run by ``run_local``); rank 0's rows and snapshots are the answer."""
    from sdfm.distributed.collectives import GroupCollectives

    return _run_sdfm(method, keys, args, GroupCollectives(None, "cpu"))


def _fit(
    method: str, ranks: int, keys: Tensor, args: PotentialBench
) -> tuple[list[dict], list[Tensor], dict]:
    if method == "pot":
        return pot_semidiscrete(
            keys, epsilon=args.epsilon, batch_size=args.batch_size, seed=args.seed, budget=_marks(args)[-1],
            at_steps=args.at_steps or None,
        )  # fmt: skip
    if ranks == 1:
        return _run_sdfm(method, keys, args)
    from sdfm.distributed.spawn import run_local

    threads = args.threads if args.threads > 0 else max(1, (os.cpu_count() or 1) // ranks)
    timeout = (4 * _marks(args)[-1] if not args.at_steps else 3600) + 300  # spawn, transfer, start, budget
    return run_local(_rank_fit, ranks, args=(method, keys, args), timeout_s=timeout, threads=threads)[0]


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
        + f"; batch {args.batch_size}, epsilon {args.epsilon}, "
        + (f"snapshots at steps {args.at_steps}; " if args.at_steps else f"budget {_marks(args)[-1]:g} s per method; ")
        + f"chi2 by one evaluator on {args.eval_samples} fixed noise samples"
    )
    evaluator = Chi2Evaluator(
        keys, epsilon=args.epsilon, num_samples=args.eval_samples, seed=args.seed + 12_345
    )
    chi2_zero = evaluator(torch.zeros(n))
    print(f"chi2 of g = 0: {chi2_zero:.4f}")
    # x floor: χ̂² in units of N / samples, the least any fit reaches from that many one-hot samples
    # (docs/design.md §7, "How many samples a fit needs"); 1 would be a perfect fit of its samples.
    header = (
        f"{'method':<18} {'steps':>7} {'samples':>10} {'BNd products':>13} {'seconds':>8} {'chi2':>9} {'x floor':>8}"
    )
    print(header)
    print("-" * len(header))
    results = []
    runs = [(m, r) for m in args.methods for r in (sorted(set(args.ranks)) if m != "pot" else [1])]
    for method, ranks in runs:
        rows, snaps, info = _fit(method, ranks, keys, args)
        label = method if ranks == 1 else f"{method} x{ranks}"
        for row, g in zip(rows, snaps, strict=True):
            row["chi2"] = evaluator(g)
            row["samples"] = row["steps"] * args.batch_size  # noise samples drawn
            row["products"] = row["samples"] * n * d  # multiply-adds of scoring them against all N points
            row["over_floor"] = row["chi2"] * row["samples"] / n
            print(
                f"{label:<18} {row['steps']:>7} {row['samples']:>10} {row['products']:>13.3g} "
                f"{row['seconds']:>8.2f} {row['chi2']:>9.4f} {row['over_floor']:>8.2f}"
            )
        reached = next((r for r in rows if r["chi2"] <= args.target), None)
        clusters = None
        if args.clusters > 0 and method != "pot":
            plug_in, part = cluster_share(
                evaluator.problem, snaps[-1], args.clusters, 4 * args.eval_samples, args.seed + 1
            )
            noise = n / (4 * args.eval_samples)
            clusters = {"k": args.clusters, "plug_in_chi2": plug_in, "cluster_chi2": part, "noise": noise}
            print(
                f"{label}: at {rows[-1]['seconds']:.0f} s, {part:.4f} of the plug-in chi2 {plug_in:.4f} "
                f"(of which ~{noise:.4f} is the check's own noise) is in the masses of {args.clusters} "
                f"clusters ({part / max(plug_in - noise, 1e-12):.0%}; white noise: ~{args.clusters / n:.1%}); "
                f"sampling floor N / (0.44 samples) = {n / (0.44 * rows[-1]['steps'] * args.batch_size):.4f}"
            )
        summary = {
            "method": method,
            "ranks": ranks,
            "label": label,
            "settings": info,
            "rows": rows,
            "final_chi2": rows[-1]["chi2"],
            "seconds_to_target": None if reached is None else reached["seconds"],
            "clusters": clusters,
        }
        results.append(summary)
    print()
    print(f"{'method':<18} {'final chi2':>10} {'at s':>7} {'steps':>7}  first chi2 <= {args.target:g}")
    for r in results:
        last = r["rows"][-1]
        hit = "not reached" if r["seconds_to_target"] is None else f"{r['seconds_to_target']:.1f} s"
        print(f"{r['label']:<18} {r['final_chi2']:>10.4f} {last['seconds']:>7.1f} {last['steps']:>7}  {hit}")
    if args.json is not None:
        data = {"name": name, "n": n, "d": y.shape[1], "pca_dim": args.pca_dim, "explained": explained}
        write_json(args.json, machine, args, data=data, chi2_zero=chi2_zero, methods=results)
    return 0
