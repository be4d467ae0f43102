"""Benchmark: what each coupling costs a training step, as the ratio of the step time with it to the
step time with the independent coupling (I-CFM), with the same model, data, batch and seed.

Each cell trains ``--steps`` steps of an MLP (``--hidden`` x ``--depth``) on N(0, I) -> 8 gaussians in
this process (``Trainer``; no evaluation, no checkpoint until the end) and times the steps after
``--warmup`` of them. The semidiscrete coupling's potential is fitted first (not timed: its cost is
the fit's, ``sdfm bench potential``). Columns: ms per step, the ratio to the independent coupling of
the same batch, and per step the coupling's own time and the time the step waited for its pairs
(prefetching couplings compute the next step's pairs in a background thread, ``train.prefetch_pairs``,
so their wait is below their solve).

Run: ``sdfm bench overhead`` (batches 256 and 1,024, a few minutes on 2 cores).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sdfm.bench.common import start_machine, write_json
from sdfm.config import Config, validate
from sdfm.monitor import set_main_process

Kind = Literal["independent", "exact", "exact-sync", "sinkhorn", "semidiscrete"]


@dataclass(kw_only=True)
class OverheadBench:
    """Training-step time of each coupling over the independent coupling's, same model and batch."""

    couplings: list[Kind] = field(
        default_factory=lambda: ["independent", "exact", "exact-sync", "sinkhorn", "semidiscrete"]
    )
    """Couplings ('exact-sync': exact OT with train.prefetch_pairs off)."""
    batches: list[int] = field(default_factory=lambda: [256, 1024])
    """Global batch sizes."""
    steps: int = 300
    """Steps per cell."""
    warmup: int = 30
    """Untimed steps at the start of each cell."""
    hidden: int = 64
    """MLP width."""
    depth: int = 3
    """MLP hidden layers."""
    threads: int = 0
    """torch CPU threads (0: the default)."""
    json: Path | None = None
    """Write all rows to this JSON file."""

    def run(self) -> int:
        machine = start_machine(self.threads)
        rows = run(self)
        if self.json is not None:
            write_json(self.json, machine, self, rows=rows)
        return 0


def cell_config(kind: str, batch: int, args: OverheadBench) -> Config:
    cfg = Config()
    cfg.data.name, cfg.data.num_points = "8gaussians", max(20000, 4 * batch)
    cfg.model.kind, cfg.model.hidden, cfg.model.depth = "mlp", args.hidden, args.depth
    cfg.coupling.kind = "exact" if kind == "exact-sync" else kind
    cfg.train.prefetch_pairs = kind != "exact-sync"
    cfg.train.steps, cfg.train.batch_size = args.steps, batch
    cfg.train.log_every, cfg.train.ckpt_every = 1, args.steps
    cfg.train.eval_at_end, cfg.train.device = False, "cpu"
    cfg.potential.source, cfg.potential.max_seconds = "fit", 30.0
    return validate(cfg)


def _cell(kind: str, batch: int, args: OverheadBench) -> dict:
    from sdfm.rundir import prepare_run_dir
    from sdfm.trainer import Trainer

    cfg = cell_config(kind, batch, args)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        prepare_run_dir(run_dir, cfg, resume=False, overwrite=False)
        trainer = Trainer(cfg, run_dir)
        trainer.start_potential(resumed=False)
        trainer.train(until=args.warmup)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [m for m in lines if m["step"] > args.warmup]
    return {
        "coupling": kind,
        "batch": batch,
        "ms_per_step": 1e3 * seconds / (args.steps - args.warmup),
        "coupling_ms": statistics.mean(m["coupling_ms"] for m in timed),
        "wait_ms": statistics.mean(m["coupling_wait_ms"] for m in timed),
        "prefetched": trainer.pairing.prefetched,
    }


def run(args: OverheadBench) -> list[dict]:
    set_main_process(False)  # the trainers' own log lines would drown the table
    header = f"{'batch':>6}  {'coupling':<13} {'ms/step':>8} {'x indep':>8} {'solve ms':>9} {'wait ms':>8}"
    print(header + "\n" + "-" * len(header))
    rows = []
    for batch in args.batches:
        base = None
        for kind in args.couplings:
            row = _cell(kind, batch, args)
            if kind == "independent":
                base = row["ms_per_step"]
            row["ratio_to_independent"] = row["ms_per_step"] / base if base else None
            ratio = f"{row['ratio_to_independent']:>8.2f}" if base else f"{'':>8}"
            print(
                f"{batch:>6}  {kind:<13} {row['ms_per_step']:>8.2f} {ratio} {row['coupling_ms']:>9.2f} "
                f"{row['wait_ms']:>8.2f}",
                flush=True,
            )
            rows.append(row)
    set_main_process(True)
    return rows
