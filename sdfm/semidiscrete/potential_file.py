"""The potential file: versioned, fingerprinted safetensors written atomically, checked when read.

The worker publishes ``RUN/potential/latest.safetensors`` in this format, ``sdfm fit-potential``
writes it, and trainers read it (``load_potential`` refuses foreign, torn, wrong-length and NaN files
with a one-line message).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from sdfm.checkpoint import write_atomic
from sdfm.errors import UserError

FORMAT = "sdfm.potential/1"

__all__ = ["FORMAT", "Potential", "load_potential", "save_potential"]


@dataclass
class Potential:
    """A published potential and where it came from.

    Attributes:
        g: (N,) float32 potential.
        version: publication counter of the worker.
        step: fitter step it was taken at.
        epsilon: regularization it was fitted for.
        chi2: χ̂² reported when it was published.
        fingerprint: ``sdfm.data.fingerprint`` of the data it was fitted on.
        n: number of points N.
        pca_dim: PCA dimension of the fit (0: none).
        created: Unix time of writing.
        extra: further string metadata.
    """

    g: Tensor
    version: int
    step: int
    epsilon: float
    chi2: float
    fingerprint: str
    n: int
    pca_dim: int = 0
    created: float = 0.0
    extra: dict[str, str] = field(default_factory=dict)


def save_potential(
    path: str | os.PathLike,
    g: Tensor,
    *,
    version: int,
    step: int,
    epsilon: float,
    chi2: float,
    fingerprint: str,
    pca_dim: int = 0,
    extra: dict[str, str] | None = None,
) -> Path:
    """Write g (N,) and its metadata as safetensors, atomically: a temporary file in the same folder,
    fsync, os.replace, fsync of the folder. A reader sees the old file or the new one, never a torn one.

    Returns:
        The path written.
    """
    from safetensors.torch import save

    path = Path(path)
    g = g.detach().to("cpu", torch.float32).contiguous()
    metadata = {
        "format": FORMAT,
        "version": str(int(version)),
        "step": str(int(step)),
        "epsilon": repr(float(epsilon)),
        "chi2": repr(float(chi2)),
        "fingerprint": str(fingerprint),
        "n": str(g.shape[0]),
        "pca_dim": str(int(pca_dim)),
        "created": repr(time.time()),
        "extra": json.dumps(extra or {}),
    }
    write_atomic(path, save({"g": g}, metadata=metadata))
    return path


def load_potential(
    path: str | os.PathLike,
    *,
    expected_fingerprint: str | None = None,
    expected_n: int | None = None,
) -> Potential:
    """Read a potential written by ``save_potential`` and check it.

    Raises:
        UserError: the file is missing, unreadable (truncated, not safetensors), of another format,
            has NaN/Inf in g, or does not match ``expected_n`` / ``expected_fingerprint``.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"potential file {path} does not exist; check the path or let the potential worker publish one"
        )
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            names = set(fh.keys())
            g = fh.get_tensor("g") if "g" in names else None
    except Exception as err:  # safetensors raises its own error type (and OSError) for torn files
        raise UserError(
            f"potential file {path} is not a readable safetensors file (truncated or corrupt: {err}); "
            "delete it and publish or fit the potential again"
        ) from err
    if metadata.get("format") != FORMAT or g is None:
        raise UserError(
            f"potential file {path} has format {metadata.get('format')!r} (expected {FORMAT!r} with a tensor 'g'); "
            "point at a file written by sdfm's save_potential"
        )
    g = g.to(torch.float32)
    if g.ndim != 1 or str(g.shape[0]) != metadata.get("n"):
        raise UserError(
            f"potential file {path} holds g of shape {tuple(g.shape)} but says n={metadata.get('n')}; "
            "the file is inconsistent, publish it again"
        )
    if not bool(torch.isfinite(g).all()):
        raise UserError(
            f"potential file {path} has {int((~torch.isfinite(g)).sum())} NaN/Inf entries in g; "
            "use an earlier version or refit (lower the learning rate if it diverged)"
        )
    if expected_n is not None and g.shape[0] != expected_n:
        raise UserError(
            f"potential file {path} has {g.shape[0]} entries but the dataset has {expected_n} points; "
            "use a potential fitted on this dataset"
        )
    if expected_fingerprint is not None and metadata.get("fingerprint") != expected_fingerprint:
        raise UserError(
            f"potential file {path} was fitted on data with fingerprint {metadata.get('fingerprint')} but this "
            f"dataset's is {expected_fingerprint}; use the potential of this dataset or refit it"
        )
    try:
        extra = json.loads(metadata.get("extra", "{}"))
        return Potential(
            g=g,
            version=int(metadata["version"]),
            step=int(metadata["step"]),
            epsilon=float(metadata["epsilon"]),
            chi2=float(metadata["chi2"]),
            fingerprint=metadata["fingerprint"],
            n=g.shape[0],
            pca_dim=int(metadata.get("pca_dim", "0")),
            created=float(metadata.get("created", "0")),
            extra={str(k): str(v) for k, v in extra.items()},
        )
    except (KeyError, ValueError) as err:
        raise UserError(
            f"potential file {path} has missing or malformed metadata ({err}); publish it again"
        ) from err
