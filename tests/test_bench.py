"""The benchmark suite at toy sizes: every derived figure follows from the measured times, its float64
checks agree, and the goals are decided from the rows (pending exactly when no GPU ran)."""

import importlib.util
import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from sdfm.bench import suite
from sdfm.bench.match import MatchBench, label
from sdfm.bench.match import run as run_match
from sdfm.bench.potential import PotentialBench
from sdfm.bench.sinkhorn import reference_sinkhorn
from sdfm.ot.sinkhorn import SinkhornOptions, sinkhorn


@pytest.fixture(scope="session")  # once per xdist worker, even if its tests of this module come in several runs
def toy(tmp_path_factory):  # (SuiteBench runs on one thread itself)
    path = tmp_path_factory.mktemp("bench") / "suite.json"
    assert suite.SuiteBench(workload="toy", threads=1, device="cpu", json=path).run() == 0
    return json.loads(path.read_text())


def test_sinkhorn_rows_report_their_median_and_every_peer(toy):
    timed = {r["method"]: r for r in toy["sinkhorn"] if "s_per_iter" in r}
    assert "sdfm torch" in timed and "pot sinkhorn_log" in timed, toy["sinkhorn"]
    for r in timed.values():
        assert r["total_s"] == pytest.approx(statistics.median(r["times_s"]))  # the median run, not the mean
        assert r["s_per_iter"] == pytest.approx(r["total_s"] / r["iters"])
        assert 0 < r["peak_share"] and max(r["row_err"], r["col_err"]) < 1.0
        # Wiring: the figures used this row's own n and d (the formula itself: the hand-worked test below).
        assert r["tflops"] * r["s_per_iter"] * 1e12 == pytest.approx(4 * r["n"] ** 2 * r["d"])
    ours = timed["sdfm torch"]
    assert "f64_dev" in ours and ours["cpu_util"] > 0 and "pot sinkhorn_log" in ours["vs_peers"]


def test_matching_rows_report_their_median_and_every_peer(toy):
    timed = {label(r["method"], r["precision"]): r for r in toy["match"] if "seconds" in r}
    faiss = importlib.util.find_spec("faiss") is not None  # an extra (.[cpu]); without it, no FAISS rows
    for method in ("sdfm-torch fp32", "sdfm-torch bf16", "torch-matmul") + (
        ("sdfm-faiss fp32", "faiss-flat", "faiss-fp16") if faiss else ()
    ):
        r = timed[method]
        assert r["seconds"] == pytest.approx(statistics.median(r["times_s"]))
        assert r["queries_per_s"] == pytest.approx(r["B"] / r["seconds"])
        assert 0 < r["peak_share"] and "f64_agree" in r and r["cpu_util"] > 0
    peers = {"faiss-flat", "faiss-fp16", "torch-matmul"} if faiss else {"torch-matmul"}
    for method in ("sdfm-torch fp32", "sdfm-torch bf16") + (("sdfm-faiss fp32",) if faiss else ()):
        assert set(timed[method]["vs_peers"]) == peers
    train = toy["train_step"]
    assert train["match_share"] == pytest.approx(train["match_s"] / (train["match_s"] + train["step_s"]))
    assert math.isfinite(toy["peak_flops"]) and "measured fp32 GEMM peak" in toy["peak"]


