"""Benchmark suite: named workloads that put sdfm's Sinkhorn and matching beside their peers, with
achieved TFLOP/s, the share of the hardware peak, the error against float64, the ratio to every peer,
and the project's performance goals.

Workloads (``--workload``):

- ``gpu``: Sinkhorn at n = m = 8,192 and 65,536, d = 3,072; matching against N = 50,000 and
  1,281,167 synthetic points (ImageNet's size) at d = 3,072 with B = 256, 1,024, 4,096; one U-Net
  training step at 3x32x32 beside the matching of its batch.
- ``cpu``: the same shape of work scaled down to finish in about 10 minutes on one thread: Sinkhorn
  at n = 1,024 and 4,096, d = 256; matching against N = 20,000 and 200,000 at d = 256 with the same
  B; the training step at 1x16x16.
- ``gpu-check``: the reduced ``gpu`` workload of the one-shot GPU check (``launch/gpu-check.sh``):
  Sinkhorn at n = 65,536, d = 3,072 in every precision (torch and Triton backends) beside GeomLoss
  (KeOps) and flash-sinkhorn; matching of B = 4,096 against N = 1,281,167 at d = 3,072 in fp32 and
  bf16 beside FAISS fp32 / fp16; the training step. A few minutes on an H100.
- ``toy``: a few seconds, for the tests.

Each workload runs the existing benchmarks (``sdfm.bench.sinkhorn.run``, ``sdfm.bench.match.run``,
which print their own rows as they go) and adds to every row:

- achieved TFLOP/s, counting 4 n m d FLOPs per Sinkhorn iteration (the f- and g-update each
  recompute the n x m scores) and 2 B N d per matching batch (docs/design.md §11). POT stores the cost once
  and does not recompute it, so its figure is an effective rate on the same count.
- the share of the hardware peak: on a GPU the dense bf16 tensor-core peak of the device from
  ``GPU_BF16_PEAK`` (H100 SXM 989 TFLOP/s); on a CPU a peak measured at start by a large fp32 torch
  matmul on the same thread count ("measured fp32 GEMM peak").
- the error against float64: Sinkhorn, the largest deviation of the potentials from the same
  iterations in float64, in units of eps; matching, the fraction of answers equal to a float64 brute
  force on the first ``--f64-check`` queries of each batch.
- the ratio to each peer: peer time / sdfm time (above 1: sdfm is faster).

Then it prints the performance goals, each "met", "not met", or "pending (no GPU)" with the measured
ratio, and writes everything to JSON (``--json``, default ``runs/bench/suite-WORKLOAD.json``).

Run: ``sdfm bench suite --workload cpu --threads 1`` (or ``--workload gpu`` on an H100).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from sdfm.bench import match, sinkhorn
from sdfm.bench.common import (
    default_device,
    start_machine,
    sync,
    timed,
    write_json,
)
from sdfm.config import ModelConfig
from sdfm.models.unet import CIFAR10_UNET

GPU_BF16_PEAK = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("GH200", 989e12),
    ("H200", 989e12),  # the H100 SXM's compute with more, faster memory
    ("H100", 989e12),  # SXM
    ("A100", 312e12),
)
"""Dense bf16 tensor-core peak FLOP/s by device name (first substring match wins)."""

SINKHORN_FLOOR_S = 4 * 65536**2 * 3072 / 989e12
"""The bf16 floor of one Sinkhorn iteration at n = m = 65,536, d = 3,072 on an H100 (53 ms)."""
MATCH_FLOOR_S = 2 * 4096 * 1_281_167 * 3072 / 989e12
"""The bf16 floor of one matching batch, B = 4,096 against N = 1,281,167 at d = 3,072 (33 ms)."""


@dataclass(frozen=True)
class TrainStep:
    """One flow-matching training step beside the matching of its batch (goal: matching < 10%).

    Attributes:
        batch: images per step.
        shape: (C, H, W) of one image.
        model: the U-Net (the OT-CFM CIFAR-10 network on the GPU workload).
        n: points the batch is matched against.
    """

    batch: int
    shape: tuple[int, int, int]
    model: ModelConfig
    n: int


@dataclass(frozen=True)
class Workload:
    """The sizes and methods of one named workload."""

    sinkhorn: tuple[tuple[int, int], ...]
    precisions: tuple[str, ...]
    iters: int
    backends: tuple[str, ...]
    peers: tuple[str, ...]
    match_n: tuple[int, ...]
    match_d: int
    match_b: tuple[int, ...]
    match_precisions: tuple[str, ...]
    train: TrainStep
    budget: float
    mem_gb: float
    peak_size: int


def _unet(**kwargs) -> ModelConfig:
    return ModelConfig(kind="unet", **{k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()})


_ALL_SINKHORN = (("torch", "keops", "triton"), ("pot", "geomloss", "flash"))
WORKLOADS = {
    "gpu": Workload(
        sinkhorn=((8192, 3072), (65536, 3072)),
        precisions=("fp32", "tf32", "bf16", "bf16x3"),
        iters=10,
        backends=_ALL_SINKHORN[0],
        peers=_ALL_SINKHORN[1],
        match_n=(50_000, 1_281_167),
        match_d=3072,
        match_b=(256, 1024, 4096),
        match_precisions=("fp32", "bf16"),
        train=TrainStep(batch=256, shape=(3, 32, 32), model=_unet(**CIFAR10_UNET), n=1_281_167),
        budget=60.0,
        mem_gb=64.0,
        peak_size=8192,
    ),
    "gpu-check": Workload(
        sinkhorn=((65536, 3072),),
        precisions=("fp32", "tf32", "bf16", "bf16x3"),
        iters=5,
        backends=("torch", "triton"),
        peers=("geomloss", "flash"),
        match_n=(1_281_167,),
        match_d=3072,
        match_b=(4096,),
        match_precisions=("fp32", "bf16"),
        train=TrainStep(batch=256, shape=(3, 32, 32), model=_unet(**CIFAR10_UNET), n=1_281_167),
        budget=20.0,
        mem_gb=64.0,
        peak_size=8192,
    ),
    "cpu": Workload(
        sinkhorn=((1024, 256), (4096, 256)),
        precisions=("fp32",),  # a CPU has no tensor cores: low precisions would only be emulated
        iters=20,
        backends=_ALL_SINKHORN[0],
        peers=_ALL_SINKHORN[1],
        match_n=(20_000, 200_000),
        match_d=256,
        match_b=(256, 1024, 4096),
        match_precisions=("fp32",),  # 16-bit products are emulated on a CPU: slower, nothing to gain
        train=TrainStep(batch=256, shape=(1, 16, 16), model=_unet(channels=32), n=200_000),
        budget=45.0,
        mem_gb=8.0,
        peak_size=4096,
    ),
    "toy": Workload(  # no KeOps: its first compile alone takes longer than the whole toy run
        sinkhorn=((256, 8),),
        precisions=("fp32", "bf16"),
        iters=5,
        backends=("torch", "triton"),
        peers=("pot", "flash"),
        match_n=(2000,),
        match_d=16,
        match_b=(64,),
        match_precisions=("fp32", "bf16"),
        train=TrainStep(batch=16, shape=(1, 8, 8), model=_unet(channels=8), n=2000),
        budget=5.0,
        mem_gb=1.0,
        peak_size=512,
    ),
}


@dataclass(kw_only=True)
class SuiteBench:
    """Named workloads that put sdfm's Sinkhorn and matching beside their peers, with TFLOP/s, the share
    of the hardware peak, the error against float64, the ratio to every peer, and the goals."""

    workload: Literal["gpu", "gpu-check", "cpu", "toy"] = "cpu"
    """Named sizes (see the module docstring)."""
    device: str = field(default_factory=default_device)
    """cpu or cuda."""
    threads: int = 0
    """torch and FAISS CPU threads (0: their default)."""
    repeats: int = 3
    """Timed runs per measurement (median reported)."""
    budget: float = 0.0
    """Seconds per measurement (0: the workload's)."""
    f64_check: int = 256
    """Matching queries checked against float64."""
    json: Path | None = None
    """Default: runs/bench/suite-WORKLOAD.json."""

    def run(self) -> int:
        """Run the named workload, print the tables and goals, write JSON; returns the exit code."""
        return _main(self)


def device_peak(device: torch.device, size: int) -> tuple[float, str]:
    """(peak FLOP/s, how it was obtained): the bf16 table on CUDA, a measured fp32 GEMM on the CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_BF16_PEAK:
            if key in name:
                return peak, f"bf16 dense peak of {name}: {peak / 1e12:.0f} TFLOP/s (spec table)"
        return math.nan, f"no bf16 peak known for {name} (add it to GPU_BF16_PEAK)"
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(timed(lambda: a @ b)[0] for _ in range(3))
    peak = 2 * size**3 / best
    return peak, (
        f"measured fp32 GEMM peak: {peak / 1e9:.0f} GFLOP/s ({size}^3 torch matmul, best of 3, "
        f"{torch.get_num_threads()} thread(s))"
    )


def _peers_of(rows: list[dict], peers: tuple[str, ...], key: str) -> dict[str, dict]:
    return {r["method"]: r for r in rows if r["method"].split(" ")[0] in peers and key in r}


def _sinkhorn_rows(w: Workload, args: SuiteBench, peak: float) -> list[dict]:
    rows: list[dict] = []
    for n, d in w.sinkhorn:
        options = sinkhorn.SinkhornBench(
            sizes=[n],
            dims=[d],
            iters=w.iters,
            backends=list(w.backends),
            precisions=list(w.precisions),
            peers=list(w.peers),
            budget=args.budget,
            repeats=args.repeats,
            device=args.device,
        )
        group = sinkhorn.run(options)
        sinkhorn_figures(group, n, d, peak)
        rows += group
    return rows


def sinkhorn_figures(group: list[dict], n: int, d: int, peak: float) -> None:
    """Add to the timed rows of one n x n, d-dimensional Sinkhorn size: 'tflops' (an iteration is two
    log-sum-exp passes over the n² costs, each cost a d-dimensional product: 4 n² d flop), 'peak_share'
    of ``peak`` flop/s, and for sdfm rows 'vs_peers' (peer seconds / sdfm seconds: > 1 is faster)."""
    for r in group:
        if "s_per_iter" in r:
            r["tflops"] = 4 * n * n * d / r["s_per_iter"] / 1e12
            r["peak_share"] = r["tflops"] * 1e12 / peak
            if r["method"].startswith("pot"):
                r["flops_note"] = "effective: POT computes the cost once per solve, not per iteration"
    peers = _peers_of(group, ("pot", "geomloss", "flash-sinkhorn"), "s_per_iter")
    for r in group:
        if r["method"].startswith("sdfm") and "s_per_iter" in r:
            r["vs_peers"] = {name: p["s_per_iter"] / r["s_per_iter"] for name, p in peers.items()}


def _match_rows(w: Workload, args: SuiteBench, peak: float) -> list[dict]:
    options = match.MatchBench(
        N=list(w.match_n),
        d=[w.match_d],
        B=list(w.match_b),
        budget=args.budget,
        repeats=args.repeats,
        mem_gb=w.mem_gb,
        device=args.device,
        f64_check=args.f64_check,
        precisions=list(w.match_precisions),
        methods=[m for m in match.METHODS if m != "bf16-raw"],  # a reference of the mismatch, not a peer
    )
    rows = match.run(options)
    match_figures(rows, peak)
    return rows


def match_figures(rows: list[dict], peak: float) -> None:
    """Add to the timed matching rows: 'tflops' (B queries against N keys of d dimensions: 2 B N d
    flop), 'peak_share' of ``peak`` flop/s, and for sdfm rows 'vs_peers' against the peers of the same
    (N, B) cell (peer seconds / sdfm seconds)."""
    for r in rows:
        if "seconds" in r:
            r["tflops"] = 2 * r["B"] * r["N"] * r["d"] / r["seconds"] / 1e12
            r["peak_share"] = r["tflops"] * 1e12 / peak
    for r in rows:
        if r["method"].startswith("sdfm") and "seconds" in r:
            cell = [p for p in rows if (p["N"], p["B"]) == (r["N"], r["B"])]
            peers = _peers_of(cell, match.PEERS, "seconds")
            r["vs_peers"] = {name: p["seconds"] / r["seconds"] for name, p in peers.items()}


def train_step(t: TrainStep, device: torch.device, repeats: int) -> dict:
    """Time one training step of the sdfm U-Net (AdamW; forward and MSE under the device's default
    precision, bf16 autocast on CUDA; backward, update) and the matching of its batch
    (``MatchIndex(backend='torch')`` against t.n synthetic points): the share of a step spent
    matching, if the coupling ran in the step (as ``Trainer.train_step`` does)."""
    from sdfm import amp
    from sdfm.models import build_model
    from sdfm.semidiscrete import MatchIndex

    gen = torch.Generator().manual_seed(0)
    precision = amp.resolve_precision("auto", device)
    model = build_model(t.model, t.shape, 0).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x0 = torch.randn(t.batch, *t.shape, generator=gen).to(device)
    x1 = torch.randn(t.batch, *t.shape, generator=gen).to(device)
    tt = torch.rand(t.batch, generator=gen).to(device)

    def step() -> None:
        xt = (1 - tt.view(-1, 1, 1, 1)) * x0 + tt.view(-1, 1, 1, 1) * x1
        with amp.autocast(precision, device):
            loss = torch.nn.functional.mse_loss(model(tt, xt).float(), x1 - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    dim = math.prod(t.shape)
    index = MatchIndex(torch.randn(t.n, dim, generator=gen).to(device))
    index.set_potential(torch.randn(t.n, generator=gen).to(device))
    timings = {}
    for name, fn in (("step_s", step), ("match_s", lambda: index.search(x0.flatten(1)))):
        fn()
        sync(device)
        timings[name] = statistics.median(timed(fn, device)[0] for _ in range(repeats))
    share = timings["match_s"] / (timings["match_s"] + timings["step_s"])
    params = sum(p.numel() for p in model.parameters())
    info = {"params": params, "match_share": share, "device": str(device), "precision": precision}
    return asdict(t) | timings | info


def _best(rows: list[dict], key: str, **where) -> dict | None:
    hits = [
        r
        for r in rows
        if r["method"].startswith("sdfm") and key in r and all(r[k] == v for k, v in where.items())
    ]
    return min(hits, key=lambda r: r[key], default=None)


def _peer(rows: list[dict], prefix: str, key: str, **where) -> dict | None:
    hits = [
        r
        for r in rows
        if r["method"].startswith(prefix) and key in r and all(r[k] == v for k, v in where.items())
    ]
    return hits[0] if hits else None


def goals(workload: str, device: torch.device, sk: list[dict], mt: list[dict], train: dict) -> list[dict]:
    """The performance goals, each with status 'met', 'not met' or 'pending (...)' and the measurement."""
    on_gpu = workload in ("gpu", "gpu-check") and device.type == "cuda"
    out: list[dict] = []

    def add(goal: str, ok: bool | None, measured: str, pending: str = "pending (no GPU)") -> None:
        status = pending if ok is None else ("met" if ok else "not met")
        out.append({"goal": goal, "status": status, "measured": measured})

    def gpu_goal(goal: str, compute) -> None:
        if not on_gpu:
            return add(goal, None, "-")
        ok, measured = compute()
        add(goal, ok, measured, pending="not measured")

    def sinkhorn_floor():
        best = _best(sk, "s_per_iter", n=65536, d=3072)
        if best is None:
            return None, "no sdfm row ran"
        r = best["s_per_iter"] / SINKHORN_FLOOR_S
        return r <= 2, f"{best['method']} {1e3 * best['s_per_iter']:.0f} ms = {r:.2f}x the floor"

    def sinkhorn_keops():
        best, keops = _best(sk, "s_per_iter", n=65536, d=3072), _peer(sk, "geomloss", "s_per_iter", n=65536)
        if best is None or keops is None:
            return None, "KeOps (GeomLoss) or sdfm did not run"
        r = keops["s_per_iter"] / best["s_per_iter"]
        return r >= 10, f"GeomLoss/KeOps per iteration {r:.1f}x {best['method']}"

    def match_floor():
        best = _best(mt, "seconds", N=1_281_167, B=4096)
        if best is None:
            return None, "no sdfm row ran"
        r = best["seconds"] / MATCH_FLOOR_S
        return r <= 2, f"{best['method']} {1e3 * best['seconds']:.0f} ms = {r:.2f}x the floor"

    def match_faiss():
        best, faiss = (
            _best(mt, "seconds", N=1_281_167, B=4096),
            _peer(mt, "faiss-flat", "seconds", N=1_281_167, B=4096),
        )
        if best is None or faiss is None:
            return None, "FAISS fp32 or sdfm did not run"
        r = faiss["seconds"] / best["seconds"]
        return r >= 3, f"FAISS fp32 flat {r:.1f}x {best['method']} (FAISS on {faiss['where']})"

    def train_share():
        return train["match_share"] < 0.10, f"matching {100 * train['match_share']:.1f}% of a step"

    gpu_goal("GPU: Sinkhorn iteration n=65,536, d=3,072 within 2x of the bf16 floor (53 ms)", sinkhorn_floor)
    gpu_goal("GPU: Sinkhorn iteration at that size at least 10x faster than KeOps", sinkhorn_keops)
    gpu_goal("GPU: matching N=1.28M, d=3,072, B=4,096 within 2x of its floor (33 ms)", match_floor)
    gpu_goal("GPU: that matching at least 3x faster than FAISS fp32 flat search", match_faiss)
    gpu_goal("GPU: an SD-FM training step spends under 10% of its time matching", train_share)

    if workload.startswith("gpu") or device.type == "cuda":
        return out
    # CPU: every sdfm backend that ran against the best peer on the same workload cell.
    cells = [(r["n"], r["d"]) for r in sk]
    for n, d in dict.fromkeys(cells):
        group = [r for r in sk if (r["n"], r["d"]) == (n, d)]
        _cpu_goal(add, f"CPU: Sinkhorn n={n}, d={d}", group, "s_per_iter")
    for n, b in dict.fromkeys((r["N"], r["B"]) for r in mt):
        group = [r for r in mt if (r["N"], r["B"]) == (n, b)]
        _cpu_goal(add, f"CPU: matching N={n}, d={group[0]['d']}, B={b}", group, "seconds")
    return out


def _cpu_goal(add, label: str, group: list[dict], key: str) -> None:
    peers = [r for r in group if not r["method"].startswith("sdfm") and key in r]
    mine = [r for r in group if r["method"].startswith("sdfm") and key in r]
    if not peers or not mine:
        return add(f"{label}: no sdfm backend slower than the best peer", False, "nothing to compare")
    best = min(peers, key=lambda r: r[key])
    parts = [f"{match.label(r['method'], r.get('precision', ''))} {best[key] / r[key]:.2f}x" for r in mine]
    ok = all(r[key] <= best[key] for r in mine)
    measured = f"vs best peer {best['method']}: " + ", ".join(parts)
    skipped = [r["method"] for r in group if r["method"].startswith("sdfm") and "skipped" in r]
    if skipped:
        measured += f" ({', '.join(skipped)} skipped)"
    add(f"{label}: no sdfm backend slower than the best peer", ok, measured)


def _ratio_text(r: dict, peers: tuple[str, ...]) -> str:
    out = []
    for p in peers:
        match_ = [v for k, v in r.get("vs_peers", {}).items() if k.startswith(p)]
        out.append(f"{match_[0]:>10.2f}" if match_ else f"{'':>10}")
    return " ".join(out)


def _print_tables(
    sk: list[dict], mt: list[dict], train: dict, goal_rows: list[dict], peak_label: str
) -> None:
    print(f"\n== Sinkhorn (peak: {peak_label}; TFLOP/s = 4 n m d per iteration / time)")
    peers = ("pot", "geomloss", "flash")
    head = f"{'n':>6} {'d':>5}  {'method':<31} {'ms/iter':>9} {'TFLOP/s':>8} {'%peak':>6} {'f64 dev':>8}"
    head += f" {'L1 err':>8} {'cpu':>4} " + " ".join(f"{'x ' + p:>10}" for p in peers)
    print(head + "\n" + "-" * len(head))
    for r in sk:
        lead = f"{r['n']:>6} {r['d']:>5}  {r['method']:<31}"
        if "skipped" in r:
            print(f"{lead} skipped: {r['skipped']}")
            continue
        dev = f"{r['f64_dev']:>8.1e}" if "f64_dev" in r else f"{'n/a':>8}"
        print(
            f"{lead} {1e3 * r['s_per_iter']:>9.2f} {r['tflops']:>8.4f}{'*' if 'flops_note' in r else ' '}"
            f"{100 * r['peak_share']:>5.1f}% {dev} "
            f"{max(r['row_err'], r['col_err']):>8.1e} {r['cpu_util']:>4.1f} {_ratio_text(r, peers)}"
        )
    print("* effective rate: POT computes the n x m cost once per solve and does not recompute it")
    print(f"\n== Matching (peak: {peak_label}; TFLOP/s = 2 B N d per batch / time)")
    head = f"{'N':>9} {'d':>5} {'B':>5}  {'method':<16} {'where':>5} {'ms/batch':>9} {'queries/s':>9} {'TFLOP/s':>8}"
    head += f" {'%peak':>6} {'f64':>6} {'cpu':>4} " + " ".join(f"{'x ' + p:>12}" for p in match.PEERS)
    print(head + "\n" + "-" * len(head))
    for r in mt:
        lead = f"{r['N']:>9} {r['d']:>5} {r['B']:>5}  {match.label(r['method'], r.get('precision', '')):<16}"
        if "skipped" in r:
            print(f"{lead} skipped: {r['skipped']}")
            continue
        ratios = " ".join(
            f"{r['vs_peers'][p]:>12.2f}" if p in r.get("vs_peers", {}) else f"{'':>12}" for p in match.PEERS
        )
        f64 = f"{r['f64_agree']:.4f}" if "f64_agree" in r else ""
        print(
            f"{lead} {r['where']:>5} {1e3 * r['seconds']:>9.1f} {r['queries_per_s']:>9.0f} {r['tflops']:>8.4f} "
            f"{100 * r['peak_share']:>5.1f}% {f64:>6} {r['cpu_util']:>4.1f} {ratios}"
        )
    print(
        f"\n== Training step: U-Net {train['shape']} channels {train['model']['channels']} ({train['params']:,} params, "
        f"{train['precision']}), batch {train['batch']} on {train['device']}: step {1e3 * train['step_s']:.0f} ms, matching against "
        f"N={train['n']:,} {1e3 * train['match_s']:.0f} ms -> {100 * train['match_share']:.1f}% of step + matching"
    )
    print("\n== Goals")
    width = max(len(g["goal"]) for g in goal_rows)
    for g in goal_rows:
        print(f"{g['goal']:<{width}}  {g['status']:<16}  {g['measured']}")


def _main(options: SuiteBench) -> int:
    w = WORKLOADS[options.workload]
    args = dataclasses.replace(options, budget=options.budget or w.budget)
    device = torch.device(args.device)
    machine = start_machine(args.threads, device=str(device))
    start = time.perf_counter()
    peak, peak_label = device_peak(device, w.peak_size)
    print(f"workload {args.workload}: {peak_label}")
    sk = _sinkhorn_rows(w, args, peak)
    mt = _match_rows(w, args, peak)
    train = train_step(w.train, device, args.repeats)
    goal_rows = goals(args.workload, device, sk, mt, train)
    _print_tables(sk, mt, train, goal_rows, peak_label)
    elapsed = time.perf_counter() - start
    print(f"\nsuite {args.workload}: {elapsed:.0f} s")
    path = args.json or Path("runs/bench") / f"suite-{args.workload}.json"
    write_json(
        path,
        machine,
        args,
        workload=asdict(w),
        peak_flops=peak,
        peak=peak_label,
        sinkhorn=sk,
        match=mt,
        train_step=train,
        goals=goal_rows,
        seconds=elapsed,
    )
    return 0
