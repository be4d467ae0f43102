"""The flow-matching trainer.

``sdfm train --config FILE`` (or ``python -m sdfm.train``) trains in one process; the same command
under ``torchrun --nproc_per_node=K`` (or ``accelerate launch``) is a data-parallel (DDP) job,
detected from the environment. A step: take the next global batch of data x1 (rank r keeps rows
[r b, (r + 1) b) of it, b = train.batch_size / ranks), draw noise x0 and times t for those rows, pair
x0 with data by the configured coupling (solved on the global batch), and regress the velocity network
onto u = x1 - x0 at x_t = (1 - t) x0 + t x1; DDP averages the gradients.

Every random draw of a step is a function of (train.seed, step, row) (``sdfm.data.noise``), so a job
with any number of ranks sees the draws of a single process, and ``--resume`` continues bit-exactly
with no generator state to carry, even onto a different number of ranks. SIGTERM (preemption) makes
all ranks stop at the same step boundary; rank 0 saves that step and every rank exits 0.
"""

from __future__ import annotations

import gc
import math
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch

from sdfm import amp
from sdfm import config as config_mod
from sdfm.checkpoint import CheckpointManager, save_tensors, write_atomic
from sdfm.config import Config
from sdfm.couplings import check_coupling_config
from sdfm.couplings.base import Pairs
from sdfm.data import Dataset, DataStream, load_dataset
from sdfm.data.noise import row_normals, step_generator
from sdfm.distributed.couplings import rank_coupling
from sdfm.distributed.env import DistEnv, ProcessGroup, detect, device_for, potential_device
from sdfm.errors import AgreedError, UserError
from sdfm.methods import Method
from sdfm.methods.oat import TargetModel
from sdfm.models import EMA, build_model
from sdfm.monitor import Monitor, info, set_main_process
from sdfm.pairing import PairSource
from sdfm.potential_sources import SnapshotFeed, StartContext, potential_source
from sdfm.rundir import (
    RunFolder,
    check_dataset,
    check_resume_config,
    recover_replaced,
    write_heartbeat,
)
from sdfm.semidiscrete.index import check_precision
from sdfm.signals import TermFlag

LOG_KEYS = (
    "loss",
    "grad_norm",
    "lr",
    "pairs_per_s",
    "coupling_ms",
    "sinkhorn_iters",
    "sinkhorn_err",
    "potential_version",
    "potential_age_steps",
    "potential_age_s",
    "potential_chi2",
)
CHECKPOINT_VERSION = 3
"""Layout of the checkpoints this sdfm writes: 3 stores optimizer, scheduler and scaler state as
safetensors + JSON; 2 (read too) stored them with torch.save."""
READABLE_VERSIONS = (2, 3)


def lr_lambda(cfg: Config):
    """Linear warm-up, then constant or cosine decay to 0 (a multiplier of optim.lr)."""
    warm, total, cosine = cfg.optim.warmup_steps, cfg.train.steps, cfg.optim.schedule == "cosine"

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if not cosine:
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return f