def test_throughput_figures_are_the_known_answers_of_hand_timed_rows():
    """The formulas against answers worked out by hand (a changed flop count, a ratio turned upside
    down or a peer from another cell fails this; re-deriving the formula in the test would not)."""
    sk = [
        {"method": "sdfm torch", "s_per_iter": 0.02},
        {"method": "pot sinkhorn_log", "s_per_iter": 0.05},
        {"method": "geomloss (5 its, eps-scaling)", "s_per_iter": 0.01},
        {"method": "sdfm keops", "skipped": "not installed"},
    ]
    suite.sinkhorn_figures(sk, n=1000, d=50, peak=1e12)
    # An iteration: 4 n² d = 2e8 flop; in 0.02 s that is 1e10 flop/s = 0.01 TFLOP/s, 1% of 1e12.
    assert sk[0]["tflops"] == pytest.approx(0.01) and sk[0]["peak_share"] == pytest.approx(0.01)
    assert sk[1]["tflops"] == pytest.approx(0.004) and "flops_note" in sk[1]
    assert sk[0]["vs_peers"] == pytest.approx({"pot sinkhorn_log": 2.5, "geomloss (5 its, eps-scaling)": 0.5})
    assert "vs_peers" not in sk[1] and "tflops" not in sk[3]
    mt = [
        {"method": "sdfm-torch", "B": 100, "N": 1000, "d": 50, "seconds": 0.01},
        {"method": "faiss-flat", "B": 100, "N": 1000, "d": 50, "seconds": 0.03},
        {"method": "faiss-flat", "B": 200, "N": 1000, "d": 50, "seconds": 0.001},  # another cell
    ]
    suite.match_figures(mt, peak=1e12)
    # 2 B N d = 1e7 flop in 0.01 s: 1e9 flop/s = 0.001 TFLOP/s.
    assert mt[0]["tflops"] == pytest.approx(0.001) and mt[0]["peak_share"] == pytest.approx(0.001)
    assert mt[0]["vs_peers"] == pytest.approx({"faiss-flat": 3.0})


def test_rows_that_cannot_run_here_say_why(toy):
    triton = [r for r in toy["sinkhorn"] + toy["match"] if "triton" in r["method"]]
    assert triton and all("CUDA" in r["skipped"] for r in triton)
    flash = [r for r in toy["sinkhorn"] if r["method"] == "flash-sinkhorn"]
    assert flash and ("not installed" in flash[0]["skipped"] or "CUDA" in flash[0]["skipped"])


def test_cpu_goals_are_decided_from_the_measured_ratios(toy):
    goals = {g["goal"]: g for g in toy["goals"]}
    cpu = [g for name, g in goals.items() if name.startswith("CPU: Sinkhorn")]
    assert cpu
    rows = [r for r in toy["sinkhorn"] if "s_per_iter" in r]
    best_peer = min(r["s_per_iter"] for r in rows if not r["method"].startswith("sdfm"))
    slowest_ours = max(r["s_per_iter"] for r in rows if r["method"].startswith("sdfm"))
    assert cpu[0]["status"] == ("met" if slowest_ours <= best_peer else "not met")


def _gpu_rows(sinkhorn_ms: float, keops_ms: float, match_ms: float, faiss_ms: float, share: float):
    sk = [
        {"method": "sdfm torch", "n": 65536, "d": 3072, "s_per_iter": sinkhorn_ms / 1e3},
        {"method": "geomloss (5 its, eps-scaling)", "n": 65536, "d": 3072, "s_per_iter": keops_ms / 1e3},
    ]
    mt = [
        {"method": "sdfm-torch", "N": 1_281_167, "B": 4096, "seconds": match_ms / 1e3},
        {"method": "faiss-flat", "N": 1_281_167, "B": 4096, "seconds": faiss_ms / 1e3, "where": "gpu"},
    ]
    return sk, mt, {"match_share": share}


def test_gpu_goals_are_pending_exactly_without_a_gpu():
    sk, mt, train = _gpu_rows(60, 900, 40, 200, 0.05)
    for device in ("cpu", "cuda"):
        statuses = [g["status"] for g in suite.goals("gpu", torch.device(device), sk, mt, train)]
        gpu = statuses[:5]
        assert all(s == "pending (no GPU)" for s in gpu) == (device == "cpu"), (device, statuses)
    # Off CUDA even a GPU workload's rows decide nothing; on CUDA they decide every goal.
    met = suite.goals("gpu", torch.device("cuda"), sk, mt, train)
    assert [g["status"] for g in met] == ["met"] * 5
    missed = suite.goals("gpu", torch.device("cuda"), *_gpu_rows(200, 900, 100, 200, 0.5))
    # 200 ms is 3.8x the 53 ms floor; KeOps only 4.5x slower; matching 3x its floor, FAISS 2x; 50%.
    assert [g["status"] for g in missed] == ["not met"] * 5


