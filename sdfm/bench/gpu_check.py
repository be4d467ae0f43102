"""The one-shot GPU check: everything sdfm claims about a GPU, measured in one command of a few minutes.

``launch/gpu-check.sh`` prepares the Python environment (also offline) and runs ``sdfm bench
gpu-check``, which runs three steps, each as its own process with a deadline and a log in ``--out``:

1. ``tests``: the CUDA-marked tests (``pytest -m gpu``: certified bf16 matching, the FAISS index is a
   GPU index, the Triton kernels ran compiled, Sinkhorn precisions within their stated error, bf16
   training, the potential fitted on the GPU) and the Triton kernel tests, compiled on the GPU.
2. ``suite``: a reduced ``sdfm bench suite``, workload ``gpu-check``: Sinkhorn at n = m = 65,536,
   d = 3,072 in every precision beside KeOps (GeomLoss) and flash-sinkhorn; matching of B = 4,096
   against N = 1,281,167 points at d = 3,072 beside FAISS fp32 / fp16; one U-Net training step;
   each with TFLOP/s and its share of the device's bf16 peak.
3. ``train``: ``train_steps`` (200) steps of bf16 SD-FM training of the OT-CFM CIFAR-10 U-Net on synthetic
   3x32x32 images, with the dual-potential worker on the GPU refreshing g while training runs.

Every figure goes into ``gpu-check.json`` and a Markdown table ``gpu-check.md`` (docs/cluster.md's GPU
section is pasted from it). A peer that is not installed is skipped with one line.

``--dry-run`` runs the same steps on a machine without CUDA, at sizes a CPU finishes in minutes:
the CUDA tests are collected and reported as skipped, the suite runs workload ``toy``, and training
uses a small U-Net on the CPU for at most 50 steps (bf16 autocast works there). ``--quick`` shrinks the dry run further
(the test of the script). A dry run proves the plumbing, not a GPU figure; its report says so.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from sdfm.errors import UserError

STEPS = ("tests", "suite", "train")
ROOT = Path(__file__).resolve().parents[2]
"""The checkout holding tests/ (an editable install or a run from the repository)."""
PEERS = {
    "pykeops": "KeOps (the keops Sinkhorn backend)",
    "geomloss": "GeomLoss (KeOps Sinkhorn peer)",
    "flash_sinkhorn": "flash-sinkhorn (Sinkhorn peer)",
    "ot": "POT (exact OT and Sinkhorn peer)",
    "faiss": "FAISS (matching backend and peer)",
}


@dataclass(kw_only=True)
class GpuCheck:
    """The one-shot GPU check (see ``launch/gpu-check.sh``): CUDA tests, a reduced GPU suite and bf16
    SD-FM training with the GPU worker, into one JSON and one Markdown table."""

    out: Path = Path("runs/gpu-check")
    """Folder of gpu-check.json, gpu-check.md and one log per step."""
    dry_run: bool = False
    """No CUDA here: run every step that needs none, at CPU sizes (the report says it is a dry run)."""
    quick: bool = False
    """With --dry-run: the smallest sizes (seconds per step)."""
    steps: list[Literal["tests", "suite", "train"]] = field(default_factory=lambda: list(STEPS))
    """Steps to run."""
    train_steps: int = 200
    """Training steps of the train step (--quick: 4)."""
    minutes: float = 8.0
    """Deadline of the whole check; each step gets its share (tests 25%, suite 45%, train 30%)."""

    def run(self) -> int:
        """Run the check; returns 0 when every step that ran passed, 1 otherwise."""
        return _main(self)


def _environment(cuda: bool) -> dict:
    import torch

    env = {
        "date": time.strftime("%Y-%m-%d"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "device": torch.cuda.get_device_name(0) if cuda else "cpu (dry run)",
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "absent"
    peers = {}
    for module, what in PEERS.items():
        try:
            mod = __import__(module)
            peers[module] = getattr(mod, "__version__", "present")
        except Exception as error:  # ImportError, or a broken build that fails while importing
            peers[module] = "absent"
            print(f"gpu-check: {what} is not installed ({type(error).__name__}); its rows are skipped")
    if peers["faiss"] != "absent":
        import faiss

        gpu = "GPU" in faiss.get_compile_options()
        peers["faiss_gpu"] = bool(gpu and cuda and faiss.get_num_gpus() > 0)
        if not peers["faiss_gpu"]:
            print("gpu-check: faiss has no GPU support here (faiss-cpu); the FAISS GPU rows are skipped")
    env["peers"] = peers
    return env


def _run(name: str, cmd: list[str], out: Path, seconds: float, env: dict | None = None) -> dict:
    """Run one step's process with a deadline, its output in ``out/name.log``."""
    log = out / f"{name}.log"
    start = time.perf_counter()
    print(f"gpu-check: {name}: {' '.join(cmd)} (deadline {seconds:.0f} s, log {log})", flush=True)
    with open(log, "w") as fh:
        try:
            proc = subprocess.run(
                cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=seconds, cwd=ROOT, env=env
            )
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = None
    elapsed = time.perf_counter() - start
    tail = log.read_text(errors="replace").splitlines()[-5:]
    return {"exit_code": code, "seconds": round(elapsed, 1), "timed_out": code is None, "log_tail": tail}