class Trainer:
    """Owns the model, EMA, optimizer, coupling and data stream of one run (or of one rank of it).

    Args:
        cfg: validated configuration.
        run_dir: the run folder (claimed by ``RunFolder``, or ``prepare_run_dir`` in tests).
        dataset: the loaded dataset (loaded from ``cfg.data`` when None).
        pg: the job's process group (``sdfm.distributed.env.ProcessGroup``); None for a single process.
        init_from: a trained run whose EMA weights start this one (OAT fine-tuning); a resume
            replaces them with the checkpoint's.
    """

    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        dataset: Dataset | None = None,
        pg: ProcessGroup | None = None,
        init_from: Path | None = None,
    ):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.pg = pg if pg is not None else ProcessGroup(DistEnv(), torch.device("cpu"))
        self.rank, self.world = self.pg.env.rank, self.pg.env.world_size
        self.device = device_for(self.pg.env, cfg.train.device)
        self.precision = amp.resolve_precision(cfg.train.precision, self.device)
        if self.device.type == "cuda" and cfg.train.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if cfg.train.batch_size % self.world:
            raise AgreedError(
                f"train.batch_size={cfg.train.batch_size} (the global batch) does not divide over {self.world} ranks; "
                f"use a multiple of {self.world}"
            )
        self.local_batch = cfg.train.batch_size // self.world
        self.data = dataset if dataset is not None else load_dataset(cfg.data)
        self.pg.check_same("the config", config_mod.dumps(cfg))
        self.pg.check_same("the training data (fingerprint)", self.data.fingerprint)
        self.conditional = cfg.data.conditional
        torch.manual_seed(cfg.train.seed)  # model initialization only: step draws come from data.noise
        self.model = build_model(
            cfg.model, self.data.shape, self.data.num_classes if self.conditional else 0
        ).to(self.device)
        if init_from is not None:
            load_init_weights(self.model, Path(init_from), cfg, self.data)
        self.ema = EMA(self.model, cfg.model.ema_decay)
        self.ckpt = CheckpointManager(self.run_dir, cfg.train.keep_last, warn=info)
        self.method = self._build_method()
        # DDP broadcasts rank 0's initial weights and averages gradients in backward.
        self.ddp = (
            torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device] if self.device.type == "cuda" else None
            )
            if self.world > 1
            else self.model
        )
        # What the step calls: the (DDP) model, compiled when asked; its parameters are self.model's.
        self.forward = torch.compile(self.ddp) if cfg.train.compile else self.ddp
        self.scaler = amp.grad_scaler(self.precision, self.device)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        # The coupling of the global batch, in its data-parallel form when there are several ranks
        # (OAT: of the lifted (position, velocity) states).
        self.coupling = self._build_coupling()
        self.worker = None  # the dual-potential worker subprocess, when rank 0 started one
        self.feed: SnapshotFeed | None = None  # rank 0's feed of the worker's potentials
        self.on_checkpoint: Callable[[Path], None] | None = None  # called after each checkpoint (rank 0)
        self.stream = DataStream(len(self.data), cfg.train.batch_size, cfg.train.seed)  # global batches
        lo = self.rank * self.local_batch
        self.pairing = PairSource(
            self.data,
            self.stream,
            self.coupling,
            self.generator,
            seed=cfg.train.seed,
            rows=(lo, lo + self.local_batch),
            conditional=self.conditional,
            device=self.device,
            prefetch=cfg.train.prefetch_pairs,
            refresh=self.refresh_potential,
        )
        self.step = 0
        # SIGTERM or SIGINT, acted on at the next step boundary (a second Ctrl-C stops at once)
        self.stop_flag = TermFlag((signal.SIGTERM, signal.SIGINT), install=False, repeat_interrupt=True)

    def _build_method(self) -> Method:
        """The [method] section's path and objective, with its fitted schedule or OAT target copy."""
        cfg = self.cfg
        schedule = self._learned_schedule() if cfg.method.path == "learned" else None
        target = None
        if cfg.method.kind == "oat":
            target = TargetModel(self.model, cfg.method.oat_target_every, cfg.method.oat_target_ema)
        return Method(cfg.method, schedule=schedule, target=target)

    def _learned_schedule(self):
        """The learned path's schedule: fitted on rank 0 at the first start and kept in the run folder
        (``schedule.safetensors``), loaded at later starts; every rank gets rank 0's."""
        from safetensors.torch import load_file

        from sdfm.methods.schedule import MonotoneSchedule, fit_schedule

        m = self.cfg.method
        dim = math.prod(self.data.shape) if m.schedule_per_dim else 1
        schedule = MonotoneSchedule(m.schedule_degree, dim)
        path = self.run_dir / "schedule.safetensors"
        state = None
        if self.pg.env.is_main:
            if path.exists():
                try:  # a damaged copy (truncated, garbage, another degree, a folder) must not wedge the run
                    state = load_file(path)
                    MonotoneSchedule(m.schedule_degree, dim).load_state_dict(state)
                    info(f"learned path: schedule from {path}")
                except Exception as e:  # safetensors, torch and the OS raise many types here
                    state = None
                    info(f"warning: {path} cannot be used ({type(e).__name__}: {str(e)[:200]})")
            if state is None and self.ckpt.steps():
                # The checkpoints hold the schedule too (the method's state): resume restores it.
                state = schedule.state_dict()
                info("learned path: the schedule comes from the checkpoint this run resumes")
            elif state is None:
                if path.exists() and not path.is_file():
                    raise UserError(f"{path} is not a file, but sdfm keeps the learned schedule there; move it away")
                info(f"learned path: fitting the schedule ({m.schedule_steps} steps)")
                fit = fit_schedule(
                    self.data.x.dense(), degree=m.schedule_degree, per_dim=m.schedule_per_dim, steps=m.schedule_steps,
                    batch=m.schedule_batch, lr=m.schedule_lr, topk=m.schedule_topk, seed=self.cfg.train.seed,
                    log=info,
                )  # fmt: skip
                state = fit.schedule.state_dict()
                meta = {"straightness_before": f"{fit.before:.6g}", "straightness_after": f"{fit.after:.6g}"}
                write_atomic(path, save_tensors(state, meta))
                info(
                    f"learned path: straightness {fit.before:.4g} (linear) -> {fit.after:.4g} in {fit.seconds:.0f} s"
                )
        schedule.load_state_dict(self.pg.broadcast_object(state))
        return schedule

    def _build_coupling(self):
        cfg = self.cfg
        if cfg.method.kind != "oat":
            return rank_coupling(cfg, self.data, self.pg, self.device)
        from sdfm.methods.oat import AccelerationCoupling

        if cfg.coupling.kind != "semidiscrete":
            inner = rank_coupling(cfg, self.data, self.pg, self.device)
            return AccelerationCoupling(inner, self.method.target, cfg.method.oat_alpha)
        return self._semidiscrete_acceleration()

    def _semidiscrete_acceleration(self):
        """The semidiscrete OAT coupling: the lifted dataset's own index and potential, refitted in
        this process after every target refresh."""
        from sdfm.couplings.semidiscrete import SemidiscreteCoupling
        from sdfm.methods.oat import SemidiscreteAcceleration
        from sdfm.semidiscrete import fit_potential
        from sdfm.semidiscrete.configured import fit_setup

        cfg, data = self.cfg, self.data
        setup = fit_setup(cfg, data)
        device = potential_device(self.pg.env, cfg)

        def build(lifted):
            return SemidiscreteCoupling(
                lifted, None, cfg.potential, data.fingerprint, device=device
            )

        def fit(lifted, source):
            result = fit_potential(
                lifted, setup.options, setup.budget, sample_source=source, device=device, log=None
            )
            info(f"oat: lifted potential fitted in {result.steps} steps, chi2 {result.chi2:.4g}")
            return result.g, result.chi2

        def source(n, generator):
            return data.source.draw(n, data.shape, generator).to(self.device)

        return SemidiscreteAcceleration(
            data.x.dense(self.device), self.method.target, cfg.method.oat_alpha, build, fit, source
        )

    @property
    def potential(self) -> torch.Tensor | None:
        """(N,) the semidiscrete coupling's potential in use, or None for other couplings."""
        return self.coupling.g if self.cfg.coupling.kind == "semidiscrete" else None

    def generator(self, step: int) -> torch.Generator:
        """The coupling's generator at ``step``: shared by all ranks for couplings of the global batch,
        per rank for the semidiscrete coupling, which samples each rank's own rows."""
        if self.cfg.coupling.kind == "semidiscrete":
            return step_generator(self.cfg.train.seed, step, "coupling", self.rank)
        return step_generator(self.cfg.train.seed, step, "coupling")

    # ------------------------------------------------------------------------------------ training

    def train_step(self) -> dict[str, float]:
        """One optimizer step; returns its metrics."""
        cfg, dev = self.cfg, self.device
        step = self.pairing.take(self.step)  # this rank's rows of the global batch, paired
        pairs, t = to_device(step.pairs, dev), step.t.to(dev)
        lo = self.rank * self.local_batch

        def draws(key: str, width: int) -> torch.Tensor:  # per-row draws of the method (mean-flow times)
            return row_normals(cfg.train.seed, self.step, lo, lo + self.local_batch, key, width)

        with amp.autocast(self.precision, dev):
            loss, method_metrics = self.method.loss(self.forward, self.model, pairs, t, draws)

        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()  # the scaler passes everything through unless fp16
        self.scaler.unscale_(self.optimizer)
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        lr = self.scheduler.get_last_lr()[0]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        self.ema.update(self.model, step=self.step)
        self.method.after_step(self.model, self.step)
        if self.world > 1:  # log the global mean loss, not rank 0's share
            loss = loss.detach().clone()
            torch.distributed.all_reduce(loss)  # gloo has no AVG
            loss /= self.world
        return {
            "loss": loss.item(),
            "grad_norm": grad_norm.item(),
            "lr": lr,
            "coupling_ms": step.coupling_ms,
            "coupling_wait_ms": step.wait_ms,
            **method_metrics,
            **self.coupling.stats(),
        }

    def train(self, until: int | None = None) -> None:
        """Run from ``self.step`` to ``train.steps`` (or stop early after step ``until``, as a preempted
        job would), logging and checkpointing on the way. On SIGTERM or SIGINT (Ctrl-C), every rank stops
        at the same step boundary and rank 0 saves it. After SIGTERM this returns (a preempted job exits
        0); after SIGINT the ranks leave together and it raises ``KeyboardInterrupt``, so every caller
        (``sdfm train`` exits 130, a benchmark stops) ends with nothing lost. A second Ctrl-C stops at
        once, from the last checkpoint."""
        cfg, main = self.cfg, self.pg.env.is_main
        until = cfg.train.steps if until is None else min(until, cfg.train.steps)
        monitor = Monitor(self.run_dir, cfg.train.steps, start_step=self.step, enabled=main)
        ranks = f" over {self.world} ranks ({self.local_batch} each)" if self.world > 1 else ""
        monitor.print(
            f"training {self.data.name} ({len(self.data)} points, shape {self.data.shape}) with the "
            f"{cfg.coupling.kind} coupling on {self.device}: steps {self.step}->{cfg.train.steps}, "
            f"batch {cfg.train.batch_size}{ranks}, {sum(p.numel() for p in self.model.parameters()):,} parameters, "
            f"{amp.describe(self.precision)}{', compiled' if cfg.train.compile else ''}"
        )
        self.stop_flag.install()
        window_t, window_n = time.perf_counter(), 0
        beat = -math.inf
        try:  # the handlers go back on every exit (a divergence, an error) for library callers
            while self.step < until:
                if main and time.monotonic() - beat >= HEARTBEAT_EVERY_S:  # a worker of its own job reads it
                    write_heartbeat(self.run_dir, self.step)
                    beat = time.monotonic()
                if self.pg.any(self.stop_flag.requested):  # agreed by all ranks, so all stop at this step
                    path = self.save()
                    monitor.print(f"{self.stop_flag.name or 'SIGTERM'}: saved checkpoint {path} at step {self.step}; exiting")
                    break
                metrics = self.train_step()
                window_n += cfg.train.batch_size
                monitor.advance()
                # (fp16's gradient scaler skips steps with inf gradients itself: only its loss counts)
                grads_ok = math.isfinite(metrics["grad_norm"]) or self.scaler.is_enabled()
                if not (math.isfinite(metrics["loss"]) and grads_ok):
                    raise AgreedError(self._diverged(metrics))  # every rank sees the same reduced loss
                if self.step % cfg.train.log_every == 0 or self.step == until:
                    if self.worker is not None and (warning := self.worker.check()):
                        monitor.print(warning)
                    elapsed = time.perf_counter() - window_t
                    metrics["pairs_per_s"] = window_n / max(elapsed, 1e-9)
                    monitor.log(self.step, metrics, LOG_KEYS)
                    window_t, window_n = time.perf_counter(), 0
                if self.step % cfg.train.ckpt_every == 0 or self.step == until:
                    path = self.save()
                    monitor.print(f"saved checkpoint {path}")
        finally:
            self.stop_flag.restore()
        self.pairing.close()
        if self.stop_flag.name == "SIGINT":  # saved: every rank leaves together, then the caller stops
            monitor.close()
            self.pg.any(False)
            raise KeyboardInterrupt
        if cfg.train.eval_at_end and self.step == cfg.train.steps and main:
            from sdfm.evaluate import evaluate_run

            evaluate_run(self.run_dir, monitor=monitor, trainer=self)
        monitor.close()

    def _diverged(self, metrics: dict[str, float]) -> str:
        """The one line that ends a run whose loss or gradient stopped being finite: the step, the
        likely cause, and the checkpoint it can resume from (nothing non-finite is ever saved)."""
        cfg = self.cfg
        steps = self.ckpt.steps()
        last = f"the last checkpoint (step {steps[0]}) is intact" if steps else "no checkpoint was written"
        what = "loss" if not math.isfinite(metrics["loss"]) else "gradient norm"
        return (
            f"training diverged: the {what} is {metrics['loss'] if what == 'loss' else metrics['grad_norm']} at step "
            f"{self.step}; lower optim.lr (now {cfg.optim.lr:g}) or set optim.grad_clip, and check the range of the "
            f"data and source points; {last}"
        )

    def start_potential(self, resumed: bool) -> None:
        """Give the semidiscrete coupling its potential from its source (``sdfm.potential_sources``: a
        file, a fit now, or the worker, started here when configured so); a resumed run keeps the
        checkpoint's. Rank 0 does this, and the coupling's ``poll`` shares the result."""
        if self.cfg.coupling.kind != "semidiscrete" or self.cfg.method.kind == "oat":
            return  # (OAT fits the lifted problem's potential itself, at every target refresh)
        source = potential_source(self.cfg)
        ctx = StartContext(self.cfg, self.data, self.run_dir, potential_device(self.pg.env, self.cfg), self.world)
        error = None  # a bad potential file on rank 0 must end every rank, not leave them waiting
        try:
            if self.pg.env.is_main:
                self.feed = source.start(self.coupling, ctx, resumed)
                self.worker = source.process
        except UserError as e:
            if self.world == 1:
                raise
            error = str(e)
        if self.world > 1:
            self.pg.wait_for_main("potential")  # rank 0 may have fitted for longer than the timeout
            if (error := self.pg.broadcast_object(error)) is not None:
                raise AgreedError(error)
        self.refresh_potential()  # the worker's first snapshot; in a data-parallel job, rank 0's potential

    def refresh_potential(self) -> bool:
        """Between steps: rank 0 takes a newer potential from its feed (the worker's snapshots), and the
        coupling shares it with every rank. True when the potential changed."""
        if self.feed is not None:
            self.feed.poll(self.coupling)
        return self.coupling.poll()

    # ---------------------------------------------------------------------------------- checkpoints

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (rank 0; every rank holds the same state, and the
        step draws need no generator state). Returns its folder on rank 0, None elsewhere."""
        if not self.pg.env.is_main:
            return None
        meta = {"fingerprint": self.data.fingerprint, "dataset": self.data.name}
        path = self.ckpt.save(
            self.step,
            tensors={
                "model": self.model.state_dict(),
                "ema": self.ema.state_dict(),
                "coupling": self.coupling.state_dict(),
                "method": self.method.state_dict(),
            },
            objects={
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                **({"scaler": self.scaler.state_dict()} if self.scaler.is_enabled() else {}),
            },
            state={
                "version": CHECKPOINT_VERSION,
                "data_position": self.stream.state_dict(),
                "fingerprint": self.data.fingerprint,
                "dataset": self.data.name,
                "world_size": self.world,
                "global_batch": self.cfg.train.batch_size,
            },
            metadata=meta,
        )
        if self.on_checkpoint is not None:
            self.on_checkpoint(path)
        return path

    def _fits_this_run(self, ckpt) -> None:
        """Accept a verified checkpoint for this run: a layout this sdfm reads (else ValueError: it is
        skipped like a damaged one), the run's data (else UserError: the config is wrong, not the
        checkpoint), and tensors of this model's names and shapes (else ValueError)."""
        state = ckpt.state
        if not isinstance(state.get("data_position"), dict):
            raise ValueError("trainer_state.json has no data position")
        if state.get("version") not in READABLE_VERSIONS:
            raise ValueError(
                f"layout version {state.get('version')!r} is not one this sdfm reads ({READABLE_VERSIONS})"
            )
        if state.get("fingerprint") != self.data.fingerprint:
            raise UserError(
                f"checkpoint {ckpt.path} was trained on data with fingerprint {state.get('fingerprint')}, but the "
                f"configured data has {self.data.fingerprint}; resume with the run's own data config"
            )
        for name in ("model", "ema"):
            ours = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
            if ckpt.shapes(name) != ours:
                raise ValueError(
                    f"{name}.safetensors does not hold this model's parameters (names or shapes differ)"
                )
        self._states_load(ckpt)

    def _states_load(self, ckpt) -> None:
        """Raise ValueError (the checkpoint is skipped like a damaged one) unless its optimizer,
        scheduler and data position load: a state forged with its hash updated, or of another layout,
        must not wedge every resume. Loaded into scratch objects; nothing of this trainer changes."""
        position = ckpt.state["data_position"]
        keys = ("epoch", "batch", "seed", "n", "batch_size")
        if not all(isinstance(position.get(k), int) and not isinstance(position.get(k), bool) for k in keys):
            raise ValueError(f"its data position {position} is not {{{', '.join(keys)}}} of integers")
        try:
            scratch = torch.optim.AdamW(self.model.parameters(), lr=self.cfg.optim.lr)
            scratch.load_state_dict(ckpt.object("optimizer"))
            sched_state = ckpt.object("scheduler")
            if not isinstance(sched_state.get("last_epoch"), int) or not isinstance(sched_state.get("_step_count"), int):
                raise TypeError("last_epoch and _step_count must be integers")
            scheduler = torch.optim.lr_scheduler.LambdaLR(scratch, lr_lambda(self.cfg))
            scheduler.load_state_dict(sched_state)
            scheduler.get_last_lr()
        except Exception as e:  # torch raises KeyError, ValueError, TypeError ... for a foreign state
            raise ValueError(f"its optimizer or scheduler state cannot be loaded ({type(e).__name__}: {e})") from None

    def resume(self) -> bool:
        """Load the newest complete checkpoint; False when the run has none yet."""
        ckpt = self.ckpt.load_latest(accept=self._fits_this_run)
        self.pg.check_same(
            "the newest checkpoint",
            None if ckpt is None else ckpt.step,
            fix="keep the run folder on storage that every node reads",
        )
        if ckpt is None:
            return False
        state = ckpt.state
        self.model.load_state_dict(ckpt.tensors("model"))
        self.ema.load_state_dict(ckpt.tensors("ema"))
        self.coupling.load_state_dict(ckpt.tensors("coupling"))
        if ckpt.has("method.safetensors"):
            self.method.load_state_dict(ckpt.tensors("method"))
        self.optimizer.load_state_dict(ckpt.object("optimizer"))
        self.scheduler.load_state_dict(ckpt.object("scheduler"))
        if self.scaler.is_enabled() and (ckpt.has("scaler.safetensors") or ckpt.has("scaler.pt")):
            self.scaler.load_state_dict(ckpt.object("scaler"))
        self.stream.load_state_dict(state["data_position"])
        self.step = ckpt.step
        info(f"resumed from {ckpt.path} (step {ckpt.step})")
        saved_world = state.get("world_size", 1)
        if saved_world != self.world:
            info(
                f"checkpoint written by {saved_world} rank(s), resuming on {self.world}: the global batch, its data "
                "stream, noise and pairs carry over exactly; per-rank draws (semidiscrete sampling with "
                f"potential.epsilon > 0) are re-derived for {self.world} ranks"
            )
        return True


