"""Benchmark: matching throughput (queries/s) of MatchIndex beside plain FAISS and plain torch, and
the cost of applying a new potential.

For each (N, d): synthetic data y ~ N(0, I) (N, d) and a random potential g; for each B: queries
x ~ N(0, I) (B, d). Methods, all exact (flat) searches:

- ``sdfm-torch``: ``MatchIndex(backend='torch')``: chunked matmul + fp32 bias + running argmax, once
  per ``--precisions`` entry: fp32, or bf16 / fp16 top-``--candidates`` candidates rescored in float64
  (the answer certified exact; the ``fallback`` column is the share of queries searched again
  because their candidates could not be certified).
- ``sdfm-faiss``: ``MatchIndex(backend='faiss')``: ``IndexFlatIP`` over [y ; g], queries [x ; 1].
- ``sdfm-triton``: ``MatchIndex(backend='triton')``: the fused kernel ``sdfm.kernels.argmax`` (CUDA;
  skipped elsewhere with the reason, since Triton's CPU interpreter is far too slow to time).
- ``faiss-flat``: a plain ``IndexFlatIP`` over y, fp32, no bias (what the bias costs): a
  ``GpuIndexFlatIP`` on CUDA when faiss has GPU support, else the CPU index (the ``where`` column).
- ``faiss-fp16``: FAISS's fp16 flat search, no bias: on the GPU ``GpuIndexFlatIP`` with
  ``GpuIndexFlatConfig.useFloat16``; on the CPU, where ``IndexFlatIP`` has no fp16 storage,
  ``IndexScalarQuantizer(d, ScalarQuantizer.QT_fp16, METRIC_INNER_PRODUCT)`` (vectors stored as
  fp16 and decoded during a scan; an exact search of the fp16-rounded vectors, not a GEMM).
- ``torch-matmul``: ``(x @ y.T).argmax(1)`` in one piece, no bias (a (B, N) score matrix).
- ``bf16-raw``: the argmax of bf16 products plus the fp32 bias, with no rescoring: what a 16-bit
  search answers without a certificate (its ``f64`` column is the mismatch that rescoring removes).

``--data``: ``gaussian`` (y ~ N(0, I) (N, d) and g ~ N(0, 1), the grid of ``--N`` x ``--d``) or real
images, ``digits`` (N = 1,797, d = 64) or ``fashion-mnist`` (the 60,000 training images, d = 784),
flattened in [-1, 1], a random subset of each ``--N`` (the whole set when N is larger), with
g_j = -|y_j|^2 / 2 (nearest-neighbour matching). ``--fit-seconds S`` replaces g by a potential
fitted for S seconds: its cells have nearly equal mass, so many scores are close, as in training.
The queries are always noise, x ~ N(0, I) (B, d).

Columns: ms per batch and queries/s (median of up to ``--repeats`` calls after one warm-up call,
fewer when they would exceed ``--budget`` seconds; a warm-up call longer than half the budget is the
only measurement), the CPU/wall ratio of the timed calls (busy cores: ~1.0 under ``--threads 1``),
``f64`` = the fraction of the first ``--f64-check`` queries whose answer equals a float64 brute force
(with the bias g for the sdfm methods, without it for the bias-free ones), and the agreement of each
sdfm method's answer with sdfm-torch's. ``refresh ms`` is the cost of applying a new g:
``set_potential`` for the sdfm backends (a copy into the bias vector; a strided in-place write into
the FAISS index's stored vectors), and for ``faiss-flat`` / ``faiss-fp16`` the rebuild (reset + add of
[y ; g]) that an index without an editable bias would need.

A combination is skipped, with the reason printed, when its memory estimate (points, index copy,
score matrix) exceeds ``--mem-gb``, or one call is predicted to take longer than ``--budget`` seconds
(from a calibration matmul; for the CPU fp16 scan, which is not a GEMM, from a 64-query probe).

``--threads`` pins torch's and FAISS's thread pools (FAISS has its own OpenMP runtime).

Run: ``sdfm bench match`` (N = 60,000, a few minutes on 2 cores); the full grid is
``sdfm bench match --N 60000 1000000 --d 64 784 --B 256 4096`` (on a CPU, N = 10^6 at d = 784 with
B = 4,096 is about 6 TFLOP per call and is skipped by the default budget; raise ``--budget``).
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from sdfm.bench.common import (
    default_device,
    start_machine,
    sync,
    timed,
    triton_skip,
    write_json,
)
from sdfm.bench.peers import PlainIndex
from sdfm.memory import require_memory
from sdfm.semidiscrete import FitterOptions, MatchIndex, PotentialFitter
from sdfm.semidiscrete.backends import TorchBlock

METHODS = ("sdfm-torch", "sdfm-faiss", "sdfm-triton", "faiss-flat", "faiss-fp16", "torch-matmul", "bf16-raw")
PEERS = ("faiss-flat", "faiss-fp16", "torch-matmul")
MethodName = Literal[
    "sdfm-torch", "sdfm-faiss", "sdfm-triton", "faiss-flat", "faiss-fp16", "torch-matmul", "bf16-raw"
]
BIASED = ("sdfm-torch", "sdfm-faiss", "sdfm-triton", "bf16-raw")
"""Methods that search with the potential (their f64 reference includes g)."""


@dataclass(kw_only=True)
class MatchBench:
    """Matching throughput of MatchIndex beside plain FAISS and plain torch, and the cost of applying
    a new potential."""

    N: list[int] = field(default_factory=lambda: [60000])
    """Numbers of points."""
    d: list[int] = field(default_factory=lambda: [64, 784])
    """Dimensions."""
    B: list[int] = field(default_factory=lambda: [256, 4096])
    """Query batch sizes."""
    methods: list[MethodName] = field(default_factory=lambda: list(METHODS))
    """Methods to time."""
    data: Literal["gaussian", "digits", "fashion-mnist"] = "gaussian"
    """Points: synthetic N(0, I) with a random g, or real images with g = -|y|^2/2 (d is theirs)."""
    precisions: list[Literal["fp32", "bf16", "fp16"]] = field(default_factory=lambda: ["fp32", "bf16"])
    """Key precisions of sdfm-torch (and of sdfm-faiss on a GPU); 16-bit answers are rescored exactly."""
    candidates: int = 16
    """Top-k candidates of a 16-bit sdfm search."""
    fit_seconds: float = 0.0
    """Replace g by a potential fitted for this many seconds (sdfm's default fitter): balanced cells,
    whose many near-ties are what a trainer's matching meets (0: g as described above)."""
    repeats: int = 3
    """Timed calls per measurement (median reported)."""
    budget: float = 20.0
    """Seconds per measurement; longer calls are skipped."""
    mem_gb: float = 8.0
    """Skip combinations estimated to need more memory."""
    chunk_size: int = 8192
    """MatchIndex(torch) rows per chunk."""
    f64_check: int = 256
    """Queries checked against a float64 brute force (0: none)."""
    device: str = field(default_factory=default_device)
    """cpu or cuda."""
    threads: int = 0
    """torch and FAISS CPU threads (0: their default)."""
    seed: int = 0
    """Seed of the synthetic data."""
    json: Path | None = None
    """Write all rows to this JSON file."""

    def run(self) -> int:
        """Run the benchmark, print a table, optionally write JSON; returns the exit code."""
        machine = start_machine(self.threads, device=self.device)
        rows = run(self)
        if self.json is not None:
            write_json(self.json, machine, self, rows=rows)
        return 0


def _calibrate(device: torch.device) -> float:
    """FLOP/s of a mid-sized fp32 matmul here, for predicting which calls would exceed the budget."""
    a = torch.randn(1024, 512, device=device)
    b = torch.randn(512, 4096, device=device)
    a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(3):
        a @ b
    sync(device)
    return 3 * 2 * 1024 * 512 * 4096 / (time.perf_counter() - start)


def _memory_gb(method: str, n: int, d: int, b: int, chunk: int) -> float:
    """Rough peak bytes beyond the points themselves, in GB."""
    extra = {
        "sdfm-torch": 4 * b * chunk * 2,
        "sdfm-faiss": 8 * n * (d + 1),  # host array [y ; g] and the index's own copy while adding
        "sdfm-triton": 4 * n * d,  # keys in the compute dtype
        "faiss-flat": 4 * n * d + 4 * n * (d + 1),  # the index, and the rebuild of [y ; g]
        "faiss-fp16": 2 * n * d + 4 * n * (d + 1) + 2 * n * (d + 1),  # codes, the rebuild's input and codes
        "torch-matmul": 4 * b * n,
        "bf16-raw": 2 * n * d + 4 * b * chunk,
    }[method]
    return (4 * n * d + extra) / 2**30


def unavailable(method: str, device: torch.device) -> str | None:
    """Why ``method`` cannot run here (one line), or None."""
    if method == "sdfm-triton":
        return triton_skip(device)
    if "faiss" in method:
        try:
            import faiss  # noqa: F401
        except ImportError:
            return "not installed (pip install faiss-cpu, or a faiss GPU build)"
    return None


def _time_calls(fn, device: torch.device, repeats: int, budget: float) -> tuple[list[float], float, Tensor]:
    """Wall seconds of up to ``repeats`` calls after a warm-up (first-call allocation, thread pools),
    the median CPU/wall ratio, and the last call's answer. A warm-up longer than half the budget is
    the only measurement."""
    warm, warm_util, out = timed(fn, device)
    if warm > budget / 2:
        return [warm], warm_util, out
    times, utils = [], []
    while len(times) < repeats and (not times or sum(times) + times[-1] <= budget):
        seconds, util, out = timed(fn, device)
        times.append(seconds)
        utils.append(util)
    return times, statistics.median(utils), out


def f64_argmax(x: Tensor, y: Tensor, g: Tensor | None, chunk: int = 1 << 16) -> Tensor:
    """argmax_j <x_i, y_j> (+ g_j) in float64 on x's device, in chunks of y (for large N on a GPU)."""
    x64 = x.double()
    best = torch.full((x.shape[0],), -torch.inf, dtype=torch.float64, device=x.device)
    arg = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    for start in range(0, y.shape[0], chunk):
        scores = x64 @ y[start : start + chunk].double().T
        if g is not None:
            scores += g[start : start + chunk].double()
        value, pos = scores.max(1)
        better = value > best
        best = torch.where(better, value, best)
        arg = torch.where(better, pos + start, arg)
    return arg.cpu()


def _predicted_seconds(method: str, search, x: Tensor, n: int, d: int, flops: float) -> float:
    """One call's predicted time: from the calibration matmul, or for the CPU fp16 scan (no GEMM) from
    a probe of 64 queries, scaled by the batch size."""
    if method == "faiss-fp16" and x.device.type != "cuda":
        k = min(64, x.shape[0])
        return timed(lambda: search(x[:k]))[0] * x.shape[0] / k
    return 2 * x.shape[0] * n * d / flops


def _problems(args: MatchBench):
    """Yield (y (N, d), g (N,), {B: queries (B, d)}) on the bench device for each point set of the grid."""
    device = torch.device(args.device)
    if args.data == "gaussian":
        for n in args.N:
            for d in args.d:
                require_memory(2 * 4.0 * n * (d + 1), f"--N {n} at d = {d}", "bench fewer points")
                gen = torch.Generator().manual_seed(args.seed)
                y, g = torch.randn(n, d, generator=gen), torch.randn(n, generator=gen)
                queries = {b: torch.randn(b, d, generator=gen).to(device) for b in args.B}
                yield y.to(device), g.to(device), queries
        return
    from sdfm.data import files

    images = files.load_digits()[0] if args.data == "digits" else files.load_fashion_mnist("train")[0]
    points = images.flat().dense()
    for n in sorted({min(n, len(points)) for n in args.N}):
        gen = torch.Generator().manual_seed(args.seed)
        keep = torch.randperm(len(points), generator=gen)[:n].sort().values
        y = points[keep].contiguous()
        queries = {b: torch.randn(b, y.shape[1], generator=gen).to(device) for b in args.B}
        yield y.to(device), (-0.5 * (y * y).sum(1)).to(device), queries


def _variants(method: str, args: MatchBench, device: torch.device) -> list[str]:
    """The precisions ``method`` runs in: each of ``--precisions`` for the indexes that rescore 16-bit
    candidates (sdfm-torch; sdfm-faiss on a GPU), '' for the others."""
    if method == "sdfm-torch" or (method == "sdfm-faiss" and device.type == "cuda"):
        return list(dict.fromkeys(args.precisions))
    return ["fp32"] if method.startswith("sdfm") else [""]


def _fitted(y: Tensor, seconds: float, seed: int) -> Tensor:
    """A potential for y fitted for ``seconds`` by the default ``PotentialFitter``."""
    fitter = PotentialFitter(y, FitterOptions(seed=seed))
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        fitter.step()
    print(f"potential: {fitter.t} steps of {fitter.method} in {seconds:g} s")
    return fitter.potential()


def run(args: MatchBench) -> list[dict]:
    """Run the grid of ``args``, printing one line per row; returns the rows."""
    device = torch.device(args.device)
    flops = _calibrate(device)
    print(
        f"calibration: {flops / 1e9:.0f} GFLOP/s fp32 matmul; budget {args.budget:g} s, mem {args.mem_gb:g} GB; "
        f"data {args.data}"
    )
    header = (
        f"{'N':>8} {'d':>4} {'B':>5}  {'method':<16} {'where':>5} {'ms/batch':>9} {'queries/s':>10} "
        f"{'refresh ms':>10} {'cpu':>4} {'f64':>6} {'agree':>6} {'fallback':>8}"
    )
    print(header)
    print("-" * len(header))
    rows: list[dict] = []
    for y, g, queries in _problems(args):
        n, d = y.shape
        if args.fit_seconds > 0:
            g = _fitted(y, args.fit_seconds, args.seed)
        answers: dict[int, Tensor] = {}
        references: dict[tuple[int, bool], Tensor] = {}
        for method in args.methods:
            for precision in _variants(method, args, device):
                cells = [
                    {"N": n, "d": d, "B": b, "method": method, "precision": precision, "data": args.data}
                    for b in args.B
                ]
                reason = unavailable(method, device)
                if reason is not None:
                    rows += [_skip(row, reason) for row in cells]
                    continue
                fits = []
                for row in cells:
                    need = _memory_gb(method, n, d, row["B"], args.chunk_size)
                    if need > args.mem_gb:
                        rows.append(_skip(row, f"needs ~{need:.1f} GB > --mem-gb {args.mem_gb:g}"))
                    else:
                        fits.append(row)
                if not fits:
                    continue
                try:
                    _method_rows(method, precision, fits, y, g, queries, answers, references, flops, args)
                except (RuntimeError, MemoryError) as error:  # a GPU index out of memory, say
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    reason = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
                    for row in fits:
                        if "seconds" not in row and "skipped" not in row:
                            _skip(row, reason)
                rows += fits
                gc.collect()
        del y, g, queries
        gc.collect()
    return rows


class RawLowPrecision:
    """``bf16-raw``: the best candidate of sdfm's bf16 scores (bf16 products, fp32 accumulation and
    bias), taken as the answer without the float64 rescoring that certifies it."""

    def __init__(self, y: Tensor, chunk_size: int):
        self.block = TorchBlock(y, chunk_size, "bf16", candidates=1)
        self.where = y.device.type

    def refresh(self, g: Tensor) -> float:
        start = time.perf_counter()
        self.block.set_bias(g)
        return time.perf_counter() - start

    def search(self, x: Tensor) -> Tensor:
        return self.block.topk(x, 1)[1][:, 0]


def label(method: str, precision: str) -> str:
    """A row's name: the method, and its precision where it has several (``sdfm-torch bf16``)."""
    return f"{method} {precision}" if precision else method


def _skip(row: dict, reason: str) -> dict:
    name = label(row["method"], row.get("precision", ""))
    print(f"{row['N']:>8} {row['d']:>4} {row['B']:>5}  {name:<16} skipped: {reason}")
    row["skipped"] = reason
    return row


def _method_rows(
    method: str,
    precision: str,
    fits: list[dict],
    y: Tensor,
    g: Tensor,
    queries: dict[int, Tensor],
    answers: dict[int, Tensor],
    references: dict[tuple[int, bool], Tensor],
    flops: float,
    args: MatchBench,
) -> list[dict]:
    """Build ``method``'s index over (y, g), then time it on the batch size of each row of ``fits``
    (filled in, printed and returned). ``answers`` and ``references`` cache sdfm-torch's answers and
    the float64 brute force across methods."""
    device, (n, d) = y.device, y.shape
    start = time.perf_counter()
    index: MatchIndex | PlainIndex | RawLowPrecision
    if method.startswith("sdfm"):
        index = MatchIndex(
            y,
            backend=method.split("-")[1],
            chunk_size=args.chunk_size,
            precision=precision,
            candidates=args.candidates,
        )
        index.set_potential(g)
        refresh = statistics.median(
            [(index.set_potential(g + i), index.last_refresh_seconds)[1] for i in range(3)]
        )
        index.set_potential(g)
        search, where = index.search, device.type
    elif method == "bf16-raw":
        index = RawLowPrecision(y, args.chunk_size)
        refresh = index.refresh(g)
        search, where = index.search, index.where
    else:
        index = PlainIndex(method, y)
        refresh = index.refresh(g)
        search, where = index.search, index.where
    build = time.perf_counter() - start
    for row in fits:
        b = row["B"]
        row |= {"where": where, "build_s": build, "refresh_s": refresh}
        x = queries[b]
        predicted = _predicted_seconds(method, search, x, n, d, flops)
        if predicted > args.budget:
            _skip(row, f"predicted {predicted:.0f} s per call > --budget {args.budget:g} s")
            continue
        before = index.fallbacks if isinstance(index, MatchIndex) else (0, 0)
        times, util, found = _time_calls(lambda x=x: search(x), device, args.repeats, args.budget)
        fallback = ""
        if isinstance(index, MatchIndex) and index.precision != "fp32":
            queries, fallbacks = (now - then for now, then in zip(index.fallbacks, before, strict=True))
            row["fallback_rate"] = fallbacks / max(queries, 1)
            fallback = f"{row['fallback_rate']:.4f}"
        seconds = statistics.median(times)
        found = found.cpu()
        row |= {"seconds": seconds, "times_s": times, "queries_per_s": b / seconds, "cpu_util": util}
        f64 = ""
        k = min(args.f64_check, b)
        if k > 0:
            biased = method in BIASED
            if (b, biased) not in references:
                references[(b, biased)] = f64_argmax(x[:k], y, g if biased else None)
            row["f64_agree"] = float((found[:k] == references[(b, biased)]).double().mean())
            row["f64_check_queries"] = k
            f64 = f"{row['f64_agree']:.4f}"
        agree = ""
        if method.startswith("sdfm"):
            answers.setdefault(b, found)
            row["agree_with_sdfm_torch"] = float((found == answers[b]).double().mean())
            agree = f"{row['agree_with_sdfm_torch']:.4f}"
        print(
            f"{n:>8} {d:>4} {b:>5}  {label(method, precision):<16} {where:>5} {1e3 * seconds:>9.1f} "
            f"{b / seconds:>10.0f} {1e3 * refresh:>10.2f} {util:>4.1f} {f64:>6} {agree:>6} {fallback:>8}"
        )
    return fits