def _tests(args: GpuCheck, out: Path, seconds: float, scratch: Path) -> dict:
    if not (ROOT / "tests").is_dir():
        return {"status": "skipped", "reason": f"no tests/ folder in {ROOT} (run from a checkout)"}
    xml = scratch / "pytest.xml"
    # The CUDA-marked tests; on a GPU these include every Triton kernel test (compiled there; on a
    # CPU CI runs them through the interpreter). --quick collects two files only.
    files = ["tests"] if not args.quick else ["tests/test_semidiscrete_index.py", "tests/test_gpu.py"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={xml}"]
    result = _run("tests", cmd + ["-m", "gpu", *files], out, seconds)
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    cases = []
    if xml.exists():
        for case in ET.parse(xml).getroot().iter("testcase"):
            outcome = "passed"
            for child in case:
                if child.tag in ("failure", "error"):
                    outcome = "failed" if child.tag == "failure" else "errors"
                elif child.tag == "skipped":
                    outcome = "skipped"
            counts[outcome] += 1
            cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome})
    ok = result["exit_code"] == 0 and counts["failed"] == counts["errors"] == 0
    if args.dry_run:
        status = "dry run" if ok else "failed"
    else:
        status = "passed" if ok and counts["passed"] > 0 else "failed"
    return result | counts | {"status": status, "cases": cases}


def _suite(args: GpuCheck, out: Path, seconds: float, scratch: Path) -> dict:
    workload = "toy" if args.dry_run else "gpu-check"
    path = scratch / "suite.json"
    cmd = [sys.executable, "-m", "sdfm", "bench", "suite", "--workload", workload, "--json", str(path)]
    if args.dry_run:
        cmd += ["--device", "cpu", "--repeats", "1"]
    result = _run("suite", cmd, out, seconds)
    if result["exit_code"] != 0 or not path.exists():
        return result | {"status": "failed", "workload": workload}
    suite = json.loads(path.read_text())
    keep = ("method", "where", "precision", "n", "d", "N", "B", "s_per_iter", "seconds", "tflops")
    keep += ("peak_share", "f64_dev", "f64_agree", "fallback_rate", "vs_peers", "skipped")
    rows = {part: [{k: r[k] for k in keep if k in r} for r in suite[part]] for part in ("sinkhorn", "match")}
    return result | {
        "status": "dry run" if args.dry_run else "passed",
        "workload": workload,
        "peak": suite["peak"],
        "peak_flops": suite["peak_flops"],
        "sinkhorn": rows["sinkhorn"],
        "match": rows["match"],
        "train_step": suite["train_step"],
        "goals": suite["goals"],
    }


def synthetic_images(n: int, seed: int = 0) -> np.ndarray:
    """(n, 3, 32, 32) uint8 images with structure (a random smooth low-rank field per image plus a
    class-like colour offset), so that the potential and the flow have something to fit."""
    gen = np.random.default_rng(seed)
    u = np.linspace(0.0, 1.0, 32, dtype=np.float32)
    basis = np.stack(
        [np.outer(np.sin(np.pi * (i + 1) * u), np.cos(np.pi * j * u)) for i in range(4) for j in range(4)]
    )
    weights = gen.standard_normal((n, 3, basis.shape[0]), dtype=np.float32) / 4
    images = np.einsum("ncb,bhw->nchw", weights, basis) + gen.integers(0, 4, (n, 3, 1, 1)) / 4 - 0.375
    return np.clip(127.5 * (images + 1.0), 0, 255).astype(np.uint8)


