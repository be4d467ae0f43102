"""Typed configuration: dataclass sections, TOML presets, strict validation.

A config is built in three layers: the defaults below, a TOML preset (``--config FILE``), then
command-line overrides (``--section.field value``, parsed by tyro). Unknown keys and bad values are
errors that name the key. The resolved config is written to ``config.toml`` in the run folder, so a run
can be reproduced with ``sdfm train --config RUN/config.toml``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomllib

from sdfm.errors import UserError

DataName = Literal["8gaussians", "moons", "checkerboard", "circles", "digits", "fashion-mnist", "file"]
SourceName = Literal["normal", "moons", "8gaussians", "file"]
CouplingKind = Literal["independent", "exact", "sinkhorn", "semidiscrete"]
SolverName = Literal["euler", "midpoint", "heun", "rk4", "dopri5"]


@dataclass(kw_only=True)
class DataConfig:
    """What to learn and where the noise comes from."""

    name: DataName = "8gaussians"
    """Dataset: a synthetic 2-D set, 'digits' (scikit-learn, 8x8), 'fashion-mnist' (28x28) or 'file'."""
    path: str = ""
    """For name='file': a .npy/.npz/.safetensors array of shape (N, ...) or a folder of images."""
    source: SourceName = "normal"
    """Source distribution x0 ~ p0: standard normal, a 2-D set (moons, 8gaussians) for 2-D data, or
    'file': the points of data.source_path, sampled with replacement (data-to-data flows)."""
    source_path: str = ""
    """For source='file': a .npy/.npz/.safetensors array of source points of the data's point shape."""
    num_points: int = 20000
    """Number of training points generated for synthetic sets (ignored for real data)."""
    num_eval: int = 2000
    """Held-out points for evaluation, never trained on (at most a fifth of a dataset without a test split;
    0: no held-out split, every point trains and fits the potential, and evaluation is refused)."""
    max_points: int = 0
    """Use at most this many training points (0 = all), e.g. a Fashion-MNIST subset on a small CPU."""
    conditional: bool = False
    """Train a class-conditional model (needs labels: digits, fashion-mnist, or a file with labels)."""
    seed: int = 0
    """Seed for generating synthetic data and for the train/eval split."""


@dataclass(kw_only=True)
class ModelConfig:
    """The velocity network v(t, x[, label])."""

    kind: Literal["auto", "mlp", "unet"] = "auto"
    """Network: 'auto' picks an MLP for vectors and a U-Net for images."""
    hidden: int = 128
    """MLP width."""
    depth: int = 3
    """MLP hidden layers."""
    channels: int = 32
    """U-Net base width c (128 in the OT-CFM CIFAR-10 network)."""
    channel_mult: list[int] = field(default_factory=lambda: [1, 2])
    """U-Net width of each resolution level in units of channels; its length is the number of levels
    ([1, 2, 2, 2] in the OT-CFM CIFAR-10 network)."""
    num_res_blocks: int = 1
    """U-Net residual blocks per level (2 in the OT-CFM CIFAR-10 network)."""
    attention_resolutions: list[int] = field(default_factory=list)
    """Feature-map sides at which the U-Net adds self-attention ([16] in the OT-CFM CIFAR-10 network)."""
    dropout: float = 0.0
    """U-Net dropout inside the residual blocks (0.1 in the OT-CFM CIFAR-10 network)."""
    head_channels: int = 64
    """Channels per U-Net attention head."""
    horizon_input: bool = False
    """Give the network a second time input, the horizon h of a mean-flow model u(x, t, t + h)."""
    ema_decay: float = 0.999
    """Decay of the exponential moving average of the weights used for sampling (0 disables EMA)."""