def test_float64_errors_are_small(toy):
    rows = {r["method"]: r for r in toy["sinkhorn"] if "f64_dev" in r}
    for name, r in rows.items():
        if not name.endswith("bf16"):
            assert r["f64_dev"] < 1e-3, r  # in units of eps
    # The bf16 row really computed in bf16 (on a CPU: rounded operands), within its stated error.
    assert rows["sdfm torch"]["f64_dev"] < rows["sdfm torch bf16"]["f64_dev"] < 0.5
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


def test_low_precision_matching_on_real_data_is_rescored_to_the_float64_answer(one_thread):
    """bench match on digits with a fitted potential: sdfm's 16-bit rows agree with float64 on every
    checked query and report their fallback rate; the uncertified bf16-raw row is the reference."""
    options = MatchBench(
        data="digits", N=[600], B=[128], methods=["sdfm-torch", "bf16-raw"], precisions=["fp32", "fp16"],
        fit_seconds=0.5, repeats=1, budget=5.0, f64_check=128, device="cpu",
    )  # fmt: skip
    rows = {label(r["method"], r["precision"]): r for r in run_match(options)}
    assert set(rows) == {"sdfm-torch fp32", "sdfm-torch fp16", "bf16-raw"}
    assert all((r["N"], r["d"], r["data"]) == (600, 64, "digits") for r in rows.values())
    assert rows["sdfm-torch fp32"]["f64_agree"] == rows["sdfm-torch fp16"]["f64_agree"] == 1.0
    assert 0.0 <= rows["sdfm-torch fp16"]["fallback_rate"] <= 1.0 and "fallback_rate" not in rows["bf16-raw"]
    assert 0.0 < rows["bf16-raw"]["f64_agree"] <= 1.0


@pytest.mark.slow
def test_potential_bench_runs_a_two_rank_fit(tmp_path):
    path = tmp_path / "potential.json"
    bench = PotentialBench(
        data="gaussian", gaussian_n=400, gaussian_d=8, methods=["sgd_ema"], ranks=[1, 2], budget=1.0,
        checkpoints=2, batch_size=256, eval_samples=1024, json=path,
    )  # fmt: skip
    assert bench.run() == 0
    runs = {m["label"]: m for m in json.loads(path.read_text())["methods"]}
    assert set(runs) == {"sgd_ema", "sgd_ema x2"} and runs["sgd_ema x2"]["ranks"] == 2
    for run in runs.values():
        steps = [r["steps"] for r in run["rows"]]
        assert steps == sorted(steps) and steps[0] >= 1 and all(math.isfinite(r["chi2"]) for r in run["rows"])
        assert run["rows"][-1]["seconds"] >= 1.0


def test_potential_bench_snapshots_a_2d_set_at_the_asked_times(tmp_path):
    path = tmp_path / "potential.json"
    bench = PotentialBench(
        data="moons", points=600, methods=["sgd_tail"], at=[0.6, 0.3], threads=1, batch_size=128,
        eval_samples=1024, clusters=8, json=path,
    )  # fmt: skip
    assert bench.run() == 0
    data = json.loads(path.read_text())
    assert (data["data"]["n"], data["data"]["d"]) == (600, 2)
    (run,) = data["methods"]
    assert run["settings"]["init"] == "coarse"  # 2-D cells are narrow: the coarse start
    times = [r["seconds"] for r in run["rows"]]
    assert len(times) == 2 and 0.3 <= times[0] < 0.6 <= times[1]
    assert run["rows"][-1]["chi2"] < data["chi2_zero"]
    share = run["clusters"]  # the cluster part of a χ² is at most the whole (the masses coarsened)
    assert share["k"] == 8 and 0 <= share["cluster_chi2"] <= share["plug_in_chi2"] + 1e-6


