"""Benchmark: time per Sinkhorn iteration and marginal error, sdfm beside POT, GeomLoss and
flash-sinkhorn.

For each (n, d), the same data (x ~ N(0, I), y ~ N(1, I/4), n = m) and the same absolute
eps = epsilon * std(C) with C = 0.5 |x - y|^2:

- sdfm torch / keops / triton: ``sinkhorn`` with a fixed iteration count (tol = 0 never stops early),
  once per product precision of ``--precisions`` that the backend can honour (fp32, tf32, bf16,
  bf16x3: ``sdfm.ot.reductions``; rows named "sdfm torch bf16"). The timed call includes computing
  std(C) and the final marginal check (half an iteration). The triton backend runs on CUDA;
  elsewhere its row is skipped with the reason (Triton's CPU interpreter is far too slow to time).
  On a CPU the low precisions are emulated (rounded operands multiplied in fp32): their f64 dev is
  the real one, their time is not a tensor core's.
- POT: ``ot.bregman.sinkhorn_log`` on torch tensors (fp32), dense cost built inside the timed
  region, the same iteration count (stopThr = 0). It stores the n x m cost once and does not
  recompute it per iteration, so per iteration it does only the two logsumexps.
- GeomLoss: ``SamplesLoss('sinkhorn', p=2, blur=sqrt(eps), debias=False, backend='online')`` (KeOps).
  It anneals eps from the point clouds' diameter down to eps ("eps-scaling") and decides its own
  iteration count (shown in its name); each of its iterations is a symmetric update costing about
  what one sdfm iteration costs. Its row is its total time and the time per *its* iteration.
- flash-sinkhorn (CUDA only; "not installed" when the package is absent): ``flash_sinkhorn.SamplesLoss(
  'sinkhorn', backend='alternating', use_epsilon_scaling=False, eps=eps, n_iters=iters,
  half_cost=True, potentials=True)``, its fixed-eps alternating solver with its default TF32 products.

Timing: each method is first run on a 256-point subset (this compiles its KeOps formulas, so no
compilation is timed), then probed on min(n, ``--probe``) points (twice, 5 iterations) to predict a
full run. A method whose predicted run exceeds ``--budget`` seconds is skipped (KeOps on a CPU at
d = 64, n = 4096 takes minutes); otherwise it runs up to ``--repeats`` times, fewer when the next run
would exceed the budget, and the median is reported. The error column is the larger of the two L1
marginal errors of the plan implied by each method's potentials, all evaluated by the same blocked
code. ``f64 dev`` is the largest deviation of the method's potentials (f, g), in units of eps and up
to the constant that the dual leaves free, from the same algorithm run in float64 with the same
iterations: sdfm's iteration in float64 (``reference_sinkhorn``; ``sinkhorn`` itself computes in
fp32) for every sdfm backend, the peer itself on float64 inputs for POT and GeomLoss, none for
flash-sinkhorn (fp32 kernels). When that reference would exceed the budget, it and the method are
rerun on the first n_ref points (halving n until it fits; ``f64_ref_n`` in the JSON). ``cpu`` is
the CPU/wall ratio of the timed runs (busy cores). The last column is a method's time per iteration
divided by the best sdfm backend's.

Sharded (``--ranks 1 2``): instead of the comparison above, the sharded solver
(``sdfm.distributed.sinkhorn.sharded_sinkhorn``) runs on R local gloo CPU ranks for each requested R,
each rank holding n/R rows and all m columns, with ``--threads`` (default: all cores) divided between
the ranks (at least one each). Rows report the time per iteration (the slowest rank's wall time of a
solve over its iterations, median of the repeats), the share of it that the ranks spent inside
collectives (mean over ranks; it includes waiting for a slower rank), the time to all-gather the
columns once (per batch, not per iteration), and the speed-up over the 1-rank row.

Run: ``sdfm bench sinkhorn --sizes 1024 4096 --dims 2 64`` (or call ``SinkhornBench(...).run()``), or
``sdfm bench sinkhorn --sizes 4096 --dims 64 --backends torch --ranks 1 2``.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from sdfm.bench.common import (
    default_device,
    start_machine,
    timed,
    triton_skip,
    write_json,
)
from sdfm.bench.peers import Method, Solve, flash_sinkhorn, geomloss_sinkhorn, pot_sinkhorn
from sdfm.errors import UserError
from sdfm.ot.reductions import SUPPORTED
from sdfm.ot.sinkhorn import SinkhornOptions, cost_std, marginal_errors, sinkhorn

BACKENDS = ("torch", "keops", "triton")
PEERS = ("pot", "geomloss", "flash")


@dataclass(kw_only=True)
class SinkhornBench:
    """Time per Sinkhorn iteration and marginal error, sdfm beside POT, GeomLoss and flash-sinkhorn
    (with --ranks: the sharded solver on local gloo CPU ranks instead)."""

    sizes: list[int] = field(default_factory=lambda: [1024, 4096])
    """n (= m) of each problem."""
    dims: list[int] = field(default_factory=lambda: [2, 64])
    """Dimensions d."""
    iters: int = 20
    """Sinkhorn iterations per timed run."""
    epsilon: float = 0.05
    """Epsilon relative to std(C)."""
    backends: list[Literal["torch", "keops", "triton"]] = field(default_factory=lambda: list(BACKENDS))
    """sdfm backends to time."""
    precisions: list[Literal["fp32", "tf32", "bf16", "bf16x3"]] = field(default_factory=lambda: ["fp32"])
    """Product precisions of the sdfm rows (each backend runs the ones it can honour)."""
    peers: list[Literal["pot", "geomloss", "flash", "none"]] = field(default_factory=lambda: list(PEERS))
    """Peers to time beside them ('none': no peer)."""
    scaling: float = 0.7
    """GeomLoss eps-scaling factor."""
    block_size: int = 4096
    """Block size of the sdfm torch backend."""
    repeats: int = 3
    """Timed runs per method (median reported)."""
    budget: float = 30.0
    """Seconds of timed runs per method and size."""
    probe: int = 0
    """Points of the probe run (0: 1024, 8192 on CUDA)."""
    no_f64: bool = False
    """Skip the float64 reference (the f64 dev column)."""
    device: str = field(default_factory=default_device)
    """cpu or cuda."""
    threads: int = 0
    """torch CPU threads (0: torch's default)."""
    seed: int = 0
    """Seed of the random data."""
    json: Path | None = None
    """Write all rows to this JSON file."""
    ranks: list[int] = field(default_factory=list)
    """Rank counts: time the sharded solver on that many gloo CPU ranks instead."""
    timeout: float = 600.0
    """Seconds allowed per sharded launch."""

    def run(self) -> int:
        """Run the benchmark, print a table, optionally write JSON; returns the exit code."""
        machine = start_machine(self.threads, device=self.device)
        if self.ranks:
            if min(self.ranks) < 1:
                raise UserError(f"--ranks must be positive rank counts, got {self.ranks}")
            print(
                f"sharded sdfm sinkhorn on local gloo CPU ranks: epsilon={self.epsilon} (relative), "
                f"iters={self.iters}, repeats<={self.repeats}, budget={self.budget:g} s, "
                f"block_size={self.block_size}, sqeuclidean cost, fp32"
            )
            rows = _sharded(self)
        else:
            rows = run(self)
        if self.json is not None:
            write_json(self.json, machine, self, rows=rows)
        return 0


def _sdfm(epsilon: float, backend: str, block_size: int, device: torch.device, precision: str) -> Method:
    def make(x: Tensor, y: Tensor) -> Solve:
        def solve(iters: int) -> tuple[Tensor, Tensor, int]:
            options = SinkhornOptions(
                epsilon=epsilon,
                backend=backend,
                max_iter=iters,
                tol=0.0,
                block_size=block_size,
                precision=precision,
            )
            r = sinkhorn(x, y, options)
            return r.f, r.g, r.iters

        return solve

    reason = triton_skip(device) if backend == "triton" else None
    name = f"sdfm {backend}" if precision == "fp32" else f"sdfm {backend} {precision}"
    return Method(name, make, fixed_iters=True, f64="sdfm", unavailable=reason)


def points(n: int, d: int, seed: int) -> tuple[Tensor, Tensor]:
    """The benchmark's data on the CPU: x ~ N(0, I) (n, d) and y ~ N(1, I/4) (n, d)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen), 0.5 * torch.randn(n, d, generator=gen) + 1.0


def reference_sinkhorn(x: Tensor, y: Tensor, epsilon: float, iters: int, block: int = 4096) -> tuple:
    """sdfm's Sinkhorn loop (``sdfm.ot.sinkhorn.sinkhorn_loop``) in float64: eps = epsilon * std(C),
    zero potentials, then ``iters`` times an f-update and a g-update (``sinkhorn`` itself computes
    in fp32).

    Returns:
        (f (n,), g (m,), iters) float64, as a ``Solve`` does.
    """
    options = SinkhornOptions(epsilon=epsilon, max_iter=iters, tol=0.0, block_size=block, precision="fp64")
    r = sinkhorn(x, y, options)
    return r.f, r.g, r.iters


def methods(args: SinkhornBench, x: Tensor, y: Tensor, eps: float) -> list[Method]:
    """The sdfm backends and peers that ``args`` asks for, bound to eps (absolute) on (x, y)."""
    device = torch.device(args.device)
    out = [
        _sdfm(args.epsilon, backend, args.block_size, device, precision)
        for backend in args.backends
        for precision in args.precisions
        if precision in SUPPORTED[backend]
    ]
    if "pot" in args.peers:
        out.append(pot_sinkhorn(eps))
    if "geomloss" in args.peers:
        out.append(geomloss_sinkhorn(eps, args.scaling, x, y))
    if "flash" in args.peers:
        out.append(flash_sinkhorn(eps, device))
    return out


def _probe_size(args: SinkhornBench, n: int) -> int:
    return min(n, args.probe or (8192 if args.device.startswith("cuda") else 1024))


def _predict(
    solve_at: Callable[[int], Solve], n: int, p: int, iters: int, fixed_iters: bool, device: torch.device
) -> float:
    """Seconds of a full run from the faster of two short runs on p points (a first call at a new
    size is often slow), scaled by the n*m work; a few iterations so fixed setup costs are not
    multiplied up."""
    k = min(iters, 5) if fixed_iters else 1
    probe = solve_at(p)
    probe_s = min(timed(lambda: probe(k), device)[0] for _ in range(2))
    return probe_s * (n / p) ** 2 * (iters / k if fixed_iters else 1)


def _f64_deviation(
    method: Method, x: Tensor, y: Tensor, f: Tensor, g: Tensor, eps: float, args, cache: dict
) -> dict:
    """Deviation of (f, g) from the float64 reference named by ``method.f64`` (see the module doc)."""
    if method.f64 is None:
        return {"f64_dev_note": "no float64 reference (fp32-only solver)"}
    ref = method
    if method.f64 == "sdfm":
        ref = Method(
            "float64 sdfm",
            lambda xs, ys: lambda iters: reference_sinkhorn(xs, ys, args.epsilon, iters, args.block_size),
            fixed_iters=True,
        )
    n = x.shape[0]
    p = _probe_size(args, n)
    n_ref = n
    if (ref.name, n) not in cache:
        predicted = _predict(
            lambda k: ref.make(x[:k].double(), y[:k].double()), n, p, args.iters, ref.fixed_iters, x.device
        )
        while predicted > args.budget and n_ref > p:
            n_ref, predicted = n_ref // 2, predicted / 4
    if n_ref < n:  # the method again, on the smaller problem the reference can afford
        f, g, _ = method.make(x[:n_ref].contiguous(), y[:n_ref].contiguous())(args.iters)
    key = (ref.name, n_ref)
    if key not in cache:
        cache[key] = ref.make(x[:n_ref].double(), y[:n_ref].double())(args.iters)
        if n_ref < n:
            cache[(ref.name, n)] = cache[key]  # remembered under n too, so the size search runs once
    f64, g64, _ = cache[key]
    shift = (f.double() - f64).mean()  # (f + c, g - c) is the same plan
    dev = max(float((f.double() - f64 - shift).abs().max()), float((g.double() - g64 + shift).abs().max()))
    return {"f64_dev": dev / eps, "f64_ref_n": n_ref}


def _measure(method: Method, x: Tensor, y: Tensor, eps: float, args: SinkhornBench, cache: dict) -> dict:
    """Warm up, probe, then time ``method`` on (x, y); a row for the table and the JSON file. A method
    that fails (a peer running out of GPU memory on its dense cost matrix) is a skipped row."""
    row: dict = {"n": x.shape[0], "d": x.shape[1], "method": method.name, "eps": eps}
    if method.unavailable is not None:
        return row | {"skipped": method.unavailable}
    try:
        return row | _timings(method, x, y, eps, args, cache)
    except (RuntimeError, MemoryError) as error:
        if x.device.type == "cuda":
            torch.cuda.empty_cache()
        return row | {"skipped": f"failed: {type(error).__name__}: {str(error).splitlines()[0][:160]}"}


def _timings(method: Method, x: Tensor, y: Tensor, eps: float, args: SinkhornBench, cache: dict) -> dict:
    n = x.shape[0]
    method.make(x[:256].contiguous(), y[:256].contiguous())(1)  # compiles KeOps formulas for this d
    p = _probe_size(args, n)
    predicted = _predict(
        lambda k: method.make(x[:k].contiguous(), y[:k].contiguous()),
        n,
        p,
        args.iters,
        method.fixed_iters,
        x.device,
    )
    if predicted > args.budget:
        return {"skipped": f"predicted {predicted:.0f} s per run > --budget {args.budget:g} s"}
    solve = method.make(x, y)
    times: list[float] = []
    utils: list[float] = []
    while len(times) < args.repeats and (not times or sum(times) + times[-1] <= args.budget):
        seconds, util, (f, g, its) = timed(lambda: solve(args.iters), x.device)
        times.append(seconds)
        utils.append(util)
    row_err, col_err = marginal_errors(x, y, f, g, eps)
    total = statistics.median(times)
    row = {
        "iters": its,
        "total_s": total,
        "s_per_iter": total / its,
        "times_s": times,
        "cpu_util": statistics.median(utils),
        "row_err": row_err,
        "col_err": col_err,
    }
    if not args.no_f64:
        row |= _f64_deviation(method, x, y, f, g, eps, args, cache)
    return row


def run(args: SinkhornBench) -> list[dict]:
    """Time every method of ``args`` (from ``parse_args``) on every (n, d), printing one line per
    row; returns the rows."""
    device = torch.device(args.device)
    print(
        f"epsilon={args.epsilon} (relative), iters={args.iters}, repeats<={args.repeats}, "
        f"budget={args.budget:g} s per method, block_size={args.block_size}, sqeuclidean cost, fp32"
    )
    header = f"{'n':>6} {'d':>4}  {'method':<32} {'iters':>5} {'ms/iter':>9} {'total ms':>10} {'L1 err':>9}"
    header += f" {'f64 dev':>9} {'cpu':>4} {'x sdfm':>7}"
    print(header)
    print("-" * len(header))
    rows = []
    for n in args.sizes:
        for d in args.dims:
            x, y = (t.to(device) for t in points(n, d, args.seed))
            eps = args.epsilon * cost_std(x, y)
            cache: dict = {}
            group = [_measure(method, x, y, eps, args, cache) for method in methods(args, x, y, eps)]
            timed_rows = [r for r in group if "skipped" not in r and r["method"].startswith("sdfm")]
            best = min((r["s_per_iter"] for r in timed_rows), default=math.nan)
            for r in group:
                if "skipped" in r:
                    print(f"{n:>6} {d:>4}  {r['method']:<32} skipped: {r['skipped']}")
                    continue
                r["ratio_to_sdfm_best"] = r["s_per_iter"] / best
                dev = f"{r['f64_dev']:>9.2e}" if "f64_dev" in r else f"{'n/a':>9}"
                print(
                    f"{n:>6} {d:>4}  {r['method']:<32} {r['iters']:>5} {1e3 * r['s_per_iter']:>9.2f} "
                    f"{1e3 * r['total_s']:>10.1f} {max(r['row_err'], r['col_err']):>9.2e} {dev} "
                    f"{r['cpu_util']:>4.1f} {r['ratio_to_sdfm_best']:>7.2f}"
                )
            rows += group
    return rows


def _sharded_rank(rank: int, world: int, n: int, d: int, backend: str, args: SinkhornBench) -> dict:
    """One rank of a sharded run (called by ``run_local``): warm up, probe, time; see ``_sharded``."""
    import torch.distributed as dist

    from sdfm.distributed.collectives import all_gather_rows
    from sdfm.distributed.sinkhorn import sharded_sinkhorn

    x, y = points(n, d, args.seed)

    def solve(rows: Tensor, cols: Tensor, iters: int):
        mine = torch.tensor_split(rows, world)[rank]
        options = SinkhornOptions(
            epsilon=args.epsilon, backend=backend, max_iter=iters, tol=0.0, block_size=args.block_size
        )
        return sharded_sinkhorn(mine, cols, options)

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
        "f": result.f,
        "g": result.g,
        "eps": result.eps,
        "iters": result.iters,
    }


def _sharded(args: SinkhornBench) -> list[dict]:
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
            x, y = points(n, d, args.seed)
            for backend in args.backends:
                reason = triton_skip("cpu") if backend == "triton" else None
                if reason is not None:  # the ranks run on the CPU
                    rows.append({"n": n, "d": d, "method": f"sdfm {backend}", "skipped": reason})
                    print(f"{n:>6} {d:>4} {'':>5} {'':>6}  {backend:<12} skipped: {reason}")
                    continue
                if backend == "keops":  # compile here once, not in every rank racing for the cache
                    sinkhorn(x[:256], y[:256], SinkhornOptions(backend="keops", max_iter=1))
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
