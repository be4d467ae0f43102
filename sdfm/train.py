"""The flow-matching trainer.

``python -m sdfm.train --config FILE`` (or ``sdfm train``) trains in one process. A step: draw a data
batch x1 and noise x0, pair them with the configured coupling, draw t ~ U[0, 1], regress the velocity
network onto u = x1 - x0 at x_t = (1 - t) x0 + t x1. Every random draw uses the trainer's generator,
whose state is checkpointed, so ``--resume`` continues bit-exactly.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sdfm import config as config_mod
from sdfm.checkpoint import CheckpointManager
from sdfm.config import Config
from sdfm.couplings import build_coupling
from sdfm.data import Dataset, DataStream, load_dataset, sample_source
from sdfm.errors import UserError
from sdfm.models import EMA, build_model
from sdfm.monitor import Monitor, info

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
CHECKPOINT_VERSION = 1


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device='cuda' but CUDA is not available; use train.device='cpu' or 'auto'")
    return torch.device(name)


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
    """Owns the model, EMA, optimizer, coupling, data stream and generator of one run.

    Args:
        cfg: validated configuration.
        run_dir: the run folder (created by ``prepare_run_dir``).
        dataset: the loaded dataset (loaded from ``cfg.data`` when None).
    """

    def __init__(self, cfg: Config, run_dir: Path, dataset: Dataset | None = None):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.device = resolve_device(cfg.train.device)
        self.data = dataset if dataset is not None else load_dataset(cfg.data)
        self.conditional = cfg.data.conditional
        torch.manual_seed(cfg.train.seed)  # model initialization only; every later draw uses self.gen
        self.model = build_model(
            cfg.model.kind,
            self.data.shape,
            self.data.num_classes if self.conditional else 0,
            cfg.model.hidden,
            cfg.model.depth,
            cfg.model.channels,
        ).to(self.device)
        self.ema = EMA(self.model, cfg.model.ema_decay)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.coupling = build_coupling(
            cfg.coupling, per_class=self.conditional, dataset=self.data, potential=cfg.potential, warn=info
        )
        self.worker = None  # the dual-potential worker subprocess, when the trainer started one
        self.stream = DataStream(len(self.data), cfg.train.batch_size, cfg.train.seed)
        self.gen = torch.Generator().manual_seed(cfg.train.seed)
        self.step = 0
        self.ckpt = CheckpointManager(self.run_dir, cfg.train.keep_last, warn=info)

    # ------------------------------------------------------------------------------------ training

    def train_step(self) -> dict[str, float]:
        """One optimizer step; returns its metrics."""
        cfg, dev = self.cfg, self.device
        self.coupling.poll()  # a new dual potential from the worker is swapped in here, between steps
        idx = self.stream.next()
        x1 = self.data.x[idx]
        labels = self.data.labels[idx] if self.conditional else None
        x0 = sample_source(cfg.data.source, len(idx), self.data.shape, self.gen)

        t_couple = time.perf_counter()
        pairs = self.coupling.pair(x0, x1, labels, self.gen)
        coupling_ms = 1000 * (time.perf_counter() - t_couple)

        t = torch.rand(len(idx), generator=self.gen).to(dev)
        x0, x1 = pairs.x0.to(dev), pairs.x1.to(dev)
        tb = t.view(-1, *[1] * (x0.dim() - 1))
        xt = (1 - tb) * x0 + tb * x1
        pred = self.model(t, xt, None if pairs.labels is None else pairs.labels.to(dev))
        loss = F.mse_loss(pred, x1 - x0)

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.ema.update(self.model, step=self.step)
        return {
            "loss": loss.item(),
            "grad_norm": grad_norm.item(),
            "lr": lr,
            "coupling_ms": coupling_ms,
            **self.coupling.stats(),
        }

    def train(self, until: int | None = None) -> None:
        """Run from ``self.step`` to ``train.steps`` (or stop early after step ``until``, as a preempted
        job would), logging and checkpointing on the way."""
        cfg = self.cfg
        until = cfg.train.steps if until is None else min(until, cfg.train.steps)
        monitor = Monitor(self.run_dir, cfg.train.steps, start_step=self.step)
        monitor.print(
            f"training {self.data.name} ({len(self.data)} points, shape {self.data.shape}) with the "
            f"{cfg.coupling.kind} coupling on {self.device}: steps {self.step}->{cfg.train.steps}, batch {cfg.train.batch_size}, "
            f"{sum(p.numel() for p in self.model.parameters()):,} parameters"
        )
        window_t, window_n = time.perf_counter(), 0
        while self.step < until:
            metrics = self.train_step()
            window_n += cfg.train.batch_size
            monitor.advance()
            if not math.isfinite(metrics["loss"]):
                raise RuntimeError(
                    f"loss is {metrics['loss']} at step {self.step}; lower optim.lr or check the data"
                )
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
        if cfg.train.eval_at_end and self.step == cfg.train.steps:
            from sdfm.evaluate import evaluate_run

            evaluate_run(self.run_dir, monitor=monitor, trainer=self)
        monitor.close()

    def start_potential(self, resumed: bool) -> None:
        """Give the semidiscrete coupling its potential: restored from the checkpoint (resumed), fitted
        now, read from a file, or published by the worker (started here when configured so)."""
        if self.cfg.coupling.kind != "semidiscrete":
            return
        from sdfm.couplings.semidiscrete import snapshot_path
        from sdfm.semidiscrete import fit_potential, load_potential, save_potential
        from sdfm.semidiscrete.worker import WorkerProcess, fitter_kwargs, wait_for_version

        p, coupling = self.cfg.potential, self.coupling
        if p.source == "file" and not resumed:
            pot = load_potential(
                p.path, expected_fingerprint=self.data.fingerprint, expected_n=len(self.data)
            )
            coupling.set_potential(pot.g, pot.version, pot.chi2, pot.created)
            info(f"potential: loaded {p.path} (version {pot.version}, chi2 {pot.chi2:.4g})")
        elif p.source == "fit" and not resumed:
            info(
                f"potential: fitting g over N={len(self.data)} points to chi2 <= {p.target_chi2} ({p.method})"
            )
            res = fit_potential(
                self.data.x.flatten(1),
                **fitter_kwargs(self.cfg, self.data),
                max_steps=p.max_steps,
                target_chi2=p.target_chi2,
                max_seconds=p.max_seconds or None,
                log=info,
            )
            save_potential(
                self.run_dir / "potential" / "fitted.safetensors",
                res.g,
                version=1,
                step=res.steps,
                epsilon=p.epsilon,
                chi2=res.chi2,
                fingerprint=self.data.fingerprint,
                pca_dim=p.pca_dim,
            )
            coupling.set_potential(res.g, 1, res.chi2)
            info(f"potential: {res.steps} steps in {res.seconds:.1f} s, chi2 {res.chi2:.4g}")
        elif p.source == "worker":
            path = snapshot_path(self.run_dir)
            coupling.watch(path)
            if p.spawn_worker:
                self.worker = WorkerProcess(self.run_dir)
                info(f"potential: started worker pid {self.worker.proc.pid} (log {self.worker.log_path})")
            if coupling.version == 0 and not wait_for_version(path, timeout=120):
                info(
                    "warning: no potential published yet; training starts with g = 0 and picks versions up as they come"
                )
            coupling.poll()

    # ---------------------------------------------------------------------------------- checkpoints

    def save(self) -> Path:
        meta = {"fingerprint": self.data.fingerprint, "dataset": self.data.name}
        return self.ckpt.save(
            self.step,
            tensors={
                "model": self.model.state_dict(),
                "ema": self.ema.state_dict(),
                "coupling": self.coupling.state_dict(),
                "rng-rank0": {"trainer": self.gen.get_state()},
            },
            objects={"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
            state={
                "version": CHECKPOINT_VERSION,
                "data_position": self.stream.state_dict(),
                "fingerprint": self.data.fingerprint,
                "dataset": self.data.name,
                "world_size": 1,
            },
            metadata=meta,
        )

    def resume(self) -> bool:
        """Load the newest complete checkpoint; False when the run has none yet."""
        ckpt = self.ckpt.load_latest()
        if ckpt is None:
            return False
        state = ckpt.state
        if state.get("version") != CHECKPOINT_VERSION:
            raise UserError(
                f"checkpoint {ckpt.path} has layout version {state.get('version')}, this sdfm reads {CHECKPOINT_VERSION}"
            )
        if state["fingerprint"] != self.data.fingerprint:
            raise UserError(
                f"checkpoint {ckpt.path} was trained on data with fingerprint {state['fingerprint']}, but the "
                f"configured data has {self.data.fingerprint}; resume with the run's own data config"
            )
        self.model.load_state_dict(ckpt.tensors("model"))
        self.ema.load_state_dict(ckpt.tensors("ema"))
        self.coupling.load_state_dict(ckpt.tensors("coupling"))
        self.optimizer.load_state_dict(ckpt.object("optimizer"))
        self.scheduler.load_state_dict(ckpt.object("scheduler"))
        self.gen.set_state(ckpt.tensors("rng-rank0")["trainer"])
        self.stream.load_state_dict(state["data_position"])
        self.step = ckpt.step
        info(f"resumed from {ckpt.path} (step {ckpt.step})")
        return True


# ------------------------------------------------------------------------------------ run folder


def is_run_dir(path: Path) -> bool:
    return (path / "config.toml").exists() or (path / "checkpoints").exists()


def prepare_run_dir(run_dir: Path, cfg: Config, *, resume: bool, overwrite: bool) -> None:
    """Create the run folder, refusing to clobber an existing run unless asked, and save the config."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--run-dir {run_dir} is a file; choose a folder")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not is_run_dir(run_dir):
            raise UserError(f"--run-dir {run_dir} is not empty and holds no sdfm run; choose another folder")
        if not resume and not overwrite:
            raise UserError(
                f"--run-dir {run_dir} already holds a run; pass --resume to continue it or --overwrite to delete it and start over"
            )
        if overwrite:
            shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    from sdfm.checkpoint import write_atomic

    write_atomic(run_dir / "config.toml", config_mod.dumps(cfg).encode())


def run_training(cfg: Config, run_dir: Path, *, resume: bool = False, overwrite: bool = False) -> Trainer:
    """Set up the run folder and train (the body of ``sdfm train``)."""
    config_mod.validate(cfg)
    dataset = load_dataset(cfg.data)  # fail on bad data before touching the run folder
    prepare_run_dir(run_dir, cfg, resume=resume, overwrite=overwrite)
    from sdfm.semidiscrete.worker import record_dataset

    record_dataset(run_dir, dataset)
    trainer = Trainer(cfg, run_dir, dataset=dataset)
    resumed = resume and trainer.resume()
    if resume and not resumed:
        info(f"no checkpoint in {run_dir} yet; starting from step 0")
    try:
        trainer.start_potential(resumed)
        trainer.train()
    finally:
        if trainer.worker is not None:
            trainer.worker.stop()
    return trainer


def main(argv: list[str] | None = None) -> None:
    from sdfm.cli import main as cli_main

    cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