@dataclass(kw_only=True)
class CouplingConfig:
    """How each noise sample is paired with a data point."""

    kind: CouplingKind = "exact"
    """independent (I-CFM), exact minibatch OT (OT-CFM), entropic Sinkhorn on the batch, or
    semidiscrete OT against the whole dataset (SD-FM; see the [potential] section)."""
    epsilon: float = 0.05
    """Entropic regularization relative to the spread of the cost: the solver uses epsilon * std(C)."""
    exact_solver: Literal["auto", "lsa", "emd"] = "auto"
    """Exact OT solver: scipy's linear_sum_assignment, POT's network simplex (emd), or auto (emd in
    low dimension, lsa elsewhere: the faster of the two as measured, by the batch's shape only)."""
    cost: Literal["sqeuclidean", "dot"] = "sqeuclidean"
    """Ground cost: 0.5*|x-y|^2 or -<x,y> (the same coupling; the norms fold into the potentials)."""
    backend: Literal["torch", "keops", "triton", "auto"] = "torch"
    """Sinkhorn backend: blocked torch (chunked matmul + logsumexp), KeOps LazyTensors, the fused Triton
    kernels (CUDA), or auto (on CUDA the faster of triton and torch, measured once per shape; else
    torch)."""
    max_iter: int = 500
    """Sinkhorn iteration budget per batch."""
    tol: float = 1e-3
    """Stop when the L1 error of the row marginal, sum_i |sum_j P_ij - a_i|, falls below this."""
    check_every: int = 10
    """Check the marginal error every this many iterations."""
    warm_start: bool = False
    """Start each batch's Sinkhorn from the previous batch's column potential. Off by default: for
    independent batches it took 15-20% more iterations than a cold start (measured on 8 gaussians and
    64-d Gaussians, n = 256 and 1,024, epsilon 0.05 and 0.01); it suits streams of related batches."""
    anneal_from: float = 0.0
    """If > epsilon, anneal the relative epsilon geometrically from this value down to epsilon."""
    block_size: int = 4096
    """Rows/columns per block in the blocked torch backend (bounds memory to block_size^2 floats)."""
    shard_above: int = 4096
    """In a data-parallel job, solve Sinkhorn sharded over the ranks when the global batch has more rows
    than this; at or below it every rank solves the whole batch itself (small solves are bound by the
    collectives' latency: on 2 CPU ranks with gloo sharding paid off from 8,192 rows)."""
    precision: Literal["fp32", "tf32", "bf16", "bf16x3"] = "fp32"
    """Precision of the Sinkhorn score products: exact fp32, TF32 or bf16 tensor cores (fp32
    accumulation), or bf16x3 (three bf16 products, about 16-bit mantissas; torch backend). Potentials,
    logsumexps and the marginal error stay fp32."""


@dataclass(kw_only=True)
class PotentialConfig:
    """The dual potential g in R^N of the semidiscrete coupling and its matching index."""

    source: Literal["fit", "file", "worker"] = "fit"
    """Where g comes from: fitted before training, loaded from potential.path, or kept fresh by the
    dual-potential worker process (sdfm worker) while training runs."""
    path: str = ""
    """For source='file': a potential .safetensors written by sdfm fit-potential or a worker."""
    epsilon: float = 0.0
    """Entropic regularization of the semidiscrete problem (0: hard Laguerre cells, argmax matching;
    > 0: matches are sampled from the softmax over the top-k candidates)."""
    method: Literal["auto", "sgd_tail", "sgd_ema", "averaged_sgd"] = "auto"
    """Fitting method: 'auto' (the default) is averaged_sgd when the matching space (pca_dim, else
    the data's dimension) has >= 256 dimensions and sgd_tail below, the faster of the two there (docs/design.md
    section 7); sgd_tail is SGD with a decreasing step and a tail average of g (its chi^2 keeps
    falling with the budget), sgd_ema SGD with an EMA of g (OTT-JAX style), averaged_sgd averaged
    SGD with a decreasing epsilon (POT ot.semidiscrete style)."""
    batch_size: int = 1024
    """Fresh noise samples per fitting step."""
    lr: float = 0.0
    """Fitting learning rate (0: the method's default)."""
    target_chi2: float = 0.05
    """Stop fitting (source='fit') once a held-out evaluation confirms the chi^2 marginal error is
    below this (its one-sided 95% upper bound)."""
    max_steps: int = 0
    """Fitting step budget (source='fit'; 0: none when potential.max_seconds is set, else 5,000)."""
    max_seconds: float = 0.0
    """Fitting time budget in seconds (0: none)."""
    pca_dim: int = 0
    """Fit and match in the top-p principal components of the data (0: full dimension)."""
    index: Literal["torch", "faiss", "triton", "auto"] = "torch"
    """Matching index backend: brute-force torch (chunked matmul + bias + argmax), FAISS flat IP, the
    fused Triton kernel (CUDA), or auto (on CUDA the faster of triton and torch, measured once per
    shape; else torch)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Precision of the matching products: fp32, or bf16 / fp16 whose top candidates are rescored in
    float64 and certified exact (torch index; faiss on a GPU). 'auto': for the torch index on CUDA
    fp16 when the points fit its range (every coordinate below 4,094), else bf16; fp32 otherwise."""
    candidates: int = 16
    """Candidates per query that a 16-bit matching search rescores (more: fewer exact re-searches)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the potential is fitted and matched: the fit before training, the worker and the
    trainer's matching index. 'auto': the trainer's device (the worker: CUDA when present)."""
    topk: int = 64
    """Candidates for softmax sampling when epsilon > 0."""
    publish_every: int = 50
    """Worker: publish a new snapshot of g every this many SGD steps."""
    spawn_worker: bool = True
    """source='worker': the trainer starts the worker itself as a subprocess (False: start it by hand
    with sdfm worker --run-dir RUN)."""
    worker_threads: int = 0
    """CPU threads of the worker process (0: torch's default); cap it when the worker shares a CPU
    machine with a trainer, or both spin-wait on the same cores."""
    shard_index: bool = False
    """In a data-parallel job, split the matching index over the ranks (each holds N / W points; a
    query batch is searched by all ranks and the best match wins) instead of one full index per rank.
    For datasets whose index does not fit one device; needs epsilon = 0 and pca_dim = 0."""
    stale_warning_s: float = 300.0
    """Warn when no new potential version has arrived for this many seconds (source='worker')."""


