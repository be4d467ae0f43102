"""Benchmark: time per Sinkhorn iteration and marginal error, sdfm beside POT, GeomLoss and
flash-sinkhorn.

For each (n, d), the same data (x ~ N(0, I), y ~ N(1, I/4), n = m) and the same absolute
eps = epsilon * std(C) with C = 0.5 |x - y|^2:

- sdfm torch / keops / triton: ``sinkhorn`` with a fixed iteration count (tol = 0 never stops early).
  The timed call includes computing std(C) and the final marginal check (half an iteration). The
  triton backend runs on CUDA; elsewhere its row is skipped with the reason (Triton's CPU interpreter
  is far too slow to time).
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

Sharded (``--ranks 1,2``): instead of the comparison above, the sharded solver
(``sdfm.distributed.sinkhorn.sharded_sinkhorn``) runs on R local gloo CPU ranks for each requested R,
each rank holding n/R rows and all m columns, with ``--threads`` (default: all cores) divided between
the ranks (at least one each). Rows report the time per iteration (the slowest rank's wall time of a
solve over its iterations, median of the repeats), the share of it that the ranks spent inside
collectives (mean over ranks; it includes waiting for a slower rank), the time to all-gather the
columns once (per batch, not per iteration), and the speed-up over the 1-rank row.

Run: ``sdfm bench sinkhorn --sizes 1024,4096 --dims 2,64`` (or call ``main(argv)``), or
``sdfm bench sinkhorn --sizes 4096 --dims 64 --backends torch --ranks 1,2``.
"""

from __future__ import annotations

import argparse
import importlib.util
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

from sdfm.bench.common import int_list, machine_info, name_list, set_threads, timed, triton_skip, write_json
from sdfm.couplings.sinkhorn import cost_std, marginal_errors, sinkhorn
from sdfm.errors import UserError

Solve = Callable[[int], tuple[Tensor, Tensor, int]]
"""A method bound to its data: iteration budget -> (f (n,), g (m,), iterations it ran)."""

BACKENDS = ("torch", "keops", "triton")
PEERS = ("pot", "geomloss", "flash")


