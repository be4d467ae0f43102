"""A small CNN trained on the dataset itself, used as the feature space of a Fréchet distance.

No pretrained Inception weights can be downloaded here, so image quality is measured as the FD between
Gaussian fits of the penultimate-layer features of a classifier that the project trains itself on the
real images (docs/design.md §12). Values are comparable only between runs that use the same classifier file;
the file name carries the dataset's fingerprint, and its metadata the validation accuracy.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdfm.checkpoint import write_atomic
from sdfm.errors import UserError
from sdfm.metrics.distances import frechet_distance, gaussian_stats

# Bump when the architecture or the meaning of a metadata key changes: old files then fail to load
# with a message, instead of loading into a different network.
FORMAT = "sdfm.FeatureNet/1"
_ARCH_KEYS = ("image_size", "num_classes", "feat_dim", "width")


class FeatureNet(nn.Module):
    """CNN classifier for (B, 1, H, W) images in [-1, 1], H = W = image_size (8 digits, 28 FMNIST).

    Stages of conv3x3-ReLU-maxpool2 halve the image while it stays at least 4x4 (one stage at 8x8, two
    at 28x28), with ``width``, 2 * width, ... channels; then one more conv3x3-ReLU, a linear layer to
    ``feat_dim`` (the features), ReLU, and a linear head to the class logits. The features are taken
    before that ReLU: after it, a third or more of the units are zero on every image (dead), which
    makes the feature covariance of the Fréchet distance singular.

    Args:
        image_size: H = W of the input images (>= 4).
        num_classes: number of classes.
        feat_dim: size of the feature vector that ``features`` returns.
        width: channels of the first conv layer; doubled at each stage.

    Attributes:
        metadata: the string metadata of the file the model was loaded from or saved to (dataset,
            fingerprint, val_accuracy, ...); empty for a model that was neither.
    """

    def __init__(self, image_size: int, num_classes: int = 10, feat_dim: int = 128, width: int = 16):
        super().__init__()
        if image_size < 4:
            raise ValueError(f"image_size must be >= 4, got {image_size}")
        self.image_size, self.num_classes = image_size, num_classes
        self.feat_dim, self.width = feat_dim, width
        layers: list[nn.Module] = []
        size, c_in, c_out = image_size, 1, width
        while size // 2 >= 4:
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            size, c_in, c_out = size // 2, c_out, 2 * c_out
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.Flatten()]
        self.trunk = nn.Sequential(*layers)
        self.embed = nn.Linear(c_out * size * size, feat_dim)
        self.head = nn.Linear(feat_dim, num_classes)
        self.metadata: dict[str, str] = {}

    def features(self, x: Tensor) -> Tensor:
        """(B, 1, H, W) images -> (B, feat_dim) penultimate-layer features."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, self.image_size, self.image_size):
            size = self.image_size
            raise ValueError(f"FeatureNet expects images (B, 1, {size}, {size}), got {tuple(x.shape)}")
        return self.embed(self.trunk(x))

    def forward(self, x: Tensor) -> Tensor:
        """(B, 1, H, W) images -> (B, num_classes) logits."""
        return self.head(F.relu(self.features(x)))

    def arch(self) -> dict[str, int]:
        """The constructor arguments, as saved in the file's metadata."""
        return {key: getattr(self, key) for key in _ARCH_KEYS}


def _check_images(name: str, x: Tensor, labels: Tensor) -> None:
    if x.ndim != 4 or x.shape[1] != 1 or x.shape[2] != x.shape[3]:
        raise ValueError(f"{name} must be square images (N, 1, H, H), got {tuple(x.shape)}")
    if labels.shape != (x.shape[0],) or labels.dtype != torch.long:
        raise ValueError(
            f"labels of {name} must be int64 of shape ({x.shape[0]},), "
            f"got {labels.dtype} {tuple(labels.shape)}"
        )


@torch.no_grad()
def _accuracy(model: FeatureNet, x: Tensor, labels: Tensor, batch_size: int = 1000) -> float:
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(x), batch_size):
        predicted = model(x[i : i + batch_size].to(device)).argmax(dim=1).cpu()
        correct += int((predicted == labels[i : i + batch_size].cpu()).sum())
    return correct / len(x)