DRY_RUN_STEPS = 50
"""Training steps of a dry run (a CPU runs the small U-Net in emulated bf16 at about a step a second)."""


def _train_steps(args: GpuCheck) -> int:
    if args.quick:
        return 4
    return min(args.train_steps, DRY_RUN_STEPS) if args.dry_run else args.train_steps


def _train_config(args: GpuCheck, data: Path) -> list[str]:
    """``sdfm train`` flags: bf16 SD-FM on 3x32x32 images with the worker refreshing g."""
    if args.dry_run:
        model = ["--model.channels", "8", "--model.channel-mult", "1", "2", "--model.num-res-blocks", "1"]
        batch, device = ("8" if args.quick else "16"), "cpu"
    else:
        model = ["--model.channels", "128", "--model.channel-mult", "1", "2", "2", "2"]
        model += [
            "--model.num-res-blocks",
            "2",
            "--model.attention-resolutions",
            "16",
            "--model.dropout",
            "0.1",
        ]
        batch, device = "128", "cuda"
    steps = _train_steps(args)
    return [
        "--data.name", "file", "--data.path", str(data), "--data.num-eval", "64",
        "--model.kind", "unet", *model,
        "--coupling.kind", "semidiscrete",
        "--potential.source", "worker", "--potential.device", device, "--potential.publish-every", "10",
        "--potential.batch-size", "1024",
        "--train.steps", str(steps), "--train.batch-size", batch, "--train.precision", "bf16",
        "--train.device", device, "--train.log-every", str(max(1, steps // 10)),
        "--train.ckpt-every", str(steps), "--train.eval-at-end", "False",
        "--optim.warmup-steps", "20",
    ]  # fmt: skip


def _train(args: GpuCheck, out: Path, seconds: float, scratch: Path) -> dict:
    n = 256 if args.quick else (2000 if args.dry_run else 50_000)
    data = scratch / "images.npy"
    np.save(data, synthetic_images(n))
    run_dir = scratch / "run"
    cmd = [sys.executable, "-m", "sdfm", "train", "--run-dir", str(run_dir), *_train_config(args, data)]
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    result = _run("train", cmd, out, seconds, env)
    metrics_file = run_dir / "metrics.jsonl"
    records = []
    if metrics_file.exists():
        records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    records = [r for r in records if "loss" in r]
    summary: dict = {"points": n, "shape": [3, 32, 32], "config": " ".join(_train_config(args, data))}
    if records:
        last = records[-1]
        summary |= {
            "steps": last["step"],
            "final_loss": last["loss"],
            "loss_finite": all(math.isfinite(r["loss"]) for r in records),
            "pairs_per_s": last.get("pairs_per_s"),
            "coupling_ms": last.get("coupling_ms"),
            "potential_versions": max(r.get("potential_version", 0) for r in records),
            "potential_chi2": last.get("potential_chi2"),
            "log": [
                {k: r.get(k) for k in ("step", "loss", "pairs_per_s", "potential_version")} for r in records
            ],
        }
    steps = _train_steps(args)
    ok = result["exit_code"] == 0 and summary.get("steps") == steps and summary.get("loss_finite", False)
    refreshed = summary.get("potential_versions", 0) > 0
    summary["worker_refreshed_g"] = refreshed
    status = ("dry run" if args.dry_run else "passed") if ok else "failed"
    return result | summary | {"status": status}


def _markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"# sdfm GPU check, {env['date']}",
        "",
        f"Device: **{env['device']}**; torch {env['torch']} (CUDA {env['cuda']}), Triton {env['triton']}, "
        f"Python {env['python']}.",
    ]
    if report["dry_run"]:
        lines += ["", "**Dry run on a machine without CUDA: no figure below was measured on a GPU.**"]
    peers = ", ".join(f"{k} {v}" for k, v in env["peers"].items())
    lines += ["", f"Peers: {peers}.", "", "| step | status | seconds | detail |", "|---|---|---|---|"]
    for name in STEPS:
        s = report["steps"].get(name)
        if s is None:
            continue
        detail = ""
        if name == "tests" and "passed" in s:
            detail = (
                f"{s['passed']} passed, {s['skipped']} skipped, {s['failed']} failed, {s['errors']} errors"
            )
        elif name == "train" and "steps" in s:
            detail = (
                f"{s['steps']} steps, loss {s['final_loss']:.4f}, {s.get('pairs_per_s') or 0:.0f} pairs/s, "
                f"{s['potential_versions']} potential versions picked up, chi2 {s.get('potential_chi2')}"
            )
        elif name == "suite" and "workload" in s:
            detail = f"workload {s['workload']}; peak: {s.get('peak', '?')}"
        lines.append(f"| {name} | {s['status']} | {s.get('seconds', '')} | {detail} |")
    suite = report["steps"].get("suite", {})
    if suite.get("sinkhorn"):
        lines += [
            "",
            "## Sinkhorn",
            "",
            "| n | d | method | ms/iter | TFLOP/s | share of peak | f64 dev (eps) |",
        ]
        lines.append("|---|---|---|---|---|---|---|")
        for r in suite["sinkhorn"]:
            if "s_per_iter" not in r:
                lines.append(
                    f"| {r['n']} | {r['d']} | {r['method']} | skipped: {r.get('skipped', '')} | | | |"
                )
                continue
            dev = f"{r['f64_dev']:.1e}" if "f64_dev" in r else "n/a"
            lines.append(
                f"| {r['n']} | {r['d']} | {r['method']} | {1e3 * r['s_per_iter']:.2f} | {r['tflops']:.2f} | "
                f"{100 * r['peak_share']:.1f}% | {dev} |"
            )
    if suite.get("match"):
        lines += [
            "",
            "## Matching",
            "",
            "| N | d | B | method | ms/batch | TFLOP/s | share of peak | f64 agree |",
        ]
        lines.append("|---|---|---|---|---|---|---|---|")
        for r in suite["match"]:
            label = f"{r['method']} {r.get('precision', '')}".strip()
            if "seconds" not in r:
                lines.append(
                    f"| {r['N']} | {r['d']} | {r['B']} | {label} | skipped: {r.get('skipped', '')} | | | |"
                )
                continue
            agree = f"{r['f64_agree']:.4f}" if "f64_agree" in r else ""
            lines.append(
                f"| {r['N']} | {r['d']} | {r['B']} | {label} | {1e3 * r['seconds']:.1f} | {r['tflops']:.2f} | "
                f"{100 * r['peak_share']:.1f}% | {agree} |"
            )
    if suite.get("goals"):
        lines += ["", "## Goals", "", "| goal | status | measured |", "|---|---|---|"]
        lines += [f"| {g['goal']} | {g['status']} | {g['measured']} |" for g in suite["goals"]]
    return "\n".join(lines) + "\n"


def _main(args: GpuCheck) -> int:
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        raise UserError("no CUDA device here; run the GPU check on a GPU machine, or pass --dry-run")
    if args.quick and not args.dry_run:
        raise UserError("--quick shrinks the dry run only; drop it on a GPU, or add --dry-run")
    if args.minutes <= 0 or args.train_steps < 1:
        raise UserError("--minutes and --train-steps must be positive; e.g. --minutes 8 --train-steps 200")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    report: dict = {"dry_run": args.dry_run, "environment": _environment(cuda), "steps": {}}
    shares = {"tests": 0.25, "suite": 0.45, "train": 0.30}
    runners = {"tests": _tests, "suite": _suite, "train": _train}
    scratch = Path(tempfile.mkdtemp(prefix="sdfm-gpu-check-"))
    try:
        for name in STEPS:
            if name not in args.steps:
                continue
            seconds = max(30.0, shares[name] * 60 * args.minutes)
            report["steps"][name] = step = runners[name](args, out, seconds, scratch)
            print(f"gpu-check: {name}: {step['status']} ({step.get('seconds', 0)} s)", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report["seconds"] = round(time.perf_counter() - start, 1)
    (out / "gpu-check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "gpu-check.md").write_text(_markdown(report))
    failed = [n for n, s in report["steps"].items() if s["status"] == "failed"]
    print(
        f"gpu-check: wrote {out / 'gpu-check.json'} and {out / 'gpu-check.md'} in {report['seconds']:.0f} s"
    )
    if failed:
        print(f"gpu-check: FAILED steps: {', '.join(failed)} (their logs are in {out})")
        return 1
    return 0
