"""The one-shot GPU check (launch/gpu-check.sh): its dry run on this CPU machine runs every step that
needs no CUDA and writes the report; without --dry-run it refuses to pretend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU machine's check")
def test_dry_run_runs_every_step_and_says_it_is_not_a_gpu_figure(tmp_path):
    out = tmp_path / "report"
    env = os.environ | {"SDFM_PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(ROOT / "launch" / "gpu-check.sh"), "--dry-run", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu-check.json").read_text())
    assert report["dry_run"] is True
    steps = report["steps"]
    assert {name: s["status"] for name, s in steps.items()} == {
        n: "dry run" for n in ("tests", "suite", "train")
    }
    assert steps["tests"]["skipped"] >= 3 and steps["tests"]["failed"] == 0  # CUDA tests collected, skipped
    assert steps["suite"]["workload"] == "toy" and steps["suite"]["sinkhorn"] and steps["suite"]["match"]
    assert all("pending" in g["status"] for g in steps["suite"]["goals"] if g["goal"].startswith("GPU"))
    train = steps["train"]
    assert train["steps"] == 4 and train["loss_finite"] and train["worker_refreshed_g"]
    markdown = (out / "gpu-check.md").read_text()
    assert "no figure below was measured on a GPU" in markdown and "| train | dry run |" in markdown
    for log in ("tests.log", "suite.log", "train.log"):
        assert (out / log).is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="refusal without CUDA")
def test_without_cuda_and_without_dry_run_it_refuses_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sdfm", "bench", "gpu-check", "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "--dry-run" in lines[0]
    assert not (tmp_path / "r").exists()  # nothing written
