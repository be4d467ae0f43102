"""Training end to end: exact resume, the run folder rules, and the sdfm commands."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_sdfm, train_run

from sdfm.config import Config

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(kind="exact", steps=40) -> Config:
    cfg = Config()
    cfg.data.num_points, cfg.data.num_eval = 512, 64
    cfg.model.hidden, cfg.model.depth = 32, 2
    cfg.coupling.kind = kind
    cfg.coupling.max_iter = 50
    cfg.coupling.warm_start = True  # exercise the checkpointed warm-start state of the Sinkhorn coupling
    cfg.train.steps, cfg.train.batch_size = steps, 64
    cfg.train.ckpt_every, cfg.train.log_every = 20, 10
    cfg.train.eval_at_end = False
    cfg.optim.warmup_steps = 5
    cfg.optim.schedule = "cosine"
    return cfg




@pytest.mark.parametrize("kind", ["independent", "exact", "sinkhorn"])
def test_resume_is_exact(tmp_path, kind):
    """2N steps in one go == N steps, a new process state from the checkpoint, then N more."""
    full = train_run(tiny_config(kind, 40), tmp_path / "a")
    train_run(tiny_config(kind, 40), tmp_path / "b", until=20)
    resumed = train_run(tiny_config(kind, 40), tmp_path / "b", resume=True)
    for name, p in full.model.state_dict().items():
        assert torch.equal(p, resumed.model.state_dict()[name]), name
    for name, p in full.ema.state_dict().items():
        assert torch.equal(p, resumed.ema.state_dict()[name]), name


def test_run_writes_metrics_and_tensorboard(tmp_path):
    train_run(tiny_config(steps=20), tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [10, 20]
    assert {"loss", "grad_norm", "pairs_per_s", "coupling_ms"} <= lines[0].keys()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents*"))
    assert (tmp_path / "checkpoints" / "step-00000020" / "trainer_state.json").is_file()


def test_loss_decreases_on_moons(tmp_path):
    cfg = tiny_config(steps=300)
    cfg.data.name = "moons"
    cfg.train.log_every = 10
    train_run(cfg, tmp_path)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # one batch's loss is noisy: compare the means of the first and last five logged steps
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5]), losses


# ----------------------------------------------------------------------------------- the CLI


def sdfm_process(*args, timeout=300):
    """``python -m sdfm ARGS`` in a new process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "sdfm", *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout
    )


sdfm = run_sdfm  # the same commands in this process (conftest.run_sdfm): refusals take no interpreter start


TINY = [
    "--data.num_points",
    "600",
    "--data.num_eval",
    "200",
    "--model.hidden",
    "64",
    "--train.batch_size",
    "64",
    "--train.log_every",
    "50",
    "--train.ckpt_every",
    "100",
    "--eval.num_samples",
    "200",
    "--eval.nfe",
    "1",
    "4",
]


@pytest.mark.slow
def test_train_sample_eval_end_to_end(tmp_path):
    run = tmp_path / "run"
    r = sdfm_process(  # the real entry point once; the commands after it run in this process
        "train",
        "--config",
        ROOT / "launch/configs/default.toml",
        "--run-dir",
        run,
        "--train.steps",
        "200",
        *TINY,
    )
    assert r.returncode == 0, r.stderr
    for rel in [
        "config.toml",
        "metrics.jsonl",
        "eval/samples.png",
        "eval/summary.md",
        "eval/eval.json",
        "checkpoints/latest",
    ]:
        assert (run / rel).exists(), rel
    assert "samples picture" in r.stderr and "step     200" in r.stderr
    result = json.loads((run / "eval/eval.json").read_text())
    assert [row["nfe"] for row in result["rows"]][:2] == [1, 4] and result["rows"][-1]["solver"] == "dopri5"
    assert all(row["w2"] > 0 for row in result["rows"]) and result["flow"]["npe"] >= 0

    r = sdfm(
        "sample",
        "--run-dir",
        run,
        "--num",
        "50",
        "--nfe",
        "4",
        "--solver",
        "rk4",
        "--out",
        tmp_path / "s.npy",
    )
    assert r.returncode == 0, r.stderr
    import numpy as np

    assert np.load(tmp_path / "s.npy").shape == (50, 2)
    r = sdfm("sample", "--run-dir", run, "--num", "50", "--out", tmp_path / "s.png")
    assert r.returncode == 0 and (tmp_path / "s.png").stat().st_size > 1000
    r = sdfm("eval", "--run-dir", run, "--num-samples", "100", "--nfe", "2", "--dopri5", "False")
    assert r.returncode == 0, r.stderr
    assert json.loads((run / "eval/eval.json").read_text())["rows"][0]["nfe"] == 2

    # a second train into the same folder is refused, nothing touched
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    r = sdfm("train", "--run-dir", run, "--train.steps", "10")
    assert r.returncode == 2 and "already holds a run" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    # --resume with more steps continues from the saved config
    r = sdfm("train", "--run-dir", run, "--resume", "--train.steps", "250", "--train.eval_at_end", "False")
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stderr and (run / "checkpoints/step-00000250").is_dir()