@dataclass(kw_only=True)
class MethodConfig:
    """The training method on top of the coupling: the path between a pair and the objective
    (docs/methods.md)."""

    kind: Literal["fm", "meanflow", "oat"] = "fm"
    """'fm': flow matching (regress the path's velocity); 'meanflow': a mean-flow model u(x, s, t) of
    the average velocity over [s, t], sampled in 1..k steps (needs model.horizon_input); 'oat': OAT-FM
    fine-tuning of a trained run (sdfm train --init-from RUN)."""
    init_from: str = ""
    """method.kind = 'oat': the trained run whose EMA weights this run starts from (sdfm train
    --init-from RUN sets it); recorded with the run, so a resume before the first checkpoint starts
    from it again."""
    path: Literal["linear", "hermite", "learned"] = "linear"
    """Path between x0 and x1: straight, the cubic Hermite curve of OAT-FM (method.kind = 'oat'), or
    learned monotone schedules a(t) x0 + b(t) x1 fitted before training to straighten the flow."""
    mf_ratio: float = 0.75
    """Mean flow: share of rows with s < t (the others train flow matching, s = t)."""
    mf_logit_mean: float = -0.4
    """Mean flow: mean of the logit-normal time draws."""
    mf_logit_std: float = 1.0
    """Mean flow: standard deviation of the logit-normal time draws."""
    mf_power: float = 1.0
    """Mean flow: power p of the adaptive weight 1 / (|err|^2 + c)^p (0: plain squared error)."""
    mf_c: float = 1e-3
    """Mean flow: the constant c of the adaptive weight."""
    oat_alpha: float = 12 / 13
    """OAT: weight of the position term in the acceleration cost, in (0, 1) (12/13: the exact
    least-acceleration cost)."""
    oat_target_every: int = 500
    """OAT: refresh the target copy by a hard copy every this many steps (0: an EMA every step)."""
    oat_target_ema: float = 0.9999
    """OAT: EMA decay of the target copy when oat_target_every = 0."""
    oat_accel: float = 0.0
    """OAT: weight of the acceleration penalty |dv/dt along the flow|^2 (0: off; one process only)."""
    schedule_degree: int = 8
    """Learned path: Bernstein degree of a(t) and b(t)."""
    schedule_per_dim: bool = False
    """Learned path: one pair of schedules per coordinate (else one for all)."""
    schedule_steps: int = 150
    """Learned path: Adam steps of the schedule fit before training."""
    schedule_lr: float = 0.05
    """Learned path: learning rate of the schedule fit."""
    schedule_batch: int = 128
    """Learned path: (t, x) draws per step of the schedule fit."""
    schedule_topk: int = 0
    """Learned path: restrict the closed-form field's softmax to the k best points of the matching
    index (0: all points; needed above 20,000 points)."""


