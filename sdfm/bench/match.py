"""Benchmark: matching throughput (queries/s) of MatchIndex beside plain FAISS and plain torch, and
the cost of applying a new potential.

For each (N, d): synthetic data y ~ N(0, I) (N, d) and a random potential g; for each B: queries
x ~ N(0, I) (B, d). Methods, all exact (flat) searches:

- ``sdfm-torch``: ``MatchIndex(backend='torch')``: chunked matmul + fp32 bias + running argmax
  (bf16 products on CUDA, fp32 on CPU).
- ``sdfm-faiss``: ``MatchIndex(backend='faiss')``: ``IndexFlatIP`` over [y ; g], queries [x ; 1].
- ``faiss-flat``: a plain ``IndexFlatIP`` over y, no bias (what the bias costs).
- ``torch-matmul``: ``(x @ y.T).argmax(1)`` in one piece, no bias (a (B, N) score matrix).

Columns: ms per batch and queries/s (median of up to ``--repeats`` calls after one warm-up call,
fewer when they would exceed ``--budget`` seconds), and the agreement of each method's answer with
sdfm-torch's (the bias-free methods answer a different question, so theirs is not compared).
``refresh ms`` is the cost of applying a new g: ``set_potential`` for the sdfm backends (a copy
into the bias vector; a strided in-place write into the FAISS index's stored vectors), and for
``faiss-flat`` the rebuild (reset + add of [y ; g]) that an index without an editable bias would
need.

A combination is skipped, with the reason printed, when its memory estimate (points, index copy,
score matrix) exceeds ``--mem-gb`` or one call is predicted (from a calibration matmul) to take longer
than ``--budget`` seconds.

Run: ``sdfm bench match`` (N = 60,000, a few minutes on 2 cores); the full grid is
``sdfm bench match --N 60000,1000000 --d 64,784 --B 256,4096`` (on a CPU, N = 10^6 at d = 784 with
B = 4,096 is about 6 TFLOP per call and is skipped by the default budget; raise ``--budget``).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from pathlib import Path

import torch

from sdfm.bench.common import int_list, machine_info, name_list, write_json
from sdfm.errors import UserError
from sdfm.semidiscrete import MatchIndex

METHODS = ("sdfm-torch", "sdfm-faiss", "faiss-flat", "torch-matmul")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sdfm bench match", description=__doc__.split("\n")[0])
    p.add_argument("--N", type=int_list, default=[60000], help="comma-separated numbers of points")
    p.add_argument("--d", type=int_list, default=[64, 784], help="comma-separated dimensions")
    p.add_argument("--B", type=int_list, default=[256, 4096], help="comma-separated query batch sizes")
    p.add_argument("--methods", type=name_list, default=list(METHODS), help=", ".join(METHODS))
    p.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (median reported)")
    p.add_argument(
        "--budget", type=float, default=20.0, help="seconds per measurement; longer calls are skipped"
    )
    p.add_argument(
        "--mem-gb", type=float, default=8.0, help="skip combinations estimated to need more memory"
    )
    p.add_argument("--chunk-size", type=int, default=8192, help="MatchIndex(torch) rows per chunk")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    p.add_argument("--json", type=Path, default=None, help="write all rows to this JSON file")
    return p


def _machine(device: torch.device) -> dict[str, str | int]:
    import faiss

    info = machine_info()
    info.update(faiss_threads=faiss.omp_get_max_threads(), faiss=faiss.__version__, device=str(device))
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _calibrate(device: torch.device) -> float:
    """FLOP/s of a mid-sized fp32 matmul here, for predicting which calls would exceed the budget."""
    a = torch.randn(1024, 512, device=device)
    b = torch.randn(512, 4096, device=device)
    a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(3):
        a @ b
    _sync(device)
    return 3 * 2 * 1024 * 512 * 4096 / (time.perf_counter() - start)


class _Plain:
    """The bias-free references: a plain FAISS flat index and a one-piece torch matmul."""

    def __init__(self, method: str, y: torch.Tensor):
        self.method, self.y = method, y
        if method == "faiss-flat":
            import faiss

            self.index = faiss.IndexFlatIP(y.shape[1])
            self.index.add(y.cpu().numpy())

    def search(self, x: torch.Tensor) -> torch.Tensor:
        if self.method == "faiss-flat":
            return torch.from_numpy(self.index.search(x.cpu().numpy(), 1)[1][:, 0])
        return (x @ self.y.T).argmax(1)

    def refresh(self, g: torch.Tensor) -> float:
        """Seconds of the rebuild an index without an editable bias needs for a new g."""
        if self.method != "faiss-flat":
            return float("nan")
        import faiss

        start = time.perf_counter()
        augmented = torch.cat([self.y, g[:, None]], 1).cpu().numpy()
        index = faiss.IndexFlatIP(augmented.shape[1])
        index.add(augmented)
        seconds = time.perf_counter() - start
        del index, augmented
        return seconds


def _memory_gb(method: str, n: int, d: int, b: int, chunk: int) -> float:
    """Rough peak bytes beyond the points themselves, in GB."""
    extra = {
        "sdfm-torch": 4 * b * chunk * 2,
        "sdfm-faiss": 8 * n * (d + 1),  # host array [y ; g] and the index's own copy while adding
        "faiss-flat": 4 * n * d + 4 * n * (d + 1),  # the index, and the rebuild of [y ; g]
        "torch-matmul": 4 * b * n,
    }[method]
    return (4 * n * d + extra) / 2**30


def _time_calls(fn, device: torch.device, repeats: int, budget: float) -> list[float]:
    fn()  # warm-up (first-call allocation, thread pools)
    _sync(device)
    times: list[float] = []
    while len(times) < repeats and (not times or sum(times) + times[-1] <= budget):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str]) -> int:
    """Run the benchmark, print a table, optionally write JSON; returns the exit code."""
    args = _parser().parse_args(argv)
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        raise UserError(f"unknown --methods {bad}; choose from {', '.join(METHODS)}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    machine = _machine(device)
    flops = _calibrate(device)
    print("machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()))
    print(
        f"calibration: {flops / 1e9:.0f} GFLOP/s fp32 matmul; budget {args.budget:g} s, mem {args.mem_gb:g} GB"
    )
    header = (
        f"{'N':>8} {'d':>4} {'B':>5}  {'method':<13} {'ms/batch':>9} {'queries/s':>10} "
        f"{'refresh ms':>10} {'agree':>6}"
    )
    print(header)
    print("-" * len(header))
    rows: list[dict] = []
    for n in args.N:
        for d in args.d:
            gen = torch.Generator().manual_seed(args.seed)
            y = torch.randn(n, d, generator=gen).to(device)
            g = torch.randn(n, generator=gen).to(device)
            queries = {b: torch.randn(b, d, generator=gen).to(device) for b in args.B}
            answers: dict[int, torch.Tensor] = {}
            for method in args.methods:
                fits = [b for b in args.B if _memory_gb(method, n, d, b, args.chunk_size) <= args.mem_gb]
                for b in sorted(set(args.B) - set(fits)):
                    need = _memory_gb(method, n, d, b, args.chunk_size)
                    reason = f"needs ~{need:.1f} GB > --mem-gb {args.mem_gb:g}"
                    print(f"{n:>8} {d:>4} {b:>5}  {method:<13} skipped: {reason}")
                    rows.append({"N": n, "d": d, "B": b, "method": method, "skipped": reason})
                if not fits:
                    continue
                start = time.perf_counter()
                if method.startswith("sdfm"):
                    index = MatchIndex(y, backend=method.split("-")[1], chunk_size=args.chunk_size)
                    index.set_potential(g)
                    refresh = statistics.median(
                        [(index.set_potential(g + i), index.last_refresh_seconds)[1] for i in range(3)]
                    )
                    index.set_potential(g)
                    search = index.search
                else:
                    index = _Plain(method, y)
                    refresh = index.refresh(g)
                    search = index.search
                build = time.perf_counter() - start
                for b in fits:
                    row = {"N": n, "d": d, "B": b, "method": method, "build_s": build, "refresh_s": refresh}
                    predicted = 2 * b * n * d / flops
                    if predicted > args.budget:
                        row["skipped"] = f"predicted {predicted:.0f} s per call > --budget {args.budget:g} s"
                        print(f"{n:>8} {d:>4} {b:>5}  {method:<13} skipped: {row['skipped']}")
                        rows.append(row)
                        continue
                    x = queries[b]
                    times = _time_calls(
                        lambda x=x, search=search: search(x), device, args.repeats, args.budget
                    )
                    seconds = statistics.median(times)
                    found = search(x).cpu()
                    agree = ""
                    if method.startswith("sdfm"):
                        answers.setdefault(b, found)
                        row["agree_with_sdfm_torch"] = float((found == answers[b]).double().mean())
                        agree = f"{row['agree_with_sdfm_torch']:.4f}"
                    row |= {"seconds": seconds, "times_s": times, "queries_per_s": b / seconds}
                    print(
                        f"{n:>8} {d:>4} {b:>5}  {method:<13} {1e3 * seconds:>9.1f} {b / seconds:>10.0f} "
                        f"{1e3 * refresh:>10.2f} {agree:>6}"
                    )
                    rows.append(row)
                del index
                gc.collect()
            del y, g, queries
            gc.collect()
    if args.json is not None:
        write_json(args.json, machine, args, rows=rows)
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