HEARTBEAT_EVERY_S = 10.0
"""How often rank 0 refreshes RUN/heartbeat.json while it trains."""

LEARNED_EXACT_MAX = 20_000
"""Most points whose closed-form field a learned path's fit computes exactly (without top-k)."""


def check_method(cfg: Config, *, world: int, init_from: Path | None, resume: bool) -> None:
    """Raise UserError (one line naming the key and the fix) for [method] settings this launch cannot
    run, before anything is loaded or written."""
    m = cfg.method
    if m.kind == "oat" and init_from is None and not resume:
        raise UserError(
            "method.kind = 'oat' fine-tunes a trained run; pass --init-from RUN (a run trained on the same "
            "data with the same [model])"
        )
    if init_from is not None and m.kind != "oat":
        raise UserError(f"--init-from starts OAT fine-tuning; set method.kind = 'oat' (it is {m.kind!r})")
    if m.kind == "oat" and cfg.coupling.kind == "semidiscrete":
        if world > 1:
            raise UserError(
                "method.kind = 'oat' with coupling.kind = 'semidiscrete' refits the lifted potential in one "
                "process; run it without torchrun, or use coupling.kind = 'exact' or 'sinkhorn'"
            )
        if cfg.data.conditional:
            raise UserError(
                "method.kind = 'oat' with coupling.kind = 'semidiscrete' is unconditional only; set "
                "data.conditional = False or use coupling.kind = 'exact'"
            )
        if m.oat_target_every == 0:
            raise UserError(
                "method.kind = 'oat' with coupling.kind = 'semidiscrete' refits at every target refresh, so an "
                "EMA target (method.oat_target_every = 0) would refit every step; set method.oat_target_every"
            )
    if m.kind == "oat" and m.oat_accel > 0 and world > 1:
        raise UserError(
            "method.oat_accel > 0 differentiates through a JVP of the bare model, which DDP does not "
            "synchronize; use one process or method.oat_accel = 0"
        )


