"""Multi-process (data-parallel) parts of sdfm: torch.distributed set-up and the sharded solvers.

- ``env``: detects a torchrun / accelerate launch from the environment and joins the process group.
- ``sinkhorn``: the entropic Sinkhorn coupling of a global batch solved jointly across ranks.
- ``matching``: a matching index whose dataset is split across ranks.

Everything else in sdfm is single-device library code; only these modules take a process group.
"""
