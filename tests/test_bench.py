"""The benchmark suite at toy sizes: it runs, writes every column, and its float64 checks agree."""

import json
import math

import pytest
import torch

from sdfm.bench import suite
from sdfm.bench.sinkhorn import reference_sinkhorn
from sdfm.ot.sinkhorn import SinkhornOptions, sinkhorn


@pytest.fixture(scope="module")
def toy(tmp_path_factory, one_thread):
    path = tmp_path_factory.mktemp("bench") / "suite.json"
    assert suite.SuiteBench(workload="toy", threads=1, device="cpu", json=path).run() == 0
    return json.loads(path.read_text())


def test_suite_writes_every_column(toy):
    sdfm_sk = [r for r in toy["sinkhorn"] if r["method"] == "sdfm torch"]
    assert sdfm_sk, toy["sinkhorn"]
    for r in sdfm_sk:
        for key in ("s_per_iter", "tflops", "peak_share", "f64_dev", "row_err", "cpu_util", "vs_peers"):
            assert key in r, key
        assert "pot sinkhorn_log" in r["vs_peers"]
    rows = {r["method"]: r for r in toy["match"]}
    for method in ("sdfm-torch", "sdfm-faiss", "faiss-flat", "faiss-fp16", "torch-matmul"):
        for key in ("seconds", "queries_per_s", "tflops", "peak_share", "f64_agree", "cpu_util"):
            assert key in rows[method], (method, key)
    assert set(rows["sdfm-torch"]["vs_peers"]) == {"faiss-flat", "faiss-fp16", "torch-matmul"}
    assert math.isfinite(toy["peak_flops"]) and "measured fp32 GEMM peak" in toy["peak"]
    assert 0 < toy["train_step"]["match_share"] < 1


def test_suite_skips_with_a_reason_and_marks_gpu_goals_pending(toy):
    triton = [r for r in toy["sinkhorn"] + toy["match"] if "triton" in r["method"]]
    assert triton and all("CUDA" in r["skipped"] for r in triton)
    flash = [r for r in toy["sinkhorn"] if r["method"] == "flash-sinkhorn"]
    assert flash and ("not installed" in flash[0]["skipped"] or "CUDA" in flash[0]["skipped"])
    statuses = {g["goal"]: g["status"] for g in toy["goals"]}
    assert all(s == "pending (no GPU)" for g, s in statuses.items() if g.startswith("GPU"))
    assert any(g.startswith("CPU") for g in statuses)


def test_float64_errors_are_small(toy):
    for r in toy["sinkhorn"]:
        if "f64_dev" in r:
            assert r["f64_dev"] < 1e-3, r  # in units of eps
    for r in toy["match"]:
        if "f64_agree" in r:
            assert r["f64_agree"] == 1.0, r  # fp32 on the CPU: no near-ties at these sizes


def test_reference_sinkhorn_is_sdfms_iteration(one_thread):
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(200, 5, generator=gen), torch.randn(150, 5, generator=gen) + 1
    ours = sinkhorn(x, y, SinkhornOptions(epsilon=0.1, max_iter=7, tol=0.0))
    f, g, iters = reference_sinkhorn(x, y, 0.1, 7, block=64)
    assert iters == 7 and f.dtype == torch.float64
    assert torch.allclose(ours.f.double(), f, atol=1e-4 * ours.eps)
    assert torch.allclose(ours.g.double(), g, atol=1e-4 * ours.eps)