@dataclass(kw_only=True)
class OptimConfig:
    """Adam optimizer and learning-rate schedule."""

    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 100
    """Linear warm-up steps."""
    schedule: Literal["constant", "cosine"] = "constant"
    """Learning-rate schedule after warm-up."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""


@dataclass(kw_only=True)
class TrainConfig:
    """The training loop."""

    steps: int = 4000
    """Optimizer steps."""
    batch_size: int = 256
    """Pairs per step, over all ranks (the global batch, also the minibatch-OT batch size); each of W
    ranks of a data-parallel job trains on batch_size / W of them."""
    seed: int = 0
    """Seed of every random draw in training (noise, times, data order, coupling samples)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train: 'auto' uses CUDA when present."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Forward pass and loss under torch.autocast in bf16 or fp16 (fp16 with a gradient scaler);
    weights, optimizer state and EMA stay fp32. 'auto': bf16 on CUDA, fp32 on the CPU."""
    compile: bool = False
    """torch.compile the model (the first steps compile it: tens of seconds)."""
    tf32: bool = True
    """On CUDA, let fp32 matrix products and convolutions use TF32 tensor cores."""
    prefetch_pairs: bool = True
    """Compute the next step's pairs in a background thread while this step trains, for couplings that
    run on the CPU (exact OT; a semidiscrete coupling with a CPU index): the same pairs, bit for bit."""
    log_every: int = 100
    """Print one log line and write metrics every this many steps."""
    ckpt_every: int = 1000
    """Write a checkpoint every this many steps (and always at the end)."""
    keep_last: int = 3
    """Keep this many most recent checkpoints."""
    eval_at_end: bool = True
    """After the last step, draw samples, save a picture and write the evaluation summary."""
    dist_backend: Literal["auto", "nccl", "gloo"] = "auto"
    """torch.distributed backend of a torchrun / accelerate job: 'auto' is NCCL on GPUs, gloo on CPUs."""
    dist_timeout_s: float = 600.0
    """Timeout of every collective: a dead or stuck rank ends the job after this long instead of hanging it."""


@dataclass(kw_only=True)
class EvalConfig:
    """Evaluation after training and in ``sdfm eval``."""

    num_samples: int = 2000
    """Generated samples per evaluated solver setting."""
    nfe: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    """Euler budgets (function evaluations) to evaluate."""
    dopri5: bool = True
    """Also evaluate the adaptive dopri5 solver and report the NFE it used."""
    rtol: float = 1e-4
    """dopri5 relative tolerance."""
    atol: float = 1e-4
    """dopri5 absolute tolerance."""
    seed: int = 1234
    """Seed of the evaluation noise."""


@dataclass(kw_only=True)
class Config:
    """A complete sdfm training configuration."""

    data: DataConfig = field(default_factory=DataConfig)
    """Data."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model."""
    coupling: CouplingConfig = field(default_factory=CouplingConfig)
    """Coupling."""
    potential: PotentialConfig = field(default_factory=PotentialConfig)
    """Semidiscrete potential (used when coupling.kind = 'semidiscrete')."""
    method: MethodConfig = field(default_factory=MethodConfig)
    """Training method: path and objective."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training loop."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation."""