def to_device(pairs: Pairs, device: torch.device) -> Pairs:
    """``pairs`` with every tensor on ``device``."""

    def move(x):
        return None if x is None else x.to(device)

    return Pairs(
        move(pairs.x0), move(pairs.x1), move(pairs.labels), pairs.index, move(pairs.v0), move(pairs.v1)
    )


def load_init_weights(model: torch.nn.Module, run: Path, cfg: Config, data: Dataset) -> None:
    """Start ``model`` from the EMA weights of the newest complete checkpoint of the trained run
    ``run`` (``--init-from``), after checking that it was trained on the same data and that its
    weights fit the configured model.

    Raises:
        UserError: no checkpoint there, other data (fingerprint), or another model shape.
    """
    ckpt = CheckpointManager(run, keep_last=1, warn=info).load_latest()
    if ckpt is None:
        raise UserError(f"--init-from {run} holds no complete checkpoint; point it at a trained run folder")
    if ckpt.state.get("fingerprint") != data.fingerprint:
        raise UserError(
            f"--init-from {run} was trained on data with fingerprint {ckpt.state.get('fingerprint')}, but the "
            f"configured data has {data.fingerprint}; fine-tune with the run's own [data] settings"
        )
    weights = ckpt.tensors("ema")
    own = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    mine = {k: tuple(v.shape) for k, v in own.items()}
    if shapes != mine:
        diff = sorted(set(shapes) ^ set(mine)) or [k for k in mine if shapes.get(k) != mine[k]]
        raise UserError(
            f"--init-from {run} has another model shape than the configured one (first difference: {diff[0]}); "
            f"fine-tune with the run's own [model] settings (its config.toml)"
        )
    model.load_state_dict(weights)
    info(f"init: model weights from the EMA of {ckpt.path} (step {ckpt.step})")