def train_classifier(
    x: Tensor,
    labels: Tensor,
    x_val: Tensor,
    labels_val: Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    log: Callable[[str], None] | None = None,
) -> tuple[FeatureNet, float]:
    """Train a ``FeatureNet`` with Adam and a cosine learning-rate decay, on x's device.

    Reproducible given ``seed``: the initialization draws from the global RNG inside
    ``torch.random.fork_rng`` seeded with ``seed`` (the caller's global RNG state is left as it was),
    and the epoch shuffles come from an explicit ``torch.Generator(seed)``.

    Args:
        x: (N, 1, H, H) training images in [-1, 1].
        labels: (N,) int64 classes 0..C-1.
        x_val: (M, 1, H, H) held-out images.
        labels_val: (M,) int64 classes.
        epochs: passes over x.
        batch_size: images per optimizer step.
        lr: peak learning rate of Adam.
        seed: seed of the initialization and of the shuffles.
        log: called with one line per epoch (loss, validation accuracy, seconds), or None.

    Returns:
        The model in eval mode, and its accuracy on (x_val, labels_val).
    """
    _check_images("x", x, labels)
    _check_images("x_val", x_val, labels_val)
    if x_val.shape[2:] != x.shape[2:]:
        raise ValueError(f"x_val images are {tuple(x_val.shape[2:])} but x images are {tuple(x.shape[2:])}")
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"need epochs >= 1, batch_size >= 1, lr > 0; got {epochs}, {batch_size}, {lr}")
    labels = labels.to(x.device)
    num_classes = int(max(labels.max(), labels_val.max())) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FeatureNet(x.shape[-1], num_classes=num_classes).to(x.device)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(x) / batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    val_accuracy = 0.0
    for epoch in range(epochs):
        start, total_loss = time.perf_counter(), torch.zeros((), device=x.device)
        model.train()
        order = torch.randperm(len(x), generator=generator).to(x.device)
        for i in range(0, len(x), batch_size):
            rows = order[i : i + batch_size]
            loss = F.cross_entropy(model(x[rows]), labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.detach() * len(rows)  # a tensor: no device sync per step
        model.eval()
        val_accuracy = _accuracy(model, x_val, labels_val)
        if log is not None:
            log(
                f"classifier epoch {epoch + 1}/{epochs} loss {float(total_loss) / len(x):.4f} "
                f"val_acc {val_accuracy:.4f} ({time.perf_counter() - start:.1f} s)"
            )
    return model, val_accuracy


def save_classifier(model: FeatureNet, path: str | os.PathLike, metadata: Mapping[str, object]) -> None:
    """Save the model's weights as safetensors, atomically (temporary file, fsync, os.replace).

    The file's string metadata holds ``format`` and the architecture (image_size, num_classes,
    feat_dim, width), taken from the model, plus the caller's ``metadata`` (get_classifier writes
    dataset, fingerprint and val_accuracy), each converted with ``str``.

    Args:
        model: the trained classifier; its ``metadata`` becomes the file's.
        path: destination file; its folder is created if missing.
        metadata: extra entries; may not redefine ``format`` or the architecture keys.
    """
    clash = {"format", *_ARCH_KEYS} & set(metadata)
    if clash:
        raise ValueError(f"metadata may not set {sorted(clash)}: they are taken from the model")
    header = {"format": FORMAT, **{k: str(v) for k, v in model.arch().items()}}
    header.update({k: str(v) for k, v in metadata.items()})
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_atomic(Path(path), safetensors.torch.save(tensors, metadata=header))
    model.metadata = header


def load_classifier(path: str | os.PathLike) -> FeatureNet:
    """Rebuild a classifier saved by ``save_classifier``, on the CPU, in eval mode.

    Args:
        path: the .safetensors file.

    Returns:
        The model, with the file's metadata (all values strings) in ``model.metadata``.

    Raises:
        UserError: if the file is missing, is not a complete safetensors file, was written by another
            format version, or its tensors do not fit the architecture its metadata describes.
    """
    path = Path(path)
    fix = f"delete {path} to retrain it"
    if not path.is_file():
        raise UserError(f"classifier file {path} does not exist")
    try:
        # safe_open checks the header and that the file holds every tensor's bytes, so a truncated
        # file fails here rather than loading garbage.
        with safetensors.safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # safetensors raises its own error types (and OSError, ValueError)
        raise UserError(f"{path} is not a valid safetensors file ({e}); {fix}") from e
    if metadata.get("format") != FORMAT:
        raise UserError(f"{path} has format {metadata.get('format')!r}, expected {FORMAT!r}; {fix}")
    try:
        arch = {key: int(metadata[key]) for key in _ARCH_KEYS}
    except (KeyError, ValueError) as e:
        raise UserError(f"{path} has missing or bad architecture metadata ({e}); {fix}") from e
    model = FeatureNet(**arch)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise UserError(f"{path} does not match the architecture in its metadata ({e}); {fix}") from e
    model.metadata = metadata
    return model.eval()


def classifier_path(dataset_name: str, fingerprint: str) -> Path:
    """Cache location of the classifier of a dataset: $SDFM_CACHE/classifiers/NAME-FINGERPRINT.safetensors.

    $SDFM_CACHE defaults to ~/.cache/sdfm. Both parts must be file-name safe (letters, digits, ``.``,
    ``_``, ``-``); the fingerprint is cut to its first 16 characters.
    """
    for what, value in (("dataset_name", dataset_name), ("fingerprint", fingerprint)):
        if not re.fullmatch(r"[A-Za-z0-9._-]+", value):
            raise ValueError(f"{what} {value!r} must be non-empty and use only letters, digits, . _ -")
    root = Path(os.environ.get("SDFM_CACHE") or "~/.cache/sdfm").expanduser()
    for parent in (root / "classifiers", *root.parents, root):
        if parent.exists() and not parent.is_dir():
            raise UserError(f"SDFM_CACHE={root}: {parent} is a file, but sdfm caches its classifiers there; set SDFM_CACHE to a folder")
    return root / "classifiers" / f"{dataset_name}-{fingerprint[:16]}.safetensors"


def default_epochs(num_images: int) -> int:
    """Epochs for ``get_classifier``: about 20,000 images seen, and at least 3 passes.

    That is 14 epochs for 1,437 digits (98% validation accuracy in ~2 s on 2 CPU cores) and 3 for
    60,000 Fashion-MNIST images (90% in ~45 s on 2 idle cores, ~80 s on one thread), as measured
    when this was written.
    """
    return max(3, min(40, math.ceil(20_000 / num_images)))


def get_classifier(
    dataset_name: str,
    fingerprint: str,
    x: Tensor,
    labels: Tensor,
    x_val: Tensor,
    labels_val: Tensor,
    *,
    train_if_missing: bool = True,
    log: Callable[[str], None] = print,
    epochs: int | None = None,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
) -> FeatureNet:
    """Load the cached classifier of a dataset, or train it on (x, labels) and cache it.

    Call it on one process (rank 0) when the cache may be empty: two processes would both train
    (deterministically, to the same weights, and the atomic write keeps the file whole either way).

    Args:
        dataset_name: name in the cache file name (e.g. ``digits``, ``fashion_mnist``).
        fingerprint: fingerprint of the dataset; a cached file with another fingerprint is refused.
        x: (N, 1, H, H) training images in [-1, 1].
        labels: (N,) int64 classes.
        x_val: (M, 1, H, H) held-out images, for the reported accuracy.
        labels_val: (M,) int64 classes.
        train_if_missing: train when no cached file exists; otherwise that is an error.
        log: receives progress lines.
        epochs: training epochs; None picks ``default_epochs(N)``.
        batch_size: training batch size.
        lr: peak learning rate.
        seed: training seed.

    Returns:
        The model (CPU, eval mode), its file's metadata (dataset, fingerprint, val_accuracy, ...) in
        ``model.metadata``.
    """
    path = classifier_path(dataset_name, fingerprint)
    if path.exists():
        model = load_classifier(path)
        if model.metadata.get("fingerprint") != fingerprint:
            raise UserError(
                f"{path} was trained on data with fingerprint {model.metadata.get('fingerprint')!r}, "
                f"not {fingerprint!r}; delete it to retrain"
            )
        if model.image_size != x.shape[-1]:
            raise UserError(f"{path} is for {model.image_size}x{model.image_size} images, not {x.shape[-1]}")
        log(f"classifier: loaded {path} (val_acc {model.metadata.get('val_accuracy')})")
        return model
    if not train_if_missing:
        raise UserError(f"no cached classifier for {dataset_name} at {path}; allow training to create it")
    epochs = default_epochs(len(x)) if epochs is None else epochs
    log(f"classifier: training on {len(x)} {dataset_name} images for {epochs} epochs")
    start = time.perf_counter()
    model, val_accuracy = train_classifier(
        x, labels, x_val, labels_val, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, log=log
    )
    model = model.cpu()
    metadata = {
        "dataset": dataset_name,
        "fingerprint": fingerprint,
        "val_accuracy": f"{val_accuracy:.6f}",
        "train_images": str(len(x)),
        "epochs": str(epochs),
        "seed": str(seed),
    }
    save_classifier(model, path, metadata)
    log(f"classifier: val_acc {val_accuracy:.4f} in {time.perf_counter() - start:.1f} s, saved {path}")
    return model


@torch.no_grad()
def classifier_features(model: FeatureNet, x: Tensor, batch_size: int = 500) -> Tensor:
    """Features of images, in batches on the model's device.

    Args:
        model: the classifier (switched to eval mode).
        x: (N, 1, H, H) images in [-1, 1].
        batch_size: images per forward pass.

    Returns:
        (N, feat_dim) float32 features, on the CPU.
    """
    model.eval()
    device = next(model.parameters()).device
    parts = []
    for i in range(0, len(x), batch_size):
        parts.append(model.features(x[i : i + batch_size].to(device)).cpu())
    return torch.cat(parts)


def classifier_frechet(model: FeatureNet, x_gen: Tensor, x_ref: Tensor, batch_size: int = 500) -> float:
    """Fréchet distance between Gaussian fits of the classifier features of two image sets.

    The FID recipe with ``model.features`` in place of Inception's pool3 features. It is biased
    upwards at small sample sizes (as FID is): compare values computed with the same number of
    images, a few thousand when possible (the feature dimension is 128).

    Args:
        model: the classifier.
        x_gen: (N, 1, H, H) generated images in [-1, 1].
        x_ref: (M, 1, H, H) reference (real) images.
        batch_size: images per forward pass.

    Returns:
        The Fréchet distance, >= 0.
    """
    mu_gen, cov_gen = gaussian_stats(classifier_features(model, x_gen, batch_size))
    mu_ref, cov_ref = gaussian_stats(classifier_features(model, x_ref, batch_size))
    return frechet_distance(mu_gen, cov_gen, mu_ref, cov_ref)
