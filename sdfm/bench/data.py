"""Benchmark: a dataset of ImageNet size on one node, packed and memory-mapped.

On a synthetic uint8 array of ``--n`` images of ``--shape`` (default 1,281,167 x 3x32x32, the size of
ImageNet-32: 3.9 GB), it measures what a user of a large dataset pays:

- **pack**: ``sdfm data pack`` throughput from the .npy, and from a folder of ``--folder-images`` PNGs
  (decoded in every core);
- **start**: wall time from ``sdfm train`` to its first step (a U-Net of ``--channels``, batch
  ``--train-batch``), less the import time of Python, torch and sdfm measured in a separate process; and the
  trainer's peak memory: RSS (VmHWM), and PSS and private (anonymous) memory sampled every 0.1 s over
  its process tree. RSS beyond the anonymous memory is pages of the pack mapped into the process:
  page cache that every process shares, mapped in large folios (on this kernel up to ~1.7 MB around
  each row read), so it overstates what a process reads; PSS splits it between the processes;
- **ranks + worker**: ``--ranks`` gloo ranks under torchrun plus the dual-potential worker of the
  semidiscrete coupling (PCA ``--pca-dim``), training ``--steps`` steps: the total PSS of the process
  tree (pages of the pack shared by all processes count once);
- **gather**: per batch of ``--batch`` random rows, the time to gather and convert them from the pack
  against from an in-memory float32 tensor, beside the U-Net's step time at that batch: the overhead a
  step pays when the gather is not hidden by the background thread (``sdfm.pairing``).

Run: ``sdfm bench data`` (a 3.9 GB array and a 3.9 GB pack in ``--dir``; about 10 minutes on 2 cores);
``--n 300000`` for the smaller table.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sdfm.bench.common import start_machine, write_json


@dataclass(kw_only=True)
class DataBench:
    """Packing, start-up time and memory of training on a memory-mapped pack of ImageNet size."""

    n: int = 1_281_167
    """Images in the synthetic dataset (1,281,167: ImageNet-32's training set)."""
    shape: list[int] = field(default_factory=lambda: [3, 32, 32])
    """Shape of one image (C H W)."""
    folder_images: int = 2000
    """PNG files in the image-folder packing test (0: skip it)."""
    channels: int = 16
    """U-Net base width of the training runs."""
    train_batch: int = 32
    """Batch of the training runs (global)."""
    batch: int = 256
    """Batch of the gather-and-convert comparison."""
    steps: int = 3
    """Training steps of each run."""
    ranks: int = 2
    """gloo ranks of the multi-process run, beside the worker (0: skip it)."""
    pca_dim: int = 64
    """PCA dimension of the semidiscrete coupling in the multi-process run."""
    dir: Path | None = None
    """Work folder for the array, the pack and the runs (default: a temporary folder, removed)."""
    threads: int = 0
    """torch CPU threads (0: the default)."""
    json: Path | None = None
    """Write all rows to this JSON file."""

    def run(self) -> int:
        from sdfm.errors import UserError

        if self.n < 10 or len(self.shape) != 3 or min(self.shape) < 1 or min(self.batch, self.train_batch, self.steps) < 1:
            raise UserError(
                "bench data needs --n >= 10, --shape C H W of positive sizes, and --batch, --train-batch, --steps >= 1"
            )
        machine = start_machine(self.threads)
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            rows = run(self, self.dir)
        else:
            with tempfile.TemporaryDirectory(prefix="sdfm-bench-data-") as tmp:
                rows = run(self, Path(tmp))
        if self.json is not None:
            write_json(self.json, machine, self, rows=rows)
        return 0


# ------------------------------------------------------------------------------------------- memory


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(c) for c in fh.read().split()]
    except OSError:
        return []


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(_children(p))
    return out


def _rollup(pid: int) -> dict[str, int]:
    """kB figures of /proc/PID/smaps_rollup (Rss, Pss, Pss_Anon, Pss_File, Anonymous)."""
    found: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                m = re.match(r"(\w+):\s+(\d+) kB", line)
                if m:
                    found[m.group(1)] = int(m.group(2))
    except OSError:
        pass
    return found