def run_training(
    cfg: Config,
    run_dir: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
) -> Trainer:
    """Set up the run folder and train (the body of ``sdfm train``), as one process or as this rank of
    a torchrun / accelerate job. ``cfg.method.init_from``: a trained run to fine-tune (OAT); it is part
    of the run's config, so a resume that finds no checkpoint yet starts from it again."""
    config_mod.validate(cfg)
    init_from = Path(cfg.method.init_from) if cfg.method.init_from else None
    check_coupling_config(cfg.coupling)
    env = detect()
    set_main_process(env.is_main)
    check_method(cfg, world=env.world_size, init_from=init_from, resume=resume)
    if cfg.coupling.kind == "semidiscrete":  # the potential's device and index, before any file
        precision = "fp32" if cfg.potential.precision == "auto" else cfg.potential.precision
        check_precision(cfg.potential.index, precision, potential_device(env, cfg))
    dataset = load_dataset(cfg.data)  # fail on bad data before touching the run folder
    if cfg.method.path == "learned" and len(dataset) > LEARNED_EXACT_MAX and not cfg.method.schedule_topk:
        raise UserError(
            f"method.path = 'learned' needs the closed-form field over all {len(dataset)} points at every "
            f"step of its fit (more than {LEARNED_EXACT_MAX}); set method.schedule_topk (e.g. 256) to use the "
            "matching index's top-k"
        )
    p = cfg.potential
    if cfg.coupling.kind == "semidiscrete" and p.source == "file" and not resume:
        from sdfm.semidiscrete import load_potential

        load_potential(
            p.path, expected_fingerprint=dataset.fingerprint, expected_n=len(dataset)
        )  # before any write
    if env.is_main and Path(run_dir).parent.is_dir():  # an --overwrite killed early: the replaced run comes
        recover_replaced(Path(run_dir).resolve() if Path(run_dir).is_symlink() else Path(run_dir))  # back, then checks
    saved = Path(run_dir) / "config.toml"
    if resume and saved.is_file():  # the merge rule: fixed keys stay as the run has them
        check_resume_config(config_mod.load_config(saved), cfg)
    if env.is_main and resume:
        check_dataset(run_dir, dataset)
    pg = ProcessGroup(
        env, device_for(env, cfg.train.device), cfg.train.dist_backend, cfg.train.dist_timeout_s
    )
    trainer = None
    folder = RunFolder(run_dir, resume=resume, overwrite=overwrite)
    try:
        # Rank 0 owns the run folder (and its lock); the others wait, then see its checkpoints. Until
        # the commit below nothing in the folder changes, and a failure puts it back as it was.
        error = None
        if env.is_main:
            try:
                folder.begin()
            except UserError as e:
                error = str(e)
        error = pg.broadcast_object(error)
        if error is not None:
            raise AgreedError(error)
        try:
            # A resume takes the weights from its checkpoint; one before the first checkpoint (killed
            # early) starts from the init run again, as the first start did.
            early = not resume or not CheckpointManager(run_dir, cfg.train.keep_last).steps()
            trainer = Trainer(cfg, run_dir, dataset=dataset, pg=pg, init_from=init_from if early else None)
            resumed = resume and trainer.resume()
            if resume and not resumed:
                info(f"no checkpoint in {run_dir} yet; starting from step 0")
            if resumed and trainer.step > cfg.train.steps:
                raise UserError(
                    f"--train.steps {cfg.train.steps} is below the checkpoint's step {trainer.step}; pass "
                    f"--train.steps above {trainer.step} to train on (a run never trains backwards)"
                )
        except BaseException:
            if env.is_main:
                folder.rollback()
            raise
        if env.is_main:
            folder.commit(cfg, dataset)
            trainer.on_checkpoint = lambda _: folder.settle()  # a replaced run goes once this one checkpointed
        pg.wait_for_main("the run folder")
        try:
            trainer.start_potential(resumed)  # a worker it spawns reads the committed config
            if trainer.step == cfg.train.steps:
                info(f"{run_dir} is already at step {trainer.step} = train.steps; nothing to train")
            trainer.train()  # (a Ctrl-C raises KeyboardInterrupt once the ranks left together)
            pg.any(False)  # leave together: rank 0 may still be writing the last checkpoint
        except BaseException as e:
            if env.is_main and folder.replacing:  # --overwrite, and the new run never checkpointed
                if trainer.worker is not None:
                    trainer.worker.stop()
                    trainer.worker = None
                folder.rollback()
                info(f"the new run stopped before its first checkpoint; {run_dir} holds the replaced run again")
                if isinstance(e, SystemExit) and not e.code:  # a SIGTERM'd fit: its state went with the new run
                    info("the new run's interrupted potential fit went with it: start the --overwrite again")
                    raise SystemExit(143) from None
            raise
    finally:
        if trainer is not None and trainer.worker is not None:
            trainer.worker.stop()
        if trainer is not None and trainer.world > 1:
            # DDP holds the process group: drop it first, or gloo's threads outlive destroy_process_group
            # and abort the interpreter at exit.
            trainer.ddp = trainer.model
            gc.collect()
        folder.close()
        pg.close()
    return trainer