def test_python_m_sdfm_train_help():
    r = subprocess.run(
        [sys.executable, "-m", "sdfm.train", "--help"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and "--coupling.kind" in r.stdout and "--resume" in r.stdout


@pytest.mark.parametrize(
    "cmd, flags",
    [
        ("sample", ["--run-dir", "--num", "--nfe", "--solver", "--out"]),
        ("eval", ["--run-dir", "--nfe", "--num-samples", "--dopri5"]),
        ("bench", ["sinkhorn", "match", "potential", "data", "gpu-check"]),
        ("train-classifier", ["--data", "--force"]),
        ("data", ["pack", "info", "verify"]),
    ],
)
@pytest.mark.slow
def test_subcommand_help_lists_its_own_options(cmd, flags):
    """Each command's help is its own (generated from its dataclass): it names that command's flags or
    subcommands, which a help that printed another command's usage would not."""
    r = sdfm(cmd, "--help")
    assert r.returncode == 0 and f"sdfm {cmd}" in r.stdout, r.stdout[:500]
    missing = [f for f in flags if f not in r.stdout]
    assert not missing, (missing, r.stdout[:2000])


@pytest.mark.slow
def test_a_refusal_in_a_real_process_is_one_line(tmp_path):
    """What the in-process refusals (``run_sdfm``) cannot see, output at import or at interpreter exit,
    checked once in a real ``python -m sdfm``: stderr is the one error line and nothing else."""
    r = sdfm_process("train", "--run-dir", tmp_path / "run", "--coupling.epsilon", "0")
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: coupling.epsilon"), r.stderr


def _assert_clean_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


@pytest.mark.parametrize(
    "args, needles",
    [
        (
            ["--data.name", "file", "--data.path", "/no/such/file.npy"],
            ["error:", "/no/such/file.npy", "does not exist"],
        ),
        (["--coupling.epsilon", "0"], ["error:", "coupling.epsilon"]),
        (["--coupling.epsilon", "-0.5"], ["error:", "coupling.epsilon"]),
        (["--coupling.kind", "magic"], ["coupling.kind"]),
        (["--coupling.nosuchkey", "1"], ["coupling.nosuchkey"]),
        (
            ["--coupling.kind", "sinkhorn", "--coupling.backend", "keops", "--coupling.precision", "bf16"],
            ["error: coupling.precision = 'bf16' cannot be computed by coupling.backend = 'keops'"],
        ),
        (
            [
                "--coupling.kind",
                "semidiscrete",
                "--potential.index",
                "faiss",
                "--potential.precision",
                "bf16",
            ],
            [
                "error: potential.index = 'faiss' on the CPU matches in fp32 only",
                "potential.precision = 'fp32'",
            ],
        ),
        pytest.param(
            ["--coupling.kind", "semidiscrete", "--potential.device", "cuda"],
            ["error: potential.device = 'cuda' but CUDA is not available", "'cpu' or 'auto'"],
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is there"),
        ),
    ],
)
@pytest.mark.slow
def test_bad_input_exits_2(tmp_path, args, needles):
    r = sdfm("train", "--run-dir", tmp_path / "run", *args)
    _assert_clean_error(r, *needles)
    if needles[0].startswith("error:"):  # sdfm's own checks: one line (tyro's parse errors: a box)
        assert len([line for line in r.stderr.splitlines() if line.strip()]) == 1, r.stderr
    assert not (tmp_path / "run").exists()  # rejected before the run folder is touched


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"\x93NUMPY garbage", "cannot read"),
        (None, "empty"),
        ("nan", "NaN, Inf"),
        ("shape", "shape"),
    ],
)
@pytest.mark.slow
def test_bad_data_files_exit_2(tmp_path, content, needle):
    import numpy as np

    p = tmp_path / "d.npy"
    if content is None:
        np.save(p, np.zeros((0, 2), np.float32))
    elif content == "nan":
        a = np.ones((50, 2), np.float32)
        a[3, 1] = np.nan
        np.save(p, a)
    elif content == "shape":
        np.save(p, np.ones(50, np.float32))
    else:
        p.write_bytes(content)
    r = sdfm("train", "--run-dir", tmp_path / "run", "--data.name", "file", "--data.path", p)
    _assert_clean_error(r, "error:", str(p), needle)


