"""Benchmark: exact minibatch OT solvers, sdfm's beside POT's ``ot.emd`` (TorchCFM's solver).

For each (n, d): x ~ N(0, I), y ~ N(1, I), both (n, d); the squared-Euclidean cost. Rows:

- ``sdfm lsa`` / ``sdfm emd`` / ``sdfm auto``: ``exact_ot_assignment(x, y, solver=...)``, the whole call
  (float64 cost matrix on the CPU, the solve, the permutation back as a tensor);
- ``pot emd``: ``ot.emd(a, b, C)`` on the same float64 cost built inside the timed region, as
  TorchCFM's OT-CFM sampler calls it.

Each row is the median of up to ``--repeats`` calls; a call predicted (from the previous size, as
n^3) to exceed ``--budget`` seconds is skipped with the prediction. Every row's permutation is checked
against the others' cost: all are optimal (their costs agree to 1e-9 relative). The last column is
POT's time over the row's (above 1: faster than POT).

Run: ``sdfm bench exact`` (n = 256, 1,024, 4,096; d = 2, 64; one thread).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sdfm.bench.common import start_machine, timed, write_json
from sdfm.memory import require_memory
from sdfm.ot.exact import choose_solver, exact_ot_assignment

METHODS = ("sdfm lsa", "sdfm emd", "sdfm auto", "pot emd")


@dataclass(kw_only=True)
class ExactBench:
    """Exact minibatch OT solvers (scipy's LSA, POT's network simplex, sdfm's auto choice) beside POT."""

    sizes: list[int] = field(default_factory=lambda: [256, 1024, 4096])
    """Batch sizes n."""
    dims: list[int] = field(default_factory=lambda: [2, 64])
    """Dimensions d."""
    repeats: int = 3
    """Timed calls per row (median reported)."""
    budget: float = 30.0
    """Seconds a call may take; longer predicted calls are skipped."""
    threads: int = 1
    """CPU threads (0: the default)."""
    seed: int = 0
    """Seed of the data."""
    json: Path | None = None
    """Write all rows to this JSON file."""

    def run(self) -> int:
        machine = start_machine(self.threads)
        rows = run(self)
        if self.json is not None:
            write_json(self.json, machine, self, rows=rows)
        return 0


def _pot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    from sdfm.pot import pot

    ot = pot()

    c = (0.5 * torch.cdist(x.double(), y.double()).square()).numpy()
    n = c.shape[0]
    plan = ot.emd(np.full(n, 1.0 / n), np.full(n, 1.0 / n), c, numItermax=max(100_000, 50 * n * n))
    return torch.from_numpy(plan.argmax(1))


def run(args: ExactBench) -> list[dict]:
    header = f"{'n':>6} {'d':>4}  {'method':<10} {'ms':>10} {'x pot':>7}  note"
    print(header + "\n" + "-" * len(header))
    rows: list[dict] = []
    last: dict[tuple[str, int], float] = {}  # (method, d) -> seconds at the previous size
    for d in args.dims:
        previous_n = None
        for n in args.sizes:
            require_memory(3 * 8.0 * n * n, f"--sizes {n}", "the cost matrix is n x n float64: bench smaller sizes")
            gen = torch.Generator().manual_seed(args.seed)
            x, y = torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen) + 1
            cost = 0.5 * torch.cdist(x.double(), y.double()).square()
            group = []
            for method in METHODS:
                row: dict = {"n": n, "d": d, "method": method}
                if (method, d) in last and previous_n:
                    predicted = last[(method, d)] * (n / previous_n) ** 3
                    if predicted > args.budget:
                        row["skipped"] = f"predicted {predicted:.0f} s > --budget {args.budget:g} s"
                        group.append(row)
                        continue
                solver = method.split()[1]

                def solve(x=x, y=y, solver=solver, pot=method == "pot emd"):
                    return _pot(x, y) if pot else exact_ot_assignment(x, y, solver=solver)

                times, perm = [], None
                while len(times) < args.repeats and sum(times) < args.budget:
                    seconds, _, perm = timed(solve)
                    times.append(seconds)
                row["seconds"] = statistics.median(times)
                row["cost"] = float(cost[torch.arange(n), perm].sum())
                if method == "sdfm auto":
                    row["chose"] = choose_solver(n, d)
                last[(method, d)] = row["seconds"]
                group.append(row)
            previous_n = n
            timed_rows = [r for r in group if "seconds" in r]
            best_cost = min(r["cost"] for r in timed_rows)
            pot = next((r for r in group if r["method"] == "pot emd" and "seconds" in r), None)
            for r in group:
                if "skipped" in r:
                    print(f"{n:>6} {d:>4}  {r['method']:<10} skipped: {r['skipped']}")
                    continue
                r["optimal"] = abs(r["cost"] - best_cost) <= 1e-9 * abs(best_cost)
                r["vs_pot"] = pot["seconds"] / r["seconds"] if pot else None
                note = f"chose {r['chose']}" if "chose" in r else ""
                note += "" if r["optimal"] else "  NOT OPTIMAL"
                ratio = f"{r['vs_pot']:>7.2f}" if r["vs_pot"] else f"{'':>7}"
                print(f"{n:>6} {d:>4}  {r['method']:<10} {1e3 * r['seconds']:>10.1f} {ratio}  {note}")
            rows += group
    return rows
