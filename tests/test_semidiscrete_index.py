"""MatchIndex against the float64 brute-force argmax: backends, PCA, labels, in-place potentials,
top-k and softmax sampling, bad input."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from sdfm.errors import UserError
from sdfm.semidiscrete import MatchIndex, reference_argmax

N, D, B, CLASSES = 2000, 16, 100, 5
HAS_FAISS = importlib.util.find_spec("faiss") is not None
BACKENDS = [
    "torch",
    pytest.param(
        "faiss", marks=pytest.mark.skipif(not HAS_FAISS, reason="FAISS is an extra: pip install -e '.[cpu]'")
    ),
]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


pytestmark = pytest.mark.usefixtures("one_thread")


def _problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(N, D, generator=gen)
    g = torch.randn(N, generator=gen)
    x = torch.randn(B, D, generator=gen)
    labels = torch.randint(0, CLASSES, (N,), generator=gen)
    query_labels = torch.randint(0, CLASSES, (B,), generator=gen)
    return y, g, x, labels, query_labels


def _assert_tie_free(x: torch.Tensor, y: torch.Tensor, g: torch.Tensor, mask: torch.Tensor | None = None):
    """The best and second-best reference scores are far apart compared with fp32 rounding."""
    scores = x.double() @ y.double().T + g.double()
    if mask is not None:
        scores = scores.masked_fill(~mask, -torch.inf)
    top2 = scores.topk(2, dim=1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pca_dim", [0, 6])
@pytest.mark.parametrize("use_labels", [False, True])
def test_search_matches_reference(backend, pca_dim, use_labels):
    y, g, x, labels, query_labels = _problem()
    index = MatchIndex(
        y, backend=backend, labels=labels if use_labels else None, pca_dim=pca_dim, chunk_size=300
    )
    index.set_potential(g)
    # With PCA the reference is the float64 argmax in the PCA space the index matches in.
    qx, ky = (index.pca.queries(x), index.pca.keys(y)) if pca_dim else (x, y)
    mask = query_labels[:, None] == labels[None, :] if use_labels else None
    _assert_tie_free(qx, ky, g, mask)
    ql = query_labels if use_labels else None
    expected = reference_argmax(qx, ky, g, labels=labels if use_labels else None, query_labels=ql)
    got = index.search(x, ql)
    assert got.dtype == torch.int64 and got.shape == (B,)
    assert torch.equal(got, expected)
    if use_labels:
        assert torch.equal(labels[got], query_labels)  # pairs never cross classes


def test_pca_components_are_principal_directions():
    y, *_ = _problem()
    index = MatchIndex(y, pca_dim=4)
    v = index.pca.components
    assert torch.allclose(v.T @ v, torch.eye(4), atol=1e-5)
    _, _, vh = torch.linalg.svd(y.double() - y.double().mean(0), full_matrices=False)
    # Same subspace as the top-4 right singular vectors.
    assert torch.allclose((vh[:4] @ v.double()).abs().sum(0), torch.ones(4, dtype=torch.float64), atol=1e-4)
    assert 0 < index.pca.explained < 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_set_potential_in_place_changes_answers(backend):
    y, g, x, _, _ = _problem()
    index = MatchIndex(y, backend=backend)
    index.set_potential(g)
    assert torch.equal(index.search(x), reference_argmax(x, y, g))
    block = index._blocks[0]
    before = block.index if backend == "faiss" else block.keys
    # A new potential that makes point 7 win every query: only g changes, nothing is rebuilt.
    g2 = g.clone()
    g2[7] = 1e3
    index.set_potential(g2)
    assert torch.equal(index.search(x), torch.full((B,), 7))
    g3 = torch.randn(N, generator=torch.Generator().manual_seed(5))
    _assert_tie_free(x, y, g3)
    index.set_potential(g3)
    assert torch.equal(index.search(x), reference_argmax(x, y, g3))
    assert index.last_refresh_seconds >= 0
    if backend == "faiss":
        assert block.index is before and block.index.ntotal == N
        # The write landed in the index's own stored vectors.
        assert torch.equal(torch.from_numpy(block.stored()[:, -1].copy()), g3)
        assert torch.equal(torch.from_numpy(block.stored()[:, :-1].copy()), y)
    else:
        assert block.keys is before


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use_labels", [False, True])
def test_topk_matches_reference(backend, use_labels):
    y, g, x, labels, query_labels = _problem(1)
    index = MatchIndex(y, backend=backend, labels=labels if use_labels else None, chunk_size=257)
    index.set_potential(g)
    ql = query_labels if use_labels else None
    top = index.topk(x, 5, ql)
    scores = x.double() @ y.double().T + g.double()
    if use_labels:
        scores = scores.masked_fill(query_labels[:, None] != labels[None, :], -torch.inf)
    ref_scores, ref_index = scores.topk(5, dim=1)
    assert torch.equal(top.index, ref_index)
    assert torch.allclose(top.scores.double(), ref_scores, atol=1e-4)
    assert torch.equal(top.index[:, 0], index.search(x, ql))


def test_topk_pads_small_classes():
    y, g, x, _, _ = _problem()
    labels = torch.zeros(N, dtype=torch.long)
    labels[:3] = 1  # class 1 has 3 points
    index = MatchIndex(y, labels=labels)
    index.set_potential(g)
    top = index.topk(x[:4], 5, torch.tensor([1, 1, 0, 0]))
    assert (top.index[:2, 3:] == -1).all() and torch.isinf(top.scores[:2, 3:]).all()
    assert set(top.index[0, :3].tolist()) == {0, 1, 2}


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampling_with_k_at_least_n_is_the_softmax(backend):
    gen = torch.Generator().manual_seed(3)
    y = torch.randn(8, 3, generator=gen)
    g = 0.5 * torch.randn(8, generator=gen)
    x = torch.randn(1, 3, generator=gen).expand(20_000, 3).contiguous()
    index = MatchIndex(y, backend=backend)
    index.set_potential(g)
    eps = 1.5
    picks = index.sample(x, eps, torch.Generator().manual_seed(0), k=8)
    freq = torch.bincount(picks, minlength=8).double() / len(picks)
    prob = torch.softmax((x[0].double() @ y.double().T + g.double()) / eps, 0)
    # Binomial standard deviation is at most 0.0035 with 20,000 draws: 0.015 is over 4 sigma.
    assert (freq - prob).abs().max() < 0.015


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampling_as_epsilon_goes_to_zero_is_argmax(backend):
    y, g, x, labels, query_labels = _problem()
    index = MatchIndex(y, backend=backend, labels=labels)
    index.set_potential(g)
    expected = index.search(x, query_labels)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(index.sample(x, 1e-6, gen, k=16, query_labels=query_labels), expected)
    assert torch.equal(index.sample(x, 0.0, gen, query_labels=query_labels), expected)


def test_sampling_is_gumbel_max_over_the_top_k_with_the_generators_uniforms():
    """The documented draw, by hand: Gumbel noise from the generator's uniforms (B, k) added to the top-k
    scores / epsilon, argmax. Another generator state gives other draws."""
    y, g, x, _, _ = _problem()
    index = MatchIndex(y)
    index.set_potential(g)
    eps, k = 2.0, 8
    got = index.sample(x, eps, torch.Generator().manual_seed(4), k=k)
    scores = x.double() @ y.double().T + g.double()
    top_scores, top_ids = scores.topk(k, dim=1)
    u = torch.rand((x.shape[0], k), generator=torch.Generator().manual_seed(4)).double()
    gumbel = -torch.log(-torch.log(u.clamp(1e-12, 1 - 1e-7)))
    want = top_ids.gather(1, (top_scores / eps + gumbel).argmax(1, keepdim=True)).squeeze(1)
    assert torch.equal(got, want)
    assert not torch.equal(index.sample(x, eps, torch.Generator().manual_seed(5), k=k), got)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_potential_is_rejected(backend):
    y, g, *_ = _problem()
    index = MatchIndex(y, backend=backend)
    bad = g.clone()
    bad[3] = float("nan")
    with pytest.raises(UserError, match="potential"):
        index.set_potential(bad)
    with pytest.raises(UserError, match="potential g has shape"):
        index.set_potential(g[:-1])
    with pytest.raises(UserError, match="potential"):
        index.set_potential(torch.full((N,), float("inf")))


def test_bad_arguments_are_rejected():
    y, g, x, labels, query_labels = _problem()
    with pytest.raises(UserError, match="pca_dim"):
        MatchIndex(y, pca_dim=D + 1)
    with pytest.raises(UserError, match="backend"):
        MatchIndex(y, backend="annoy")
    with pytest.raises(UserError, match="labels"):
        MatchIndex(y, labels=labels[:-1])
    index = MatchIndex(y, labels=labels)
    with pytest.raises(UserError, match="query_labels"):
        index.search(x)
    with pytest.raises(UserError, match="not a class"):
        index.search(x, torch.full((B,), CLASSES + 3))
    with pytest.raises(UserError, match="query_labels"):
        MatchIndex(y).search(x, query_labels)
    with pytest.raises(UserError, match="expects"):
        MatchIndex(y).search(x[:, :3])


@pytest.mark.gpu
@cuda
def test_torch_backend_on_cuda_bf16():
    y, g, x, labels, query_labels = _problem()
    index = MatchIndex(y.cuda(), labels=labels.cuda())
    assert index.precision == "bf16"
    index.set_potential(g.cuda())
    got = index.search(x.cuda(), query_labels.cuda()).cpu()
    assert torch.equal(labels[got], query_labels)
    # bf16 candidates rescored in float64: exactly the float64 brute force's answer.
    assert torch.equal(got, reference_argmax(x, y, g, labels=labels, query_labels=query_labels))
    exact = MatchIndex(y.cuda(), precision="fp32")
    exact.set_potential(g.cuda())
    assert torch.equal(exact.search(x.cuda()).cpu(), reference_argmax(x, y, g))


@pytest.mark.gpu
@cuda
def test_faiss_backend_on_cuda():
    from sdfm.semidiscrete.backends import FaissGpuBlock, faiss_gpu_available

    if not faiss_gpu_available():
        pytest.skip("the installed faiss has no GPU support (pip install 'sdfm[gpu]')")

    y, g, x, _, _ = _problem()
    for precision in ("fp32", "fp16"):
        index = MatchIndex(y.cuda(), backend="faiss", precision=precision)
        # The search really runs on the GPU: FAISS's GPU kNN over sdfm's own database tensor.
        (block,) = index._blocks
        assert isinstance(block, FaissGpuBlock) and block.database.is_cuda
        index.set_potential(g.cuda())
        found = index.search(x.cuda())
        assert found.is_cuda and torch.equal(found.cpu(), reference_argmax(x, y, g))
        storage = block.database.data_ptr()
        g2 = torch.randn(N, generator=torch.Generator().manual_seed(9))
        index.set_potential(g2.cuda())  # written into the database in place: nothing re-added
        assert block.database.data_ptr() == storage
        assert torch.equal(index.search(x.cuda()).cpu(), reference_argmax(x, y, g2))


# --- low precision: candidates rescored in float64 ------------------------------------------------


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_score_error_bound_holds(precision):
    """Every 16-bit score (rounded operands, fp32 products and bias) is within the bound of the exact one."""
    from sdfm.ot.reductions import mm_fp32_out
    from sdfm.semidiscrete.backends import DTYPES
    from sdfm.semidiscrete.rescore import score_error_bound

    y, g, x, _, _ = _problem(3)
    dtype = DTYPES[precision]
    approx = mm_fp32_out(x.to(dtype), y.to(dtype)) + g
    exact = x.double() @ y.double().T + g.double()
    bound = score_error_bound(x, float(y.norm(dim=1).max()), float(g.abs().max()), precision)
    assert ((approx.double() - exact).abs() <= bound[:, None]).all()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("pca_dim", [0, 6])
@pytest.mark.parametrize("use_labels", [False, True])
def test_low_precision_search_is_exactly_the_float64_argmax(precision, pca_dim, use_labels):
    """Near-ties that 16-bit scores cannot separate: plain 16-bit argmax gets some wrong, the index
    (candidates rescored in float64, certified) gets every one right."""
    gen = torch.Generator().manual_seed(4)
    y = torch.randn(N, D, generator=gen)
    g = 0.01 * torch.randn(N, generator=gen)
    x = torch.randn(400, D, generator=gen)
    twins = torch.randint(0, N, (300,), generator=gen)
    y[-300:] = y[twins] + 1e-3 * torch.randn(300, D, generator=gen)  # near-duplicates: near-ties
    labels = torch.randint(0, CLASSES, (N,), generator=gen)
    labels[-300:] = labels[twins]
    ql = torch.randint(0, CLASSES, (400,), generator=gen) if use_labels else None
    index = MatchIndex(
        y, labels=labels if use_labels else None, pca_dim=pca_dim, precision=precision, chunk_size=300
    )
    index.set_potential(g)
    qx, ky = (index.pca.queries(x), index.pca.keys(y)) if pca_dim else (x, y)
    expected = reference_argmax(qx, ky, g, labels=labels if use_labels else None, query_labels=ql)
    assert torch.equal(index.search(x, ql), expected)
    if not use_labels and pca_dim == 0:
        from sdfm.semidiscrete.backends import DTYPES

        dtype = DTYPES[precision]
        plain = (x.to(dtype).float() @ y.to(dtype).float().T + g).argmax(1)
        assert (plain != expected).any()  # without the rescoring 16-bit scores pick wrong points


def test_certificate_falls_back_when_candidates_are_too_few():
    y, g, x, _, _ = _problem(5)
    index = MatchIndex(y, precision="bf16", candidates=1)  # one candidate can never be certified
    index.set_potential(g)
    assert torch.equal(index.search(x), reference_argmax(x, y, g))
    block = index._blocks[0]
    assert block.certified.fallbacks == block.certified.queries == B
    wide = MatchIndex(y, precision="bf16", candidates=32)
    wide.set_potential(g)
    assert torch.equal(wide.search(x), reference_argmax(x, y, g))
    assert wide._blocks[0].certified.fallbacks < B // 10


def test_precision_and_backend_combinations_that_cannot_work_are_refused():
    y = torch.randn(50, 4)
    with pytest.raises(UserError, match="fp32 only.*potential.index = 'torch'"):
        MatchIndex(y, backend="faiss", precision="bf16")
    with pytest.raises(UserError, match="not one of"):
        MatchIndex(y, precision="fp8")
    from sdfm.semidiscrete.backends import faiss_gpu_available

    if not faiss_gpu_available():  # faiss-cpu (or no GPU): a GPU FAISS index is refused, never faked
        with pytest.raises(UserError, match="FAISS with GPU support.*sdfm\\[gpu\\]"):
            MatchIndex(y, backend="faiss", device="cuda")


def test_fp16_is_the_cuda_default_where_the_points_fit_and_overflow_is_never_trusted():
    from sdfm.semidiscrete.index import default_precision
    from sdfm.semidiscrete.rescore import FP16_MAX, score_error_bound

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert default_precision("torch", cuda, 1.0) == "fp16"
    assert default_precision("torch", cuda, 1e5) == "bf16"  # beyond fp16's range: bf16 has fp32's
    assert default_precision("torch", cpu, 1.0) == default_precision("faiss", cuda, 1.0) == "fp32"
    with pytest.raises(UserError, match="beyond fp16's range.*'bf16'"):
        MatchIndex(torch.full((4, 3), 1e5), precision="fp16")
    # A query coordinate that fp16 rounds to inf gets an infinite bound: always searched again exactly.
    q = torch.tensor([[1.0, 2.0], [2 * FP16_MAX, 0.0]])
    bound = score_error_bound(q, 3.0, 1.0, "fp16")
    assert torch.isfinite(bound[0]) and torch.isinf(bound[1])
    y = torch.randn(40, 2)
    index = MatchIndex(y, precision="fp16")
    index.set_potential(torch.zeros(40))
    assert torch.equal(index.search(q), reference_argmax(q, y, torch.zeros(40)))
    assert index.fallbacks == (2, 1)


def test_fp16_subnormal_coordinates_stay_within_the_bound():
    """Coordinates below fp16's normal range (2^-14) round absolutely, not relatively."""
    from sdfm.ot.reductions import mm_fp32_out
    from sdfm.semidiscrete.rescore import score_error_bound

    gen = torch.Generator().manual_seed(9)
    y = 1e-6 * torch.randn(300, 64, generator=gen)  # all subnormal in fp16
    x = torch.randn(50, 64, generator=gen)
    approx = mm_fp32_out(x.half(), y.half())
    exact = x.double() @ y.double().T
    bound = score_error_bound(x, float(y.norm(dim=1).max()), 0.0, "fp16")
    assert ((approx.double() - exact).abs() <= bound[:, None]).all()
