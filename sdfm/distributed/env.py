"""Launch detection and the process group of a data-parallel job.

``python -m sdfm.train`` is one process. Under ``torchrun`` (or ``accelerate launch``, which starts
torchrun's agent) every process finds RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in its
environment; ``detect`` reads them and ``init`` joins the process group with a timeout on every
collective, so a dead rank ends the job (an error on the survivors, which torchrun then restarts or
stops) instead of hanging it.

One process group (NCCL on GPUs, gloo on CPUs) carries the training step (DDP gradients, Sinkhorn
reductions) and the few agreements of the trainer (stop flags, config digests, a potential published
by the worker).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from sdfm.errors import AgreedError, UserError

RENDEZVOUS_VARS = ("MASTER_ADDR", "MASTER_PORT")
SLOW_TIMEOUT_S = 6 * 3600.0
"""Timeout of the group used while rank 0 does long one-off work that the others wait for."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job.

    Attributes:
        rank: global rank (0 for a single process).
        world_size: number of processes (1 for a single process).
        local_rank: rank on this node (selects the GPU).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int_var(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise UserError(
                f"{name} is not set but RANK is; launch with torchrun (it sets both) or unset RANK"
            )
        return default
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"{name}={raw!r} is not an integer; fix the launcher's environment") from None


def detect() -> DistEnv:
    """The launch this process belongs to, from torchrun's environment variables (single process when
    RANK is unset)."""
    if os.environ.get("RANK") is None:
        return DistEnv()
    rank, world = _int_var("RANK"), _int_var("WORLD_SIZE")
    local = _int_var("LOCAL_RANK", default=rank)
    if not 0 <= rank < world:
        raise UserError(f"RANK={rank} is outside WORLD_SIZE={world}; fix the launcher's environment")
    if world > 1:
        missing = [v for v in RENDEZVOUS_VARS if not os.environ.get(v)]
        if missing:
            raise UserError(
                f"{' and '.join(missing)} not set for a {world}-process job; launch with torchrun or set the rendezvous address"
            )
    return DistEnv(rank=rank, world_size=world, local_rank=local)


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent exits (prctl PR_SET_PDEATHSIG).

    A torchrun rank is a child of torchrun's agent, and once the agent is gone (killed, or its node
    preempted) the ranks cannot rendezvous or restart: without this they would go on running, and
    publishing, as orphans. Returns False where the call does not exist (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(1, int(sig), 0, 0, 0) != 0:  # PR_SET_PDEATHSIG = 1
        return False
    if os.getppid() != parent:  # the parent died before the request: act on it now
        os.kill(os.getpid(), sig)
    return True


def device_for(env: DistEnv, name: str, key: str = "train.device") -> torch.device:
    """The device of this rank for the setting ``key`` = name ('auto', 'cpu', 'cuda')."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"{key} = 'cuda' but CUDA is not available; use {key} = 'cpu' or 'auto'")
    if env.local_rank >= torch.cuda.device_count():
        raise UserError(
            f"LOCAL_RANK={env.local_rank} but this node has {torch.cuda.device_count()} GPUs; lower --nproc_per_node"
        )
    return torch.device("cuda", env.local_rank)


def potential_device(env: DistEnv, cfg) -> torch.device:
    """This rank's device for the semidiscrete potential: potential.device, or the trainer's ('auto')."""
    if cfg.potential.device == "auto":
        return device_for(env, cfg.train.device)
    return device_for(env, cfg.potential.device, "potential.device")


class ProcessGroup:
    """The job's process group (absent for a single process) and the few agreements sdfm needs.

    Only the default group is used, which keeps restarts simple: every key it puts in torchrun's
    store is specific to the restart attempt (see ``__init__``).

    Args:
        env: from ``detect``.
        device: this rank's device (selects NCCL for CUDA with backend 'auto').
        backend: 'auto', 'nccl' or 'gloo'.
        timeout_s: timeout of every collective.
    """

    def __init__(self, env: DistEnv, device: torch.device, backend: str = "auto", timeout_s: float = 600.0):
        self.env = env
        self.timeout = timedelta(seconds=timeout_s)
        self.flag_device = torch.device("cpu")  # where small agreement tensors live (CUDA for NCCL)
        self._waits = 0
        if not env.distributed:
            return
        die_with_parent()  # a rank of a dead torchrun agent is an orphan: end with it
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl" and device.type != "cuda":
            raise AgreedError("train.dist_backend='nccl' needs CUDA devices; use 'gloo' (or 'auto') on CPUs")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if backend == "nccl":
            self.flag_device = device
        # torchrun's agent keeps one store for all restarts, and the keys that gloo publishes its
        # address under are not specific to an attempt: a restarted rank could read a dead rank's
        # address (seen with --max-restarts on torch 2.13). Our keys carry the attempt number.
        store, _, _ = next(
            dist.rendezvous("env://", rank=env.rank, world_size=env.world_size, timeout=self.timeout)
        )
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(
            backend=backend,
            store=dist.PrefixStore(f"sdfm/attempt-{attempt}", store),
            rank=env.rank,
            world_size=env.world_size,
            timeout=self.timeout,
            device_id=device if device.type == "cuda" else None,
        )

    def wait_for_main(self, what: str) -> None:
        """Hold ranks other than 0 until rank 0 calls this too (after long one-off work, such as fitting a
        potential, that may outlast the collective timeout). The wait goes through the
        rendezvous store, with a timeout of SLOW_TIMEOUT_S; a rank that dies meanwhile is still caught
        by torchrun, which tears the job down."""
        if not self.env.distributed:
            return
        self._waits += 1
        key = f"wait/{self._waits}/{what}"  # the default store is already specific to this attempt
        store = dist.distributed_c10d._get_default_store()
        if self.env.is_main:
            store.set(key, b"1")
        else:
            store.wait([key], timedelta(seconds=max(self.timeout.total_seconds(), SLOW_TIMEOUT_S)))

    def broadcast_object(self, obj=None, src: int = 0):
        """``obj`` of rank ``src`` on every rank (pickled)."""
        if not self.env.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, device=self.flag_device)
        return box[0]

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on at least one (one tiny all-reduce)."""
        if not self.env.distributed:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int32, device=self.flag_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def check_same(
        self, what: str, value: object, fix: str = "launch every rank with the same config and data"
    ) -> None:
        """Raise ``AgreedError`` on every rank unless all ranks hold an equal ``value`` (by digest)."""
        if not self.env.distributed:
            return
        digest = hashlib.sha256(pickle.dumps(value)).hexdigest()[:16]
        digests: list[str | None] = [None] * self.env.world_size
        dist.all_gather_object(digests, digest)
        odd = [r for r, d in enumerate(digests) if d != digests[0]]
        if odd:
            raise AgreedError(f"{what} differs between rank 0 and ranks {odd}; {fix}")

    def close(self) -> None:
        if self.env.distributed and dist.is_initialized():
            dist.destroy_process_group()