@pytest.mark.slow
def test_quality_bench_runs_every_method_cell_and_refuses_a_negative_fine_tune(tmp_path, capsys):
    """The cells of ``--methods``, ``--finetune-steps`` (OAT beside its control) at a toy size."""
    import json

    from sdfm.bench.quality import QualityBench
    from sdfm.errors import UserError

    out = tmp_path / "rows.json"
    bench = QualityBench(
        steps=6, batch_size=32, tasks=["8gaussians"], couplings=["independent"], methods=["fm", "meanflow"],
        finetune_steps=4, nfe=[1], out=tmp_path / "runs", json=out,
    )  # fmt: skip
    assert bench.run() == 0
    rows = json.loads(out.read_text())
    assert [r["method"] for r in rows] == ["fm", "fm +4 (control)", "oat +4", "meanflow"]
    assert all(r["metric"] == "w2" and r["nfe1"] > 0 for r in rows)
    assert "| 8gaussians | independent | oat +4 | w2 |" in capsys.readouterr().out
    with pytest.raises(UserError, match="--finetune-steps must be >= 0"):
        QualityBench(finetune_steps=-1, out=tmp_path / "x").run()


def test_potential_bench_snapshots_at_step_counts(tmp_path):
    """--at-steps: every method (sdfm and POT) is scored at exactly those step counts, with the noise
    samples and products they cost, by the one evaluator."""
    from sdfm.bench.potential import PotentialBench

    out = tmp_path / "p.json"
    bench = PotentialBench(data="digits", at_steps=[3, 6], methods=["sgd_tail", "pot"], eval_samples=2048,
                           batch_size=256, threads=1, json=out)  # fmt: skip
    assert bench.run() == 0
    methods = json.loads(out.read_text())["methods"]
    assert [m["method"] for m in methods] == ["sgd_tail", "pot"]
    for m in methods:
        assert [r["steps"] for r in m["rows"]] == [3, 6]
        assert [r["samples"] for r in m["rows"]] == [768, 1536]
        assert m["rows"][1]["products"] == 1536 * 1797 * 64
        assert all(math.isfinite(r["over_floor"]) for r in m["rows"])


def test_quality_cells_and_the_cpu_unet_preset(tmp_path):
    """``--cells`` picks coupling:method pairs in order and refuses a malformed pair before any work;
    the fashion-mnist-unet task trains the model of launch/configs/fashion-mnist-unet-cpu.toml."""
    from sdfm.bench.quality import QualityBench, _cells, task_config
    from sdfm.config import load_config
    from sdfm.errors import UserError

    bench = QualityBench(tasks=["fashion-mnist-unet"], cells=["independent:fm", "semidiscrete:meanflow"])
    assert list(_cells(bench)) == [
        ("fashion-mnist-unet", "independent", "fm", "linear"),
        ("fashion-mnist-unet", "semidiscrete", "meanflow", "linear"),
    ]
    for bad in ("semidiscrete", "sd:fm", "exact:oat"):
        with pytest.raises(UserError, match="is not coupling:method"):
            QualityBench(cells=[bad], out=tmp_path / "x").run()
    assert not (tmp_path / "x").exists()
    preset = load_config(Path(__file__).parents[1] / "launch/configs/fashion-mnist-unet-cpu.toml")
    task = task_config("fashion-mnist-unet", "semidiscrete", 1500, 0, 64)
    assert task.model == preset.model and task.data.max_points == preset.data.max_points == 0
    assert task.potential.pca_dim == preset.potential.pca_dim == 64


def test_potential_bench_passes_its_start_and_tail_power_to_the_fitter(tmp_path):
    """--init and --tail-power reach the fit: the start is reported, and another η averages other
    iterates (at step 2, weights 1/2 against 4/5), so the potential scores differently."""
    chi2 = {}
    for eta in (0.0, 3.0):
        out = tmp_path / f"p{eta}.json"
        bench = PotentialBench(data="digits", at_steps=[2], methods=["sgd_tail"], eval_samples=1024,
                               batch_size=256, threads=1, init="gaussian", tail_power=eta, json=out)  # fmt: skip
        assert bench.run() == 0
        (run,) = json.loads(out.read_text())["methods"]
        assert run["settings"]["init"] == "gaussian"
        chi2[eta] = run["rows"][0]["chi2"]
    assert chi2[0.0] != chi2[3.0]