@dataclass
class Method:
    """A solver under test: ``make(x, y)`` binds it to data; ``fixed_iters`` if it obeys the budget;
    ``f64`` names its float64 reference ('sdfm': ``reference_sinkhorn``, 'self': the method itself on
    float64 inputs, None: none); ``unavailable`` says why it cannot run here."""

    name: str
    make: Callable[[Tensor, Tensor], Solve]
    fixed_iters: bool
    f64: str | None = "self"
    unavailable: str | None = None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sdfm bench sinkhorn", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int_list, default=[1024, 4096], help="comma-separated n (= m)")
    p.add_argument("--dims", type=int_list, default=[2, 64], help="comma-separated dimensions d")
    p.add_argument("--iters", type=int, default=20, help="Sinkhorn iterations per timed run")
    p.add_argument("--epsilon", type=float, default=0.05, help="epsilon relative to std(C)")
    p.add_argument(
        "--backends", type=name_list, default=list(BACKENDS), help="sdfm backends: " + ", ".join(BACKENDS)
    )
    p.add_argument("--peers", type=name_list, default=list(PEERS), help=", ".join(PEERS) + " or none")
    p.add_argument("--scaling", type=float, default=0.7, help="GeomLoss eps-scaling factor")
    p.add_argument("--block-size", type=int, default=4096, help="block size of the sdfm torch backend")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per method (median reported)")
    p.add_argument("--budget", type=float, default=30.0, help="seconds of timed runs per method and size")
    p.add_argument("--probe", type=int, default=0, help="points of the probe run (0: 1024, 8192 on CUDA)")
    p.add_argument("--no-f64", action="store_true", help="skip the float64 reference (the f64 dev column)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
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


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The benchmark's options (see ``sdfm bench sinkhorn --help``), checked."""
    args = _parser().parse_args(argv)
    bad = [b for b in args.backends if b not in BACKENDS] + [
        p for p in args.peers if p not in (*PEERS, "none")
    ]
    if bad:
        raise UserError(f"unknown --backends/--peers {bad}; choose from {BACKENDS} and {PEERS}")
    return args


def _sdfm(epsilon: float, backend: str, block_size: int, device: torch.device) -> Method:
    def make(x: Tensor, y: Tensor) -> Solve:
        def solve(iters: int) -> tuple[Tensor, Tensor, int]:
            r = sinkhorn(
                x, y, epsilon=epsilon, backend=backend, max_iter=iters, tol=0.0, block_size=block_size
            )
            return r.f, r.g, r.iters

        return solve

    reason = triton_skip(device) if backend == "triton" else None
    return Method(f"sdfm {backend}", make, fixed_iters=True, f64="sdfm", unavailable=reason)


def reference_sinkhorn(x: Tensor, y: Tensor, epsilon: float, iters: int, block: int = 4096) -> tuple:
    """sdfm's iteration in float64: eps = epsilon * std(C), zero potentials, then ``iters`` times an
    f-update and a g-update, blocked like the torch backend (``sinkhorn`` itself computes in fp32).

    Returns:
        (f (n,), g (m,), iters) float64, as a ``Solve`` does.
    """
    eps = epsilon * cost_std(x, y)
    x, y = x.double(), y.double()
    shift = y.mean(0)  # the cost is translation invariant; small norms keep the expansion accurate
    xs, ys = (x - shift) / math.sqrt(eps), (y - shift) / math.sqrt(eps)
    hx, hy = 0.5 * xs.square().sum(1), 0.5 * ys.square().sum(1)

    def lse(a: Tensor, b: Tensor, h: Tensor) -> Tensor:  # log sum_j exp(h_j + <a_i, b_j>)
        out = a.new_empty(a.shape[0])
        for i0 in range(0, a.shape[0], block):
            s = torch.cat(
                [
                    torch.addmm(h[j : j + block], a[i0 : i0 + block], b[j : j + block].T).logsumexp(
                        1, keepdim=True
                    )
                    for j in range(0, b.shape[0], block)
                ],
                1,
            )
            out[i0 : i0 + block] = s.logsumexp(1)
        return out

    F, G = xs.new_zeros(xs.shape[0]), ys.new_zeros(ys.shape[0])
    for _ in range(iters):
        F = math.log(ys.shape[0]) - (lse(xs, ys, G - hy) - hx)
        G = math.log(xs.shape[0]) - (lse(ys, xs, F - hx) - hy)
    return F * eps, G * eps, iters


def _missing(module: str, package: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return f"not installed (pip install {package})"
    return None


def _pot(eps: float) -> Method:
    name = "pot sinkhorn_log"
    if reason := _missing("ot", "pot"):
        return Method(name, lambda x, y: None, fixed_iters=True, unavailable=reason)
    import ot

    def make(x: Tensor, y: Tensor) -> Solve:
        n, m = x.shape[0], y.shape[0]
        a = torch.full((n,), 1 / n, dtype=x.dtype, device=x.device)
        b = torch.full((m,), 1 / m, dtype=x.dtype, device=x.device)

        def solve(iters: int) -> tuple[Tensor, Tensor, int]:
            cost = 0.5 * torch.cdist(x, y).square()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "did not converge": expected with a fixed budget
                _, log = ot.bregman.sinkhorn_log(a, b, cost, eps, numItermax=iters, stopThr=0.0, log=True)
            # POT's plan is exp(u_i + v_j - C_ij / eps) = a_i b_j exp((f_i + g_j - C_ij) / eps).
            return eps * (log["log_u"] - a.log()), eps * (log["log_v"] - b.log()), iters

        return solve

    return Method(name, make, fixed_iters=True)


def _geomloss(eps: float, scaling: float, x: Tensor, y: Tensor) -> Method:
    if reason := _missing("geomloss", "geomloss pykeops"):
        return Method("geomloss", lambda x, y: None, fixed_iters=False, unavailable=reason)
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


def _flash(eps: float, device: torch.device) -> Method:
    name = "flash-sinkhorn"
    if reason := _missing("flash_sinkhorn", "flash-sinkhorn"):
        return Method(name, lambda x, y: None, fixed_iters=True, f64=None, unavailable=reason)
    if device.type != "cuda":
        from importlib.metadata import version

        reason = (
            f"needs CUDA (flash-sinkhorn {version('flash-sinkhorn')} is installed; its kernels are CUDA-only)"
        )
        return Method(name, lambda x, y: None, fixed_iters=True, f64=None, unavailable=reason)
    from flash_sinkhorn import SamplesLoss

    def make(x: Tensor, y: Tensor) -> Solve:
        def solve(iters: int) -> tuple[Tensor, Tensor, int]:
            loss = SamplesLoss(
                "sinkhorn",
                backend="alternating",
                use_epsilon_scaling=False,
                eps=eps,
                n_iters=iters,
                half_cost=True,  # C = |x - y|^2 / 2, as here
                potentials=True,
                debias=False,
            )
            f, g = loss(x, y)
            return f.view(-1), g.view(-1), iters

        return solve

    return Method(name, make, fixed_iters=True, f64=None)


def methods(args: argparse.Namespace, x: Tensor, y: Tensor, eps: float) -> list[Method]:
    """The sdfm backends and peers that ``args`` asks for, bound to eps (absolute) on (x, y)."""
    device = torch.device(args.device)
    out = [_sdfm(args.epsilon, backend, args.block_size, device) for backend in args.backends]
    if "pot" in args.peers:
        out.append(_pot(eps))
    if "geomloss" in args.peers:
        out.append(_geomloss(eps, args.scaling, x, y))
    if "flash" in args.peers:
        out.append(_flash(eps, device))
    return out


def _probe_size(args: argparse.Namespace, n: int) -> int:
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


def _measure(method: Method, x: Tensor, y: Tensor, eps: float, args: argparse.Namespace, cache: dict) -> dict:
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


def _timings(method: Method, x: Tensor, y: Tensor, eps: float, args: argparse.Namespace, cache: dict) -> dict:
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


def run(args: argparse.Namespace) -> list[dict]:
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
            gen = torch.Generator().manual_seed(args.seed)
            x = torch.randn(n, d, generator=gen).to(device)
            y = (0.5 * torch.randn(n, d, generator=gen) + 1.0).to(device)
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
                reason = triton_skip("cpu") if backend == "triton" else None
                if reason is not None:  # the ranks run on the CPU
                    rows.append({"n": n, "d": d, "method": f"sdfm {backend}", "skipped": reason})
                    print(f"{n:>6} {d:>4} {'':>5} {'':>6}  {backend:<12} skipped: {reason}")
                    continue
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
    args = parse_args(argv)
    set_threads(args.threads)
    machine = machine_info() | {"device": args.device}
    print("machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()))
    if args.ranks:
        if min(args.ranks) < 1:
            raise UserError(f"--ranks must be positive rank counts, got {args.ranks}")
        print(
            f"sharded sdfm sinkhorn on local gloo CPU ranks: epsilon={args.epsilon} (relative), "
            f"iters={args.iters}, repeats<={args.repeats}, budget={args.budget:g} s, "
            f"block_size={args.block_size}, sqeuclidean cost, fp32"
        )
        rows = _sharded(args)
    else:
        rows = run(args)
    if args.json is not None:
        write_json(args.json, machine, args, rows=rows)
    return 0
