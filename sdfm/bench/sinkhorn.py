"""Benchmark: time per Sinkhorn iteration and marginal error, sdfm beside POT and GeomLoss.

For each (n, d), the same data (x ~ N(0, I), y ~ N(1, I/4), n = m) and the same absolute
eps = epsilon * std(C) with C = 0.5 |x - y|^2:

- sdfm torch / keops: ``sinkhorn`` with a fixed iteration count (tol = 0 never stops early). The
  timed call includes computing std(C) and the final marginal check (half an iteration).
- POT: ``ot.bregman.sinkhorn_log`` on torch tensors (fp32), dense cost built inside the timed
  region, the same iteration count (stopThr = 0).
- GeomLoss: ``SamplesLoss('sinkhorn', p=2, blur=sqrt(eps), debias=False, backend='online')``. It
  anneals eps from the point clouds' diameter down to eps ("eps-scaling") and decides its own
  iteration count (shown in its name); each of its iterations is a symmetric update costing about
  what one sdfm iteration costs. Its row is its total time and the time per *its* iteration.

Timing: each method is first run on a 256-point subset (this compiles its KeOps formulas, so no
compilation is timed), then probed on min(n, 1024) points (twice, 5 iterations) to predict a full
run. A method whose
predicted run exceeds ``--budget`` seconds is skipped (KeOps on a CPU at d = 64, n = 4096 takes
minutes); otherwise it runs up to ``--repeats`` times, fewer when the next run would exceed the
budget, and the median is reported. The error column is the larger of the two L1 marginal errors of
the plan implied by each method's potentials, all evaluated by the same blocked code. The last
column is a method's time per iteration divided by the best sdfm backend's.

Sharded (``--ranks 1,2``): instead of the comparison above, the sharded solver
(``sdfm.distributed.sinkhorn.sharded_sinkhorn``) runs on R local gloo CPU ranks for each requested R,
each rank holding n/R rows and all m columns, with ``--threads`` (default: all cores) divided between
the ranks. Rows report the time per iteration (the slowest rank's wall time of a solve over its
iterations, median of the repeats), the share of it that the ranks spent inside collectives (mean
over ranks; it includes waiting for a slower rank), the time to all-gather the columns once (per
batch, not per iteration), and the speed-up over the 1-rank row.

Run: ``sdfm bench sinkhorn --sizes 1024,4096 --dims 2,64`` (or call ``main(argv)``), or
``sdfm bench sinkhorn --sizes 4096 --dims 64 --backends torch --ranks 1,2``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from sdfm.bench.common import int_list, machine_info, name_list, write_json
from sdfm.couplings.sinkhorn import cost_std, marginal_errors, sinkhorn
from sdfm.errors import UserError

Solve = Callable[[int], tuple[Tensor, Tensor, int]]
"""A method bound to its data: iteration budget -> (f (n,), g (m,), iterations it ran)."""


@dataclass
class Method:
    """A solver under test: ``make(x, y)`` binds it to data; ``fixed_iters`` if it obeys the budget."""

    name: str
    make: Callable[[Tensor, Tensor], Solve]
    fixed_iters: bool


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sdfm bench sinkhorn", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int_list, default=[1024, 4096], help="comma-separated n (= m)")
    p.add_argument("--dims", type=int_list, default=[2, 64], help="comma-separated dimensions d")
    p.add_argument("--iters", type=int, default=20, help="Sinkhorn iterations per timed run")
    p.add_argument("--epsilon", type=float, default=0.05, help="epsilon relative to std(C)")
    p.add_argument("--backends", type=name_list, default=["torch", "keops"], help="sdfm backends")
    p.add_argument("--peers", type=name_list, default=["pot", "geomloss"], help="pot, geomloss or none")
    p.add_argument("--scaling", type=float, default=0.7, help="GeomLoss eps-scaling factor")
    p.add_argument("--block-size", type=int, default=4096, help="block size of the sdfm torch backend")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per method (median reported)")
    p.add_argument("--budget", type=float, default=30.0, help="seconds of timed runs per method and size")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random data")
    p.add_argument("--json", type=Path, default=None, help="write all rows to this JSON file")
    p.add_argument(
        "--ranks",
        type=int_list,
        default=[],
        help="comma-separated rank counts: time the sharded solver on that many gloo CPU ranks instead",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per sharded launch")
    return p


def _sdfm(epsilon: float, backend: str, block_size: int) -> Method:
    def make(x: Tensor, y: Tensor) -> Solve:
        def solve(iters: int) -> tuple[Tensor, Tensor, int]:
            r = sinkhorn(
                x, y, epsilon=epsilon, backend=backend, max_iter=iters, tol=0.0, block_size=block_size
            )
            return r.f, r.g, r.iters

        return solve

    return Method(f"sdfm {backend}", make, fixed_iters=True)


def _pot(eps: float) -> Method:
    import ot

    def make(x: Tensor, y: Tensor) -> Solve:
        n, m = x.shape[0], y.shape[0]
        a, b = torch.full((n,), 1 / n), torch.full((m,), 1 / m)

        def solve(iters: int) -> tuple[Tensor, Tensor, int]:
            cost = 0.5 * torch.cdist(x, y).square()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "did not converge": expected with a fixed budget
                _, log = ot.bregman.sinkhorn_log(a, b, cost, eps, numItermax=iters, stopThr=0.0, log=True)
            # POT's plan is exp(u_i + v_j - C_ij / eps) = a_i b_j exp((f_i + g_j - C_ij) / eps).
            return eps * (log["log_u"] - a.log()), eps * (log["log_v"] - b.log()), iters

        return solve

    return Method("pot sinkhorn_log", make, fixed_iters=True)


def _geomloss(eps: float, scaling: float, x: Tensor, y: Tensor) -> Method:
    from geomloss import SamplesLoss

    # Private helper, used only to report GeomLoss's own iteration count.
    from geomloss._legacy.sinkhorn_divergence import scaling_parameters

    blur = math.sqrt(eps)  # GeomLoss: C = |x - y|^p / p and eps = blur^p
    loss = SamplesLoss(
        "sinkhorn", p=2, blur=blur, scaling=scaling, debias=False, potentials=True, backend="online"
    )

    def make(xs: Tensor, ys: Tensor) -> Solve:
        its = len(scaling_parameters(xs, ys, 2, blur, None, None, scaling)[2])

        def solve(iters: int) -> tuple[Tensor, Tensor, int]:
            del iters  # GeomLoss follows its own schedule
            f, g = loss(xs, ys)
            return f.view(-1), g.view(-1), its

        return solve

    its = len(scaling_parameters(x, y, 2, blur, None, None, scaling)[2])
    return Method(f"geomloss ({its} its, eps-scaling)", make, fixed_iters=False)


def _seconds(solve: Solve, iters: int) -> tuple[float, tuple[Tensor, Tensor, int]]:
    start = time.perf_counter()
    out = solve(iters)
    return time.perf_counter() - start, out


def _measure(method: Method, x: Tensor, y: Tensor, eps: float, args: argparse.Namespace) -> dict:
    """Warm up, probe, then time ``method`` on (x, y); a row for the table and the JSON file."""
    n, d = x.shape
    row: dict = {"n": n, "d": d, "method": method.name, "eps": eps}
    method.make(x[:256].contiguous(), y[:256].contiguous())(1)  # compiles KeOps formulas for this d
    # Probe: the faster of two short runs on p points (a first call at a new size is often slow),
    # scaled by the n*m work; a few iterations so fixed setup costs are not multiplied up.
    p = min(n, 1024)
    k = min(args.iters, 5) if method.fixed_iters else 1
    probe = method.make(x[:p].contiguous(), y[:p].contiguous())
    probe_s = min(_seconds(probe, k)[0] for _ in range(2))
    predicted = probe_s * (n / p) ** 2 * (args.iters / k if method.fixed_iters else 1)
    if predicted > args.budget:
        return row | {"skipped": f"predicted {predicted:.0f} s per run > --budget {args.budget:g} s"}
    solve = method.make(x, y)
    times: list[float] = []
    while len(times) < args.repeats and (not times or sum(times) + times[-1] <= args.budget):
        seconds, (f, g, its) = _seconds(solve, args.iters)
        times.append(seconds)
    row_err, col_err = marginal_errors(x, y, f, g, eps)
    total = statistics.median(times)
    return row | {
        "iters": its,
        "total_s": total,
        "s_per_iter": total / its,
        "times_s": times,
        "row_err": row_err,
        "col_err": col_err,
    }


def _sharded_rank(rank: int, world: int, n: int, d: int, backend: str, args: argparse.Namespace) -> dict:
    """One rank of a sharded run (called by ``run_local``): warm up, probe, time; see ``_sharded``."""
    import torch.distributed as dist

    from sdfm.distributed.sinkhorn import all_gather_rows, sharded_sinkhorn

    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(n, d, generator=gen)
    y = 0.5 * torch.randn(n, d, generator=gen) + 1.0

    def solve(rows: Tensor, cols: Tensor, iters: int):
        mine = torch.tensor_split(rows, world)[rank]
        return sharded_sinkhorn(
            mine,
            cols,
            epsilon=args.epsilon,
            backend=backend,
            max_iter=iters,
            tol=0.0,
            block_size=args.block_size,
        )

    def slowest(seconds: float) -> float:
        # Every rank must take the same decisions (skip, one more repeat), or the collectives hang.
        t = torch.tensor([seconds], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    solve(x[:256], y[:256], 1)  # compiles KeOps formulas, first-call allocations
    p = min(n, 1024)
    k = min(args.iters, 5)
    probes = [solve(x[:p], y[:p], k) for _ in range(2)]
    probe_s = slowest(min(r.comm_s + r.compute_s for r in probes))
    predicted = probe_s * (n / p) ** 2 * args.iters / k
    if predicted > args.budget:
        return {"skipped": f"predicted {predicted:.0f} s per run > --budget {args.budget:g} s"}
    start = time.perf_counter()
    gathered = all_gather_rows(torch.tensor_split(y, world)[rank])
    gather_s = slowest(time.perf_counter() - start)
    assert torch.equal(gathered.rows, y)
    times, comm_share = [], []
    while len(times) < args.repeats and (not times or sum(times) + times[-1] <= args.budget):
        result = solve(x, gathered.rows, args.iters)
        total = result.comm_s + result.compute_s
        times.append(slowest(total))
        comm_share.append(result.comm_s / total)
    return {
        "times_s": times,
        "comm_share": statistics.median(comm_share),
        "gather_s": gather_s,
        "threads": torch.get_num_threads(),
        "f": result.f_local,
        "g": result.g,
        "eps": result.eps,
        "iters": result.iters,
    }


def _sharded(args: argparse.Namespace) -> list[dict]:
    """Time ``sharded_sinkhorn`` on R local gloo ranks for every R in ``--ranks``; print the table."""
    from sdfm.distributed.spawn import run_local

    cores = args.threads if args.threads > 0 else os.cpu_count() or 1
    header = f"{'n':>6} {'d':>4} {'ranks':>5} {'thr/rk':>6}  {'method':<12} {'iters':>5} {'ms/iter':>9}"
    header += f" {'comm %':>7} {'gather ms':>9} {'total ms':>10} {'L1 err':>9} {'speedup':>7}"
    print(header)
    print("-" * len(header))
    rows = []
    for n in args.sizes:
        for d in args.dims:
            gen = torch.Generator().manual_seed(args.seed)
            x = torch.randn(n, d, generator=gen)
            y = 0.5 * torch.randn(n, d, generator=gen) + 1.0
            for backend in args.backends:
                if backend == "keops":  # compile here once, not in every rank racing for the cache
                    sinkhorn(x[:256], y[:256], backend="keops", max_iter=1)
                base = math.nan
                for world in args.ranks:
                    threads = max(1, cores // world)
                    outs = run_local(
                        _sharded_rank,
                        world,
                        args=(n, d, backend, args),
                        timeout_s=args.timeout,
                        threads=threads,
                    )
                    row: dict = {
                        "n": n,
                        "d": d,
                        "method": f"sdfm {backend}",
                        "ranks": world,
                        "threads": threads,
                    }
                    if "skipped" in outs[0]:
                        rows.append(row | {"skipped": outs[0]["skipped"]})
                        print(
                            f"{n:>6} {d:>4} {world:>5} {threads:>6}  {backend:<12} skipped: {outs[0]['skipped']}"
                        )
                        continue
                    first = outs[0]
                    f = torch.cat([o["f"] for o in outs])
                    row_err, col_err = marginal_errors(x, y, f, first["g"], first["eps"])
                    total = statistics.median(first["times_s"])
                    row |= {
                        "iters": first["iters"],
                        "total_s": total,
                        "s_per_iter": total / first["iters"],
                        "times_s": first["times_s"],
                        "comm_share": statistics.mean(o["comm_share"] for o in outs),
                        "comm_share_per_rank": [o["comm_share"] for o in outs],
                        "gather_s": first["gather_s"],
                        "row_err": row_err,
                        "col_err": col_err,
                    }
                    if world == 1:
                        base = row["s_per_iter"]
                    row["speedup_vs_1_rank"] = base / row["s_per_iter"]
                    rows.append(row)
                    print(
                        f"{n:>6} {d:>4} {world:>5} {threads:>6}  {backend:<12} {row['iters']:>5} "
                        f"{1e3 * row['s_per_iter']:>9.2f} {100 * row['comm_share']:>6.1f}% "
                        f"{1e3 * row['gather_s']:>9.2f} {1e3 * total:>10.1f} {max(row_err, col_err):>9.2e} "
                        f"{row['speedup_vs_1_rank']:>7.2f}"
                    )
    return rows


def main(argv: list[str]) -> int:
    """Run the benchmark, print a table, optionally write JSON; returns the exit code."""
    args = _parser().parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    machine = machine_info()
    if args.ranks:
        if min(args.ranks) < 1:
            raise UserError(f"--ranks must be positive rank counts, got {args.ranks}")
        print("machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()))
        print(
            f"sharded sdfm sinkhorn on local gloo CPU ranks: epsilon={args.epsilon} (relative), "
            f"iters={args.iters}, repeats<={args.repeats}, budget={args.budget:g} s, "
            f"block_size={args.block_size}, sqeuclidean cost, fp32"
        )
        rows = _sharded(args)
        if args.json is not None:
            write_json(args.json, machine, args, rows=rows)
        return 0
    print("machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()))
    print(
        f"epsilon={args.epsilon} (relative), iters={args.iters}, repeats<={args.repeats}, "
        f"budget={args.budget:g} s per method, block_size={args.block_size}, sqeuclidean cost, fp32"
    )
    header = f"{'n':>6} {'d':>4}  {'method':<32} {'iters':>5} {'ms/iter':>9} {'total ms':>10} {'L1 err':>9}"
    header += f" {'x sdfm':>7}"
    print(header)
    print("-" * len(header))
    rows = []
    for n in args.sizes:
        for d in args.dims:
            gen = torch.Generator().manual_seed(args.seed)
            x = torch.randn(n, d, generator=gen)
            y = 0.5 * torch.randn(n, d, generator=gen) + 1.0
            eps = args.epsilon * cost_std(x, y)
            methods = [_sdfm(args.epsilon, backend, args.block_size) for backend in args.backends]
            if "pot" in args.peers:
                methods.append(_pot(eps))
            if "geomloss" in args.peers:
                methods.append(_geomloss(eps, args.scaling, x, y))
            group = [_measure(method, x, y, eps, args) for method in methods]
            timed = [r["s_per_iter"] for r in group if "skipped" not in r and r["method"].startswith("sdfm")]
            best = min(timed, default=math.nan)
            for r in group:
                if "skipped" in r:
                    print(f"{n:>6} {d:>4}  {r['method']:<32} skipped: {r['skipped']}")
                    continue
                r["ratio_to_sdfm_best"] = r["s_per_iter"] / best
                print(
                    f"{n:>6} {d:>4}  {r['method']:<32} {r['iters']:>5} {1e3 * r['s_per_iter']:>9.2f} "
                    f"{1e3 * r['total_s']:>10.1f} {max(r['row_err'], r['col_err']):>9.2e} "
                    f"{r['ratio_to_sdfm_best']:>7.2f}"
                )
            rows += group
    if args.json is not None:
        write_json(args.json, machine, args, rows=rows)
    return 0
