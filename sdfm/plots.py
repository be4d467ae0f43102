"""Pictures of samples: a scatter and trajectory plot for 2-D data, an image grid for images."""

from __future__ import annotations

import io

import numpy as np
from torch import Tensor


def image_grid(images: Tensor, nrow: int = 8, pad: int = 1) -> np.ndarray:
    """Tile (B, C, H, W) images in [-1, 1] into one (H', W', 3) uint8 picture."""
    x = ((images.detach().cpu().float().clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
    if x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)
    b, _, h, w = x.shape
    ncol = min(nrow, b)
    nrows = (b + ncol - 1) // ncol
    grid = np.full((nrows * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(b):
        r, c = divmod(i, ncol)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = (
            x[i].transpose(1, 2, 0)
        )
    return grid


def scatter_2d(
    samples: Tensor, data: Tensor, trajectory: Tensor | None = None, title: str = ""
) -> np.ndarray:
    """Plot 2-D samples over held-out data and, when given, trajectories (S+1, B, 2); (H, W, 3) uint8."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if trajectory is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 5), squeeze=False)
    ax = axes[0, 0]
    d, s = data.cpu().numpy(), samples.cpu().numpy()
    ax.scatter(d[:, 0], d[:, 1], s=2, c="0.7", label="data (held out)")
    ax.scatter(s[:, 0], s[:, 1], s=2, c="tab:blue", label="samples")
    ax.set_title(title or "samples")
    ax.legend(loc="upper right", markerscale=4)
    ax.set_aspect("equal")
    if trajectory is not None:
        ax = axes[0, 1]
        tr = trajectory.cpu().numpy()[:, :300]
        ax.plot(tr[:, :, 0], tr[:, :, 1], c="olive", alpha=0.3, lw=0.6)
        ax.scatter(tr[0, :, 0], tr[0, :, 1], s=3, c="black", label="x0 (noise)")
        ax.scatter(tr[-1, :, 0], tr[-1, :, 1], s=3, c="tab:blue", label="x1 (sample)")
        ax.set_title("trajectories")
        ax.legend(loc="upper right", markerscale=3)
        ax.set_aspect("equal")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def png_bytes(picture: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 picture as PNG bytes (callers write them atomically)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(picture).save(buf, format="PNG")
    return buf.getvalue()
