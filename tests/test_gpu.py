"""CUDA-only checks that have no CPU twin in the other modules: the Triton kernels ran compiled, bf16
training and its exact resume on the GPU, the potential fitted on the GPU. Run by
``launch/gpu-check.sh`` (``pytest -m gpu``); skipped without CUDA. The CPU twins are in
test_kernels.py (interpreter), test_precision.py (bf16 autocast on the CPU) and test_potential.py."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import train_run
from test_train import tiny_config  # tests/ is on sys.path (pytest prepend mode)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_triton_kernels_ran_compiled_on_the_gpu():
    triton = pytest.importorskip("triton")
    from sdfm import kernels
    from sdfm.semidiscrete.index import reference_argmax

    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "TRITON_INTERPRET=1: the kernels were interpreted"
    assert triton.runtime.driver.active.get_current_target().backend == "cuda"
    gen = torch.Generator().manual_seed(0)
    x, y, g = torch.randn(300, 40, generator=gen), torch.randn(1000, 40, generator=gen), torch.randn(1000)
    found = kernels.argmax(x.cuda(), y.cuda(), g.cuda(), tf32=False)
    assert found.index.is_cuda
    assert torch.equal(found.index.cpu(), reference_argmax(x, y, g))




def test_bf16_is_the_cuda_default_and_resume_is_exact(tmp_path):
    def cfg():
        c = tiny_config("sinkhorn", 30)
        c.train.device, c.train.precision = "cuda", "auto"
        return c

    full = train_run(cfg(), tmp_path / "a")
    assert full.precision == "bf16" and next(full.model.parameters()).is_cuda
    assert all(p.dtype == torch.float32 for p in full.model.parameters())  # master weights stay fp32
    train_run(cfg(), tmp_path / "b", until=20)
    resumed = train_run(cfg(), tmp_path / "b", resume=True)
    for name, p in full.model.state_dict().items():
        assert torch.equal(p, resumed.model.state_dict()[name]), name


def test_the_potential_is_fitted_on_the_gpu():
    from sdfm.semidiscrete import FitterOptions, PotentialFitter

    gen = torch.Generator().manual_seed(0)
    y = torch.randn(2000, 16, generator=gen)
    chi2 = {}
    for device in ("cpu", "cuda"):
        fitter = PotentialFitter(y, FitterOptions(batch_size=512, seed=0), device=device)
        for _ in range(200):
            fitter.step()
        assert fitter.g.device.type == device
        chi2[device] = fitter.evaluate(8192, torch.Generator(device=device).manual_seed(1))
    zero = PotentialFitter(y, FitterOptions(seed=0)).evaluate(8192, torch.Generator().manual_seed(1))
    assert chi2["cuda"] < zero / 10
    assert abs(chi2["cuda"] - chi2["cpu"]) < 0.5 * chi2["cpu"] + 0.01  # the same fit, other rounding
