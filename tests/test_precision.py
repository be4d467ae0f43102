"""Mixed-precision training on the CPU (bf16 autocast, fp16 with a gradient scaler): what runs in low
precision and what stays fp32, exact resume in every precision, and the precision checks."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import train_run
from test_train import tiny_config  # tests/ is on sys.path (pytest prepend mode)

from sdfm import amp
from sdfm.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")




def test_auto_is_fp32_on_the_cpu_and_bad_names_are_refused():
    assert amp.resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert amp.resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(UserError, match="train.precision"):
        amp.resolve_precision("fp8", torch.device("cpu"))


def test_bf16_without_gpu_support_names_the_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")
    with pytest.raises(UserError, match="train.precision = 'bf16'.*V100.*'fp16' or 'fp32'"):
        amp.resolve_precision("bf16", torch.device("cuda"))
    assert amp.resolve_precision("auto", torch.device("cuda")) == "fp32"


def test_bf16_autocast_runs_the_model_in_bf16_and_keeps_master_state_fp32(tmp_path):
    cfg = tiny_config(steps=10)
    cfg.train.precision = "bf16"
    trainer = train_run(cfg, tmp_path)
    seen = []
    hook = trainer.model.layers[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    trainer.train_step()
    hook.remove()
    assert seen == [torch.bfloat16]  # the forward pass ran under autocast
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert all(p.dtype == torch.float32 for p in trainer.ema.module.parameters())
    state = trainer.optimizer.state_dict()["state"]
    assert state and all(v["exp_avg"].dtype == torch.float32 for v in state.values())
    assert not trainer.scaler.is_enabled()


def test_low_precision_training_differs_from_fp32_but_still_learns(tmp_path):
    runs = {}
    for precision in ("fp32", "bf16"):
        cfg = tiny_config(steps=200)
        cfg.data.name = "moons"
        cfg.train.precision = precision
        runs[precision] = train_run(cfg, tmp_path / precision)
    a, b = (dict(runs[p].model.named_parameters()) for p in ("fp32", "bf16"))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # bf16 really changed the arithmetic
    losses = {}
    for p, t in runs.items():
        lines = [json.loads(x)["loss"] for x in (t.run_dir / "metrics.jsonl").read_text().splitlines()]
        losses[p] = sum(lines[-5:]) / 5
    assert losses["bf16"] < 2 * losses["fp32"] + 0.5, losses


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_resume_is_exact_in_low_precision(tmp_path, precision):
    def cfg():
        c = tiny_config("exact", 40)
        c.train.precision = precision
        return c

    full = train_run(cfg(), tmp_path / "a")
    train_run(cfg(), tmp_path / "b", until=20)
    resumed = train_run(cfg(), tmp_path / "b", resume=True)
    for name, p in full.model.state_dict().items():
        assert torch.equal(p, resumed.model.state_dict()[name]), name
    for name, p in full.ema.state_dict().items():
        assert torch.equal(p, resumed.ema.state_dict()[name]), name
    if precision == "fp16":
        assert resumed.scaler.is_enabled()
        assert resumed.scaler.state_dict() == full.scaler.state_dict()
        assert (tmp_path / "b" / "checkpoints" / "step-00000020" / "scaler.safetensors").is_file()


@pytest.mark.slow
def test_compiled_model_trains_like_the_eager_one(tmp_path):
    runs = {}
    for compile_ in (False, True):
        cfg = tiny_config(steps=5)
        cfg.train.compile = compile_
        runs[compile_] = train_run(cfg, tmp_path / str(compile_))
    eager, compiled = (dict(runs[c].model.named_parameters()) for c in (False, True))
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-4, atol=1e-5)