def validate(cfg: Config) -> Config:
    """Check values that types alone cannot; raise UserError naming the key and the fix."""

    def need(ok: bool, key: str, value: Any, rule: str) -> None:
        if not ok:
            raise UserError(
                f"{key} = {value!r} is invalid: it must be {rule}; set it with --{key} or in the config file"
            )

    c = cfg
    for section in dataclasses.fields(c):  # inf and nan are never a setting (lr, tolerances, budgets)
        for f in dataclasses.fields(getattr(c, section.name)):
            value = getattr(getattr(c, section.name), f.name)
            if isinstance(value, float) and not math.isfinite(value):
                need(False, f"{section.name}.{f.name}", value, "a finite number")
    need(
        c.coupling.epsilon > 0 and math.isfinite(c.coupling.epsilon),
        "coupling.epsilon",
        c.coupling.epsilon,
        "> 0",
    )
    need(c.coupling.anneal_from >= 0, "coupling.anneal_from", c.coupling.anneal_from, ">= 0")
    need(c.coupling.max_iter >= 1, "coupling.max_iter", c.coupling.max_iter, ">= 1")
    need(c.coupling.tol > 0, "coupling.tol", c.coupling.tol, "> 0")
    need(c.coupling.check_every >= 1, "coupling.check_every", c.coupling.check_every, ">= 1")
    need(c.coupling.block_size >= 1, "coupling.block_size", c.coupling.block_size, ">= 1")
    need(c.coupling.shard_above >= 0, "coupling.shard_above", c.coupling.shard_above, ">= 0")
    p = c.potential
    need(p.epsilon >= 0 and math.isfinite(p.epsilon), "potential.epsilon", p.epsilon, ">= 0")
    need(p.batch_size >= 2, "potential.batch_size", p.batch_size, ">= 2")
    need(p.lr >= 0, "potential.lr", p.lr, ">= 0 (0 = the method's default)")
    need(p.target_chi2 > 0, "potential.target_chi2", p.target_chi2, "> 0")
    need(p.max_steps >= 0, "potential.max_steps", p.max_steps, ">= 0 (0: none with potential.max_seconds, else 5,000)")
    need(p.max_seconds >= 0, "potential.max_seconds", p.max_seconds, ">= 0")
    need(p.pca_dim >= 0, "potential.pca_dim", p.pca_dim, ">= 0")
    need(p.topk >= 1, "potential.topk", p.topk, ">= 1")
    need(p.candidates >= 1, "potential.candidates", p.candidates, ">= 1")
    need(p.publish_every >= 1, "potential.publish_every", p.publish_every, ">= 1")
    need(p.worker_threads >= 0, "potential.worker_threads", p.worker_threads, ">= 0")
    if p.shard_index and (p.epsilon > 0 or p.pca_dim > 0):
        raise UserError(
            "potential.shard_index = True needs potential.epsilon = 0 and potential.pca_dim = 0; "
            "turn one of them off"
        )
    need(p.source != "file" or bool(p.path), "potential.path", p.path, "set when potential.source = 'file'")
    need(c.train.steps >= 1, "train.steps", c.train.steps, ">= 1")
    need(c.train.batch_size >= 2, "train.batch_size", c.train.batch_size, ">= 2")
    need(c.train.log_every >= 1, "train.log_every", c.train.log_every, ">= 1")
    need(c.train.ckpt_every >= 1, "train.ckpt_every", c.train.ckpt_every, ">= 1")
    need(c.train.keep_last >= 1, "train.keep_last", c.train.keep_last, ">= 1")
    need(c.train.dist_timeout_s > 0, "train.dist_timeout_s", c.train.dist_timeout_s, "> 0")
    need(0 < c.optim.lr <= 1, "optim.lr", c.optim.lr, "in (0, 1] (AdamW above 1 diverges at once; 1e-4 to 1e-3 is usual)")
    need(c.eval.rtol > 0 and c.eval.atol > 0, "eval.atol", c.eval.atol, "> 0, like eval.rtol")
    need(c.optim.warmup_steps >= 0, "optim.warmup_steps", c.optim.warmup_steps, ">= 0")
    need(c.optim.grad_clip >= 0, "optim.grad_clip", c.optim.grad_clip, ">= 0")
    need(0 <= c.model.ema_decay < 1, "model.ema_decay", c.model.ema_decay, "in [0, 1)")
    need(
        c.model.hidden >= 1 and c.model.depth >= 1,
        "model.hidden",
        c.model.hidden,
        ">= 1 (and model.depth >= 1)",
    )
    need(
        c.model.channels >= 8 and c.model.channels % 8 == 0,
        "model.channels",
        c.model.channels,
        "a multiple of 8",
    )
    m = c.model
    need(
        bool(m.channel_mult) and min(m.channel_mult) >= 1,
        "model.channel_mult",
        m.channel_mult,
        "positive integers",
    )
    need(m.num_res_blocks >= 1, "model.num_res_blocks", m.num_res_blocks, ">= 1")
    need(
        all(r >= 1 for r in m.attention_resolutions),
        "model.attention_resolutions",
        m.attention_resolutions,
        "positive sides",
    )
    need(0 <= m.dropout < 1, "model.dropout", m.dropout, "in [0, 1)")
    need(m.head_channels >= 1, "model.head_channels", m.head_channels, ">= 1")
    need(c.data.num_points >= 2, "data.num_points", c.data.num_points, ">= 2")
    need(
        c.data.num_eval == 0 or c.data.num_eval >= 2,
        "data.num_eval",
        c.data.num_eval,
        ">= 2, or 0 for no held-out split",
    )
    if c.data.num_eval == 0 and c.train.eval_at_end:
        raise UserError(
            "data.num_eval = 0 leaves no held-out data for train.eval_at_end; set train.eval_at_end = false "
            "or hold some points out (data.num_eval >= 2)"
        )
    need(c.data.max_points >= 0, "data.max_points", c.data.max_points, ">= 0")
    need(c.data.name != "file" or bool(c.data.path), "data.path", c.data.path, "set when data.name = 'file'")
    need(
        c.data.source != "file" or bool(c.data.source_path),
        "data.source_path",
        c.data.source_path,
        "set when data.source = 'file'",
    )
    me = c.method
    need(0 <= me.mf_ratio <= 1, "method.mf_ratio", me.mf_ratio, "in [0, 1]")
    need(me.mf_logit_std > 0, "method.mf_logit_std", me.mf_logit_std, "> 0")
    need(me.mf_power >= 0, "method.mf_power", me.mf_power, ">= 0")
    need(me.mf_c > 0, "method.mf_c", me.mf_c, "> 0")
    need(0 < me.oat_alpha < 1, "method.oat_alpha", me.oat_alpha, "in (0, 1), e.g. 12/13 = 0.923")
    need(me.oat_target_every >= 0, "method.oat_target_every", me.oat_target_every, ">= 0")
    need(0 <= me.oat_target_ema < 1, "method.oat_target_ema", me.oat_target_ema, "in [0, 1)")
    need(me.oat_accel >= 0, "method.oat_accel", me.oat_accel, ">= 0")
    need(me.schedule_degree >= 1, "method.schedule_degree", me.schedule_degree, ">= 1")
    need(me.schedule_steps >= 0, "method.schedule_steps", me.schedule_steps, ">= 0")
    need(me.schedule_lr > 0, "method.schedule_lr", me.schedule_lr, "> 0")
    need(me.schedule_batch >= 2, "method.schedule_batch", me.schedule_batch, ">= 2")
    need(me.schedule_topk >= 0, "method.schedule_topk", me.schedule_topk, ">= 0")
    if me.kind == "meanflow" and not c.model.horizon_input:
        raise UserError("method.kind = 'meanflow' needs a second time input; set model.horizon_input = True")
    if me.path == "hermite" and me.kind != "oat":
        raise UserError(
            "method.path = 'hermite' needs the endpoint velocities of OAT fine-tuning; use "
            "method.kind = 'oat' or method.path = 'linear'"
        )
    if me.kind != "fm" and me.path == "learned":
        raise UserError("method.path = 'learned' trains flow matching only; use method.kind = 'fm'")
    need(c.eval.num_samples >= 2, "eval.num_samples", c.eval.num_samples, ">= 2")
    need(all(k >= 1 for k in c.eval.nfe), "eval.nfe", c.eval.nfe, "a list of positive integers")
    need(c.eval.rtol > 0, "eval.rtol", c.eval.rtol, "> 0 (dopri5's relative tolerance)")
    need(c.eval.atol > 0, "eval.atol", c.eval.atol, "> 0 (dopri5's absolute tolerance)")
    return cfg