def test_unknown_key_in_config_file_exits_2(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[train]\nsteps = 5\nbogus = 1\n")
    _assert_clean_error(sdfm("train", "--config", p, "--run-dir", tmp_path / "r"), "train.bogus")


@pytest.mark.slow
def test_corrupted_checkpoint_falls_back_then_fails(tmp_path):
    run = tmp_path / "run"
    r = sdfm(
        "train",
        "--run-dir",
        run,
        *TINY,
        "--train.steps",
        "40",
        "--train.ckpt_every",
        "20",
        "--train.eval_at_end",
        "False",
    )
    assert r.returncode == 0, r.stderr
    newest = run / "checkpoints" / "step-00000040"
    model = newest / "model.safetensors"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])  # torn write
    r = sdfm("train", "--run-dir", run, "--resume", "--train.steps", "40", "--train.eval_at_end", "False")
    assert r.returncode == 0, r.stderr
    assert "skipping checkpoint" in r.stderr and "resumed from" in r.stderr and "step-00000020" in r.stderr
    # every checkpoint damaged: a clear error, exit 2
    for d in (run / "checkpoints").glob("step-*"):
        (d / "trainer_state.json").write_text("{")
    r = sdfm("train", "--run-dir", run, "--resume", "--train.eval_at_end", "False")
    _assert_clean_error(r, "no complete checkpoint")


@pytest.mark.slow
def test_run_dir_rules(tmp_path):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("mine")
    _assert_clean_error(sdfm("train", "--run-dir", tmp_path / "stuff"), "not empty")
    assert (tmp_path / "stuff" / "notes.txt").read_text() == "mine"
    _assert_clean_error(sdfm("train", "--run-dir", tmp_path / "x", "--resume", "--overwrite"), "contradict")
    _assert_clean_error(
        sdfm("sample", "--run-dir", tmp_path / "stuff", "--out", tmp_path / "o.npy"), "no sdfm run"
    )


@pytest.mark.parametrize("kind", ["exact", "semidiscrete"])
def test_prefetched_pairs_are_the_synchronous_pairs(tmp_path, kind):
    """CPU couplings pair step k + 1 in a background thread while step k trains: the same weights, bit
    for bit, as pairing each step in turn; and a resume in the middle continues them exactly."""
    runs = {}
    for prefetch in (False, True):
        cfg = tiny_config(kind, 40)
        cfg.potential.max_steps, cfg.potential.batch_size = 200, 64
        cfg.train.prefetch_pairs = prefetch
        runs[prefetch] = train_run(cfg, tmp_path / str(prefetch))
    assert runs[True].pairing.prefetching and runs[True].pairing.prefetched == 39
    assert not runs[False].pairing.prefetching and runs[False].pairing.prefetched == 0
    for name, p in runs[False].model.state_dict().items():
        assert torch.equal(p, runs[True].model.state_dict()[name]), name
    cfg = tiny_config(kind, 40)
    cfg.potential.max_steps, cfg.potential.batch_size = 200, 64
    train_run(cfg, tmp_path / "resumed", until=20)
    resumed = train_run(cfg, tmp_path / "resumed", resume=True)
    for name, p in runs[False].model.state_dict().items():
        assert torch.equal(p, resumed.model.state_dict()[name]), name
