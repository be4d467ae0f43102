"""The fused Triton kernels (sdfm.kernels) and the 'triton' / 'auto' backends.

Without CUDA the kernels run through Triton's interpreter (TRITON_INTERPRET=1, set below before
anything imports triton: Triton reads it once, at import), against float64 brute force and against the
torch backends; sizes are small and ragged (not multiples of the tiles) because the interpreter is
slow. With CUDA the same tests run the compiled kernels on the GPU. One test compiles the kernels for
an H100 (sm_90) without a GPU, so the compiled code path is type-checked and lowered on a CPU too.
"""

import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from sdfm import kernels  # noqa: E402
from sdfm.couplings.sinkhorn import SinkhornCoupling  # noqa: E402
from sdfm.errors import UserError  # noqa: E402
from sdfm.kernels.auto import AutoBackend  # noqa: E402
from sdfm.ot import SinkhornOptions, sample_rows, sinkhorn  # noqa: E402
from sdfm.semidiscrete.index import MatchIndex, reference_argmax  # noqa: E402

# On a GPU every kernel test is also a CUDA test (the compiled kernels): `pytest -m gpu` runs them.
pytestmark = [pytest.mark.usefixtures("one_thread")] + (
    [pytest.mark.gpu] if torch.cuda.is_available() else []
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _problem(n, m, d, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=gen).to(DEVICE, dtype)
    b = torch.randn(m, d, generator=gen).to(DEVICE, dtype)
    h = 3.0 * torch.randn(m, generator=gen).to(DEVICE)  # a spread of biases exercises the rescaling
    return a, b, h


def _scores64(a, b, h):
    """Float64 scores on the CPU."""
    return h.cpu().double() + a.cpu().double() @ b.cpu().double().T


@pytest.mark.parametrize("d", [2, 17, 64])
def test_lse_matches_float64(d):
    a, b, h = _problem(300, 257, d)
    ref = torch.logsumexp(_scores64(a, b, h), 1)
    out = kernels.lse(a, b, h).cpu()
    assert out.dtype == torch.float32 and out.shape == (300,)
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lse_16bit_inputs_accumulate_in_fp32(dtype):
    a, b, h = _problem(130, 200, 17, dtype=dtype)
    ref = torch.logsumexp(_scores64(a, b, h), 1)  # of the rounded inputs: the products are exact
    torch.testing.assert_close(kernels.lse(a, b, h).cpu().double(), ref, rtol=1e-6, atol=2e-5)


def test_lse_column_splits_merge_exactly():
    a, b, h = _problem(70, 300, 17, seed=1)
    ref = torch.logsumexp(_scores64(a, b, h), 1)
    torch.testing.assert_close(kernels.lse(a, b, h, splits=3).cpu().double(), ref, rtol=1e-6, atol=2e-5)


@pytest.mark.parametrize("d", [2, 17, 64])
def test_argmax_matches_float64_brute_force(d):
    a, b, h = _problem(300, 257, d, seed=2)
    scores = _scores64(a, b, h)
    out = kernels.Argmax(*(t.cpu() for t in kernels.argmax(a, b, h)))
    assert out.index.dtype == torch.long
    assert torch.equal(out.index, scores.argmax(1))
    torch.testing.assert_close(out.values.double(), scores.amax(1), rtol=1e-6, atol=2e-5)
    assert torch.equal(kernels.argmax(a, b, h, splits=4).index.cpu(), out.index)


def test_argmax_ties_go_to_the_smallest_index():
    # Small integers: every score is exact in fp32, and columns j and j + 150 are equal. The second
    # copy lies in a later tile (and, with splits, a later split): the first copy must win.
    gen = torch.Generator().manual_seed(3)
    a = torch.randint(-3, 4, (90, 5), generator=gen).float().to(DEVICE)
    b = torch.randint(-3, 4, (150, 5), generator=gen).float().to(DEVICE)
    h = torch.randint(-3, 4, (150,), generator=gen).float().to(DEVICE)
    b2, h2 = torch.cat([b, b]), torch.cat([h, h])
    expected = _scores64(a, b2, h2).argmax(1)  # torch: the first maximal index
    assert bool((expected < 150).all())
    for splits in (None, 3):
        assert torch.equal(kernels.argmax(a, b2, h2, splits=splits).index.cpu(), expected)


@pytest.mark.parametrize("cost,d", [("sqeuclidean", 2), ("dot", 17), ("sqeuclidean", 64)])
def test_gumbel_sampling_draws_what_sample_rows_draws(cost, d):
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(210, d, generator=gen).to(DEVICE), torch.randn(170, d, generator=gen).to(DEVICE) + 0.5
    result = sinkhorn(x, y, SinkhornOptions(epsilon=0.1, cost=cost, max_iter=20))
    want = sample_rows(x, y, result, SinkhornOptions(cost=cost, block_size=64), seed=123, row_offset=7)
    got = sample_rows(x, y, result, SinkhornOptions(cost=cost, backend="triton"), seed=123, row_offset=7)
    assert torch.equal(got, want)
    again = sample_rows(x, y, result, SinkhornOptions(cost=cost, block_size=64), seed=124, row_offset=7)
    assert not torch.equal(want, again)


def test_gumbel_noise_does_not_depend_on_splits():
    a, b, h = _problem(50, 200, 17, seed=5)
    keys = torch.randint(0, 2**32, (50,), dtype=torch.long, device=DEVICE)
    one, three = kernels.gumbel_argmax(a, b, h, keys), kernels.gumbel_argmax(a, b, h, keys, splits=3)
    assert torch.equal(one.index, three.index) and torch.equal(one.values, three.values)


@pytest.mark.parametrize("cost", ["sqeuclidean", "dot"])
def test_sinkhorn_triton_equals_torch(cost):
    gen = torch.Generator().manual_seed(6)
    x, y = (
        torch.randn(150, 17, generator=gen).to(DEVICE),
        torch.randn(130, 17, generator=gen).to(DEVICE) + 1.0,
    )
    kw = dict(epsilon=0.1, cost=cost, tol=0.0, max_iter=25)
    ref, out = sinkhorn(x, y, SinkhornOptions(**kw)), sinkhorn(x, y, SinkhornOptions(backend="triton", **kw))
    assert out.iters == ref.iters == 25
    torch.testing.assert_close(out.f, ref.f, rtol=0, atol=1e-4 * ref.eps)
    torch.testing.assert_close(out.g, ref.g, rtol=0, atol=1e-4 * ref.eps)
    assert out.err == pytest.approx(ref.err, rel=1e-3, abs=1e-6)


def test_sinkhorn_coupling_samples_with_its_backend():
    gen = torch.Generator().manual_seed(7)
    x0, x1 = torch.randn(100, 2, generator=gen).to(DEVICE), torch.randn(100, 2, generator=gen).to(DEVICE)
    pairs = [
        SinkhornCoupling(SinkhornOptions(backend=backend, max_iter=15)).match(
            x0, x1, torch.Generator().manual_seed(0)
        )
        for backend in ("torch", "triton")
    ]
    assert torch.equal(pairs[0], pairs[1])


@pytest.mark.parametrize("labeled", [False, True])
def test_match_index_triton_equals_reference_and_updates_in_place(labeled):
    gen = torch.Generator().manual_seed(8)
    y, x = torch.randn(260, 17, generator=gen).to(DEVICE), torch.randn(100, 17, generator=gen).to(DEVICE)
    labels = torch.randint(0, 3, (260,), generator=gen) if labeled else None
    qlabels = torch.randint(0, 3, (100,), generator=gen) if labeled else None
    index = MatchIndex(y, backend="triton", labels=labels, precision="fp32")
    block = index._blocks[0]
    bias_ptr, keys_ptr = block.bias.data_ptr(), block.keys.data_ptr()
    for scale in (0.0, 2.0, 5.0):
        g = scale * torch.randn(260, generator=gen).to(DEVICE)
        index.set_potential(g)
        want = reference_argmax(x, y, g, labels=labels, query_labels=qlabels)
        assert torch.equal(index.search(x, qlabels).cpu(), want)
    # set_potential rewrote the bias where it was: no new tensors, no rebuilt keys.
    assert (block.bias.data_ptr(), block.keys.data_ptr()) == (bias_ptr, keys_ptr)
    top = index.topk(x, 3, qlabels)  # the torch loop's top-k on the same keys and bias
    assert torch.equal(top.index[:, 0].cpu(), want)


def test_match_index_triton_with_pca():
    gen = torch.Generator().manual_seed(9)
    y, x = torch.randn(200, 40, generator=gen).to(DEVICE), torch.randn(60, 40, generator=gen).to(DEVICE)
    g = torch.randn(200, generator=gen).to(DEVICE)
    kw = dict(pca_dim=17, precision="fp32")
    ref, out = MatchIndex(y, **kw), MatchIndex(y, backend="triton", **kw)
    ref.set_potential(g)
    out.set_potential(g)
    assert torch.equal(out.search(x), ref.search(x))


def test_auto_is_torch_on_cpu():
    gen = torch.Generator().manual_seed(10)
    x, y = torch.randn(80, 5, generator=gen), torch.randn(90, 5, generator=gen)
    kw = dict(epsilon=0.1, max_iter=30)
    assert torch.equal(
        sinkhorn(x, y, SinkhornOptions(backend="auto", **kw)).g, sinkhorn(x, y, SinkhornOptions(**kw)).g
    )
    g = torch.randn(90, generator=gen)
    index = MatchIndex(y, backend="auto")
    index.set_potential(g)
    assert torch.equal(index.search(x), reference_argmax(x, y, g))

    def never():
        raise AssertionError("auto must not run the Triton kernel on a CPU")

    assert kernels.auto("lse", x, (80, 90, 5), never, lambda: "torch") == "torch"


def test_auto_measures_once_and_falls_back_on_failure(recwarn):
    auto = AutoBackend()
    calls = {"triton": 0, "torch": 0}

    def run(name):
        calls[name] += 1
        return name

    winner = auto.run(("lse", 1), lambda: run("triton"), lambda: run("torch"))
    assert auto.choices == {("lse", 1): winner} and calls == {"triton": 3, "torch": 3}
    assert auto.run(("lse", 1), lambda: run("triton"), lambda: run("torch")) == winner
    assert calls[winner] == 4

    def broken():
        raise RuntimeError("PTX compile failed\nsecond line")

    with pytest.warns(RuntimeWarning, match=r"PTX compile failed\); using torch"):
        assert auto.run(("argmax", 1), broken, lambda: "torch") == "torch"
    recwarn.clear()
    # Once Triton failed, every operation uses torch, without another warning.
    assert auto.run(("lse", 1), lambda: run("triton"), lambda: "torch") == "torch"
    assert auto.run(("gumbel_argmax", 2), broken, lambda: "torch") == "torch"
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_triton_on_cpu_without_the_interpreter_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    gen = torch.Generator().manual_seed(11)
    a, b, h = (
        torch.randn(10, 3, generator=gen),
        torch.randn(20, 3, generator=gen),
        torch.randn(20, generator=gen),
    )
    for call in (
        lambda: kernels.lse(a, b, h),
        lambda: sinkhorn(a, b, SinkhornOptions(backend="triton")),
        lambda: MatchIndex(b, backend="triton"),
    ):
        with pytest.raises(UserError, match="TRITON_INTERPRET=1") as info:
            call()
        assert "\n" not in str(info.value) and "backend 'torch'" in str(info.value)
    assert sinkhorn(a, b, SinkhornOptions(backend="auto", max_iter=5)).iters == 5  # auto just uses torch


def test_interpreter_mode_changed_after_import_is_reported(monkeypatch):
    # Triton fixed its mode when it was imported (interpreter without CUDA, compiler with it).
    imported = not torch.cuda.is_available()
    monkeypatch.setenv("TRITON_INTERPRET", "0" if imported else "1")
    problem = kernels.triton_problem("cuda")
    assert problem is not None and "before the process starts" in problem


def test_bad_inputs_are_rejected_at_the_boundary():
    a, b, h = _problem(10, 20, 3)
    with pytest.raises(ValueError, match="same d"):
        kernels.lse(a, b[:, :2], h)
    with pytest.raises(ValueError, match="one dtype"):
        kernels.argmax(a.double(), b.double(), h)
    with pytest.raises(ValueError, match="row_keys"):
        kernels.gumbel_argmax(a, b, h, torch.zeros(3, dtype=torch.long))
    assert kernels.lse(a[:0], b, h).shape == (0,)


COMPILE_FOR_H100 = """
import sys
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sdfm import kernels
from sdfm.kernels._triton import compiled

for name, dtype, gumbel in [
    ("lse_kernel", torch.float32, None),
    ("lse_kernel", torch.bfloat16, None),
    ("argmax_kernel", torch.bfloat16, False),
    ("argmax_kernel", torch.float32, True),
]:
    t = kernels.tiles(3072, dtype)
    elem = {torch.float32: "*fp32", torch.bfloat16: "*bf16"}[dtype]
    signature = {"a_ptr": elem, "b_ptr": elem, "h_ptr": "*fp32"}
    if name == "lse_kernel":
        signature["out_ptr"] = "*fp32"
    else:
        signature.update(keys_ptr="*i32", val_ptr="*fp32", idx_ptr="*i64")
    signature.update(dict.fromkeys(["n", "m", "d", "stride_a", "stride_b", "cols_per_split"], "i32"))
    constants = dict(BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=t.block_d, PRECISION="ieee", UPCAST=False)
    if gumbel is not None:
        constants["GUMBEL"] = gumbel
    signature.update(dict.fromkeys(constants, "constexpr"))
    binary = triton.compile(
        ASTSource(fn=compiled(name, interpret=False), signature=signature, constexprs=constants),
        target=GPUTarget("cuda", 90, 32),
        options=dict(num_warps=t.num_warps, num_stages=t.num_stages, enable_fp_fusion=True),
    )
    assert len(binary.asm["cubin"]) > 0, name
    assert binary.metadata.shared <= 227 * 1024, (name, binary.metadata.shared)  # an H100 block's limit
    print(name, dtype, gumbel, "shared", binary.metadata.shared)
"""


@pytest.mark.slow
def test_kernels_compile_for_h100(tmp_path):
    """Lower the kernels, with the launch configurations of ``tiles``, to sm_90 cubins without a GPU:
    what the interpreter cannot check (types, tl.dot shapes, shared memory) is checked here. In a
    subprocess, because this one's triton was imported in interpreter mode."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # really compile, and leave no cache behind
    run = subprocess.run([sys.executable, "-c", COMPILE_FOR_H100], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("shared") == 4