# ----------------------------------------------------------------------------- TOML in and out


def _check_value(key: str, value: Any, tp: Any) -> Any:
    """Return ``value`` converted to the annotated type ``tp`` or raise UserError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(repr(a) for a in typing.get_args(tp))
            raise UserError(f"{key} = {value!r} is not a known choice; use one of {choices}")
        return value
    if origin in (list, tuple):
        (inner,) = typing.get_args(tp)[:1]
        if not isinstance(value, list):
            raise UserError(f"{key} must be a list, got {value!r}")
        return [_check_value(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _check_value(key, value, arg)
            except UserError:
                pass
        raise UserError(f"{key} = {value!r} has the wrong type; expected {tp}")
    if tp is type(None):
        if value is not None:
            raise UserError(f"{key} must be empty")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{key} = {value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{key} = {value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{key} = {value!r} must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"{key} = {value!r} must be a string")
        return value
    raise TypeError(f"unsupported config type {tp} for {key}")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from nested dict ``data``; unknown keys and bad types are UserErrors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise UserError(
                f"unknown config key '{full}'; known keys{' in [' + prefix[:-1] + ']' if prefix else ''}: {known}"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise UserError(f"config key '{full}' must be a [{full}] table")
            kwargs[key] = from_dict(tp, value, prefix=f"{full}.")
        else:
            kwargs[key] = _check_value(full, value, tp)
    return cls(**kwargs)


def load_config(path: str | Path) -> Config:
    """Read a TOML preset into a validated Config."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"config file {path} does not exist; pass an existing TOML file to --config (see launch/configs/)"
        )
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"config file {path} is not valid TOML ({e}); fix the file") from None
    return validate(from_dict(Config, data))


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} to TOML")


def dumps(cfg: Config) -> str:
    """The config as TOML text that ``load_config`` reads back to an equal Config."""
    lines = []
    for section, values in to_dict(cfg).items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)