def _hwm(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next((int(line.split()[1]) for line in fh if line.startswith("VmHWM:")), 0)
    except OSError:
        return 0


class MemorySampler:
    """Samples the memory of a process tree every ``every`` seconds until stopped: the peaks of the
    tree's total PSS and anonymous memory, and of each process's RSS high-water mark (VmHWM)."""

    def __init__(self, pid: int, every: float = 0.1):
        self.pid, self.every = pid, every
        self.peak_pss = self.peak_anon = self.peak_rss_file = self.peak_hwm = 0
        self.processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            pids = _tree(self.pid)
            stats = [_rollup(p) for p in pids]
            self.processes = max(self.processes, sum(1 for s in stats if s))
            self.peak_pss = max(self.peak_pss, sum(s.get("Pss", 0) for s in stats))
            self.peak_anon = max(self.peak_anon, sum(s.get("Anonymous", 0) for s in stats))
            self.peak_rss_file = max(self.peak_rss_file, sum(s.get("Rss", 0) - s.get("Anonymous", 0) for s in stats))
            self.peak_hwm = max([self.peak_hwm, *(_hwm(p) for p in pids)])
            self._stop.wait(self.every)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        gb = 1 / (1 << 20)
        return {
            "peak_pss_gb": self.peak_pss * gb,
            "peak_anon_gb": self.peak_anon * gb,
            "peak_rss_file_gb": self.peak_rss_file * gb,
            "peak_rss_one_process_gb": self.peak_hwm * gb,
            "processes": self.processes,
        }


# ---------------------------------------------------------------------------------------------- runs


def _synthetic_npy(path: Path, n: int, shape: tuple[int, ...]) -> None:
    """A uint8 .npy of n smooth random images (written in blocks: never the whole array in memory)."""
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, *shape))
    rng = np.random.default_rng(0)
    block = max(1, (64 << 20) // int(np.prod(shape)))
    base = rng.integers(0, 256, (256, *shape), dtype=np.uint8)
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        arr[lo:hi] = base[np.arange(lo, hi) % 256] ^ rng.integers(0, 16, (hi - lo, *shape), dtype=np.uint8)
    arr.flush()
    del arr


def _png_folder(root: Path, count: int, shape: tuple[int, ...]) -> None:
    from PIL import Image

    rng = np.random.default_rng(1)
    c, h, w = shape
    for i in range(count):
        folder = root / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        a = rng.integers(0, 256, (2 * h, 2 * w, c), dtype=np.uint8)
        Image.fromarray(a[..., 0] if c == 1 else a).save(folder / f"{i:06d}.png")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def _import_seconds() -> float:
    """Wall time of importing Python, torch and sdfm's trainer in a fresh process (the floor of any
    ``sdfm`` command, subtracted from the start-up time)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, sdfm.cli, sdfm.trainer"], check=True, env=_env())
    return time.perf_counter() - start


def _timed_train(cmd: list[str], cwd: Path) -> dict[str, float]:
    """Run a training command; (seconds to its first 'step' line, total seconds, memory peaks)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    sampler = MemorySampler(proc.pid)
    first = None
    tail: list[str] = []
    for line in proc.stdout:
        tail = (tail + [line.rstrip()])[-20:]
        if first is None and line.startswith("step "):
            first = time.perf_counter() - start
    code = proc.wait()
    total = time.perf_counter() - start
    memory = sampler.stop()
    if code != 0:
        raise RuntimeError(f"training run failed ({code}):\n" + "\n".join(tail))
    return {"first_step_s": first or float("nan"), "total_s": total, **memory}


def _train_args(args: DataBench, pack: Path, run_dir: Path) -> list[str]:
    return [
        "train", "--run-dir", str(run_dir), "--overwrite",
        "--data.name", "file", "--data.path", str(pack), "--data.num_eval", "1000",
        "--model.kind", "unet", "--model.channels", str(args.channels),
        "--train.steps", str(args.steps), "--train.batch_size", str(args.train_batch),
        "--train.log_every", "1", "--train.ckpt_every", str(args.steps), "--train.eval_at_end", "False",
    ]  # fmt: skip


def _gather_rows(args: DataBench, pack: Path) -> dict[str, float]:
    """ms per batch: gather + convert from the pack, from an in-memory float32 tensor, and a U-Net step."""
    from sdfm.config import ModelConfig
    from sdfm.data.pack import open_pack
    from sdfm.models import build_model

    points = open_pack(pack).x
    n = len(points)
    memory_rows = min(n, 200_000)  # a float32 copy of all of it would not fit beside the pack
    dense = points.take(slice(0, memory_rows))
    gen = torch.Generator().manual_seed(0)
    repeats = 50

    def timed(fn, repeats: int = repeats) -> float:
        idx = [torch.randint(0, memory_rows, (args.batch,), generator=gen) for _ in range(repeats)]
        start = time.perf_counter()
        for i in idx:
            fn(i)
        return 1e3 * (time.perf_counter() - start) / repeats

    far = [torch.randint(0, n, (args.batch,), generator=gen) for _ in range(repeats)]
    start = time.perf_counter()
    for i in far:
        points.take(i)
    pack_all_ms = 1e3 * (time.perf_counter() - start) / repeats
    pack_ms = timed(points.take)
    memory_ms = timed(lambda i: dense[i])
    cfg = ModelConfig(kind="unet", channels=args.channels)
    model = build_model(cfg, tuple(points.point_shape), 0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = dense[: args.batch]
    t = torch.rand(args.batch)

    def step(_):
        loss = (model(t, x) - x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    step(None)
    step_ms = timed(step, repeats=5)
    return {
        "gather_pack_ms": pack_ms,
        "gather_pack_whole_ms": pack_all_ms,
        "gather_memory_ms": memory_ms,
        "step_ms": step_ms,
        "overhead_vs_memory": (pack_ms - memory_ms) / (step_ms + memory_ms),
    }


def run(args: DataBench, work: Path) -> list[dict]:
    from sdfm.data.packer import pack_source

    shape = tuple(args.shape)
    npy, pack = work / "images.npy", work / "images.safetensors"
    nbytes = args.n * int(np.prod(shape))
    rows: list[dict] = []

    def report(row: dict) -> None:
        rows.append(row)
        print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)

    if not npy.exists() or np.load(npy, mmap_mode="r").shape != (args.n, *shape):
        print(f"writing a synthetic {args.n} x {shape} uint8 array ({nbytes / 1e9:.2f} GB) to {npy}", flush=True)
        _synthetic_npy(npy, args.n, shape)
    start = time.perf_counter()
    r = pack_source(str(npy), pack, overwrite=True, progress=False, log=print)
    seconds = time.perf_counter() - start
    report({"what": "pack from .npy", "images": r.n, "seconds": seconds, "images_per_s": r.n / seconds,
            "gb_per_s": nbytes / seconds / 1e9})  # fmt: skip
    if args.folder_images:
        folder = work / "folder"
        shutil.rmtree(folder, ignore_errors=True)
        _png_folder(folder, args.folder_images, shape)
        start = time.perf_counter()
        r = pack_source(str(folder), work / "folder.safetensors", size=shape[1], overwrite=True, progress=False, log=print)
        seconds = time.perf_counter() - start
        report({"what": "pack from PNG folder", "images": r.n, "seconds": seconds, "images_per_s": r.n / seconds,
                "workers": os.cpu_count() or 1})  # fmt: skip
    imports = _import_seconds()
    # Drop nothing from the page cache (that needs root and hurts the machine); the first run reads
    # the pack's pages, so time a second start too: the one a rank of a running node sees.
    for attempt in ("first", "second"):
        cmd = [sys.executable, "-m", "sdfm", *_train_args(args, pack, work / "run1")]
        m = _timed_train(cmd, work)
        report({"what": f"train, 1 process ({attempt} start)", "import_s": imports,
                "first_step_s": m["first_step_s"], "first_step_beyond_import_s": m["first_step_s"] - imports,
                **{k: v for k, v in m.items() if k != "first_step_s"}})  # fmt: skip
    if args.ranks:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.ranks}",
            "-m", "sdfm", *_train_args(args, pack, work / "run2"),
            "--coupling.kind", "semidiscrete", "--potential.source", "worker",
            "--potential.pca_dim", str(args.pca_dim), "--potential.max_steps", "5",
        ]  # fmt: skip
        m = _timed_train(cmd, work)
        report({"what": f"train, {args.ranks} gloo ranks + worker", "pack_gb": nbytes / (1 << 30), **m,
                "pss_over_pack_gb": m["peak_pss_gb"] - nbytes / (1 << 30)})  # fmt: skip
    report({"what": f"gather + convert, batch {args.batch}", **_gather_rows(args, pack)})
    return rows
