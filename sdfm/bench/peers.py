"""The peers that ``sdfm bench`` puts beside sdfm's own rows: POT, GeomLoss (KeOps) and flash-sinkhorn
for Sinkhorn; plain FAISS flat indexes (fp32, fp16) and a one-piece torch matmul for matching; POT's
``ot.semidiscrete`` for potential fitting.

They live in the installed package, not in a folder of the repository, so that ``sdfm bench`` runs
wherever sdfm is installed (a cluster node has the wheel, not always the checkout). Each peer is an
optional import: one that is not installed, or cannot run on this device, is a skipped row with the
reason, never an error.
"""

from __future__ import annotations

import importlib.util
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Method",
    "PlainIndex",
    "Solve",
    "faiss_gpu",
    "faiss_index",
    "flash_sinkhorn",
    "geomloss_sinkhorn",
    "pot_semidiscrete",
    "pot_sinkhorn",
]

Solve = Callable[[int], tuple[Tensor, Tensor, int]]
"""A method bound to its data: iteration budget -> (f (n,), g (m,), iterations it ran)."""


@dataclass
class Method:
    """A solver under test: ``make(x, y)`` binds it to data; ``fixed_iters`` if it obeys the budget;
    ``f64`` names its float64 reference ('sdfm': ``reference_sinkhorn``, 'self': the method itself on
    float64 inputs, None: none); ``unavailable`` says why it cannot run here."""

    name: str
    make: Callable[[Tensor, Tensor], Solve]
    fixed_iters: bool
    f64: str | None = "self"
    unavailable: str | None = None


def missing(module: str, package: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return f"not installed (pip install {package})"
    return None


def pot_sinkhorn(eps: float) -> Method:
    name = "pot sinkhorn_log"
    if reason := missing("ot", "pot"):
        return Method(name, lambda x, y: None, fixed_iters=True, unavailable=reason)
    from sdfm.pot import pot

    ot = pot()

    def make(x: Tensor, y: Tensor) -> Solve:
        n, m = x.shape[0], y.shape[0]
        a = torch.full((n,), 1 / n, dtype=x.dtype, device=x.device)
        b = torch.full((m,), 1 / m, dtype=x.dtype, device=x.device)

        def solve(iters: int) -> tuple[Tensor, Tensor, int]:
            cost = 0.5 * torch.cdist(x, y).square()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "did not converge": expected with a fixed budget
                _, log = ot.bregman.sinkhorn_log(a, b, cost, eps, numItermax=iters, stopThr=0.0, log=True)
            # POT's plan is exp(u_i + v_j - C_ij / eps) = a_i b_j exp((f_i + g_j - C_ij) / eps).
            return eps * (log["log_u"] - a.log()), eps * (log["log_v"] - b.log()), iters

        return solve

    return Method(name, make, fixed_iters=True)


def geomloss_sinkhorn(eps: float, scaling: float, x: Tensor, y: Tensor) -> Method:
    if reason := missing("geomloss", "geomloss pykeops"):
        return Method("geomloss", lambda x, y: None, fixed_iters=False, unavailable=reason)
    from geomloss import SamplesLoss

    # Private helper, used only to report GeomLoss's own iteration count.
    from geomloss._legacy.sinkhorn_divergence import scaling_parameters

    blur = math.sqrt(eps)  # GeomLoss: C = |x - y|^p / p and eps = blur^p
    loss = SamplesLoss(
        "sinkhorn", p=2, blur=blur, scaling=scaling, debias=False, potentials=True, backend="online"
    )

    def make(xs: Tensor, ys: Tensor) -> Solve:
        its = len(scaling_parameters(xs, ys, 2, blur, None, None, scaling)[2])

        def solve(iters: int) -> tuple[Tensor, Tensor, int]:
            del iters  # GeomLoss follows its own schedule
            f, g = loss(xs, ys)
            return f.view(-1), g.view(-1), its

        return solve

    its = len(scaling_parameters(x, y, 2, blur, None, None, scaling)[2])
    return Method(f"geomloss ({its} its, eps-scaling)", make, fixed_iters=False)


def flash_sinkhorn(eps: float, device: torch.device) -> Method:
    name = "flash-sinkhorn"
    if reason := missing("flash_sinkhorn", "flash-sinkhorn"):
        return Method(name, lambda x, y: None, fixed_iters=True, f64=None, unavailable=reason)
    if device.type != "cuda":
        from importlib.metadata import version

        reason = (
            f"needs CUDA (flash-sinkhorn {version('flash-sinkhorn')} is installed; its kernels are CUDA-only)"
        )
        return Method(name, lambda x, y: None, fixed_iters=True, f64=None, unavailable=reason)
    from flash_sinkhorn import SamplesLoss

    def make(x: Tensor, y: Tensor) -> Solve:
        def solve(iters: int) -> tuple[Tensor, Tensor, int]:
            loss = SamplesLoss(
                "sinkhorn",
                backend="alternating",
                use_epsilon_scaling=False,
                eps=eps,
                n_iters=iters,
                half_cost=True,  # C = |x - y|^2 / 2, as here
                potentials=True,
                debias=False,
            )
            f, g = loss(x, y)
            return f.view(-1), g.view(-1), iters

        return solve

    return Method(name, make, fixed_iters=True, f64=None)


def faiss_gpu() -> bool:
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def faiss_index(kind: str, d: int, gpu: bool):
    """An empty FAISS flat inner-product index, fp32 ('flat') or fp16 ('fp16'), on the GPU or the CPU."""
    import faiss

    if gpu:
        config = faiss.GpuIndexFlatConfig()
        config.useFloat16 = kind == "fp16"
        return faiss.GpuIndexFlatIP(faiss.StandardGpuResources(), d, config)
    if kind == "fp16":
        return faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    return faiss.IndexFlatIP(d)


class PlainIndex:
    """The bias-free references: plain FAISS flat indexes (fp32, fp16) and a one-piece torch matmul."""

    def __init__(self, method: str, y: Tensor):
        self.method, self.y = method, y
        self.gpu = method.startswith("faiss") and y.device.type == "cuda" and faiss_gpu()
        self.where = "gpu" if (self.gpu or method == "torch-matmul") and y.device.type == "cuda" else "cpu"
        if method.startswith("faiss"):
            self.index = faiss_index(method.split("-")[1], y.shape[1], self.gpu)
            self.index.add(y.cpu().numpy())

    def search(self, x: Tensor) -> Tensor:
        if self.method.startswith("faiss"):
            return torch.from_numpy(self.index.search(x.cpu().numpy(), 1)[1][:, 0])
        return (x @ self.y.T).argmax(1)

    def refresh(self, g: Tensor) -> float:
        """Seconds of the rebuild an index without an editable bias needs for a new g."""
        if not self.method.startswith("faiss"):
            return float("nan")
        start = time.perf_counter()
        augmented = torch.cat([self.y, g[:, None]], 1).cpu().numpy()
        index = faiss_index(self.method.split("-")[1], augmented.shape[1], self.gpu)
        index.add(augmented)
        seconds = time.perf_counter() - start
        del index, augmented
        return seconds


def pot_semidiscrete(
    keys: Tensor, *, epsilon: float, batch_size: int, seed: int, budget: float, at_steps: list[int] | None = None
) -> tuple[list[dict], list[Tensor], dict]:
    """POT's ``ot.semidiscrete.solve_semidiscrete`` on keys (N, p) with noise N(0, I_p), run afresh with
    1, 2, 4, ... iterations while the next run is predicted to fit ``budget`` seconds, then once with
    as many as the budget allows (or, with ``at_steps``, once with each of those iteration counts):
    (rows of steps and seconds, the potential of each row, settings)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from sdfm.pot import pot

        pot()  # POT's own import first, with its KeOps notice kept off the terminal
        from ot.semidiscrete import solve_semidiscrete

    n, p = keys.shape

    def run(iters: int) -> tuple[Tensor, float]:
        gen = torch.Generator().manual_seed(seed)
        start = time.perf_counter()
        g = solve_semidiscrete(
            keys,
            lambda b: torch.randn(b, p, generator=gen),
            metric=lambda x, y: -(x @ y.T),  # dot cost: POT's score g - C is g + <x, y>, as in sdfm
            reg=epsilon,
            max_iter=iters,
            batch_size=batch_size,
        )
        return g.float(), time.perf_counter() - start

    rows: list[dict] = []
    snaps: list[Tensor] = []
    if at_steps:
        for iters in sorted(at_steps):
            g, seconds = run(iters)
            rows.append({"steps": iters, "seconds": seconds})
            snaps.append(g)
        return rows, snaps, {"lr": math.sqrt(n * batch_size), "eps0": 0.1}
    iters, seconds = 1, 0.0
    while True:
        g, seconds = run(iters)
        rows.append({"steps": iters, "seconds": seconds})
        snaps.append(g)
        if 2 * seconds > budget:
            break
        iters *= 2
    rate = iters / seconds
    final = int(budget * rate * 0.95)
    if final > iters:
        g, seconds = run(final)
        rows.append({"steps": final, "seconds": seconds})
        snaps.append(g)
    return rows, snaps, {"lr": math.sqrt(n * batch_size), "eps0": 0.1}
