"""Built-in data (nothing is downloaded) and quality figures.

- 2-D toy distributions, generated: checkerboard, moons, 8gaussians, spirals.
- Handwritten digits: scikit-learn's bundled ``load_digits`` (8x8, 10 classes),
  through the optional extra ``pip install sit_ext[digits]``.
- A folder of ``.npy`` / ``.pt`` arrays, one sample per file (for example
  pre-extracted VAE latents), with optional integer labels in ``labels.npy``
  or ``labels.pt`` (one per sample, in sorted file-name order).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

TOYS = ("checkerboard", "moons", "8gaussians", "spirals")


class DataError(ValueError):
    """A data source that cannot be used, with the reason."""


@dataclass
class Dataset:
    """In-memory training data: x [N, ...] float32, optional labels [N] int64."""

    name: str
    x: Tensor
    labels: Tensor | None = None
    num_classes: int | None = None

    @property
    def kind(self) -> str:
        """"points" for 2-D toys, "image" for [N, C, H, W] data, else "vector"."""
        if self.x.dim() == 4:
            return "image"
        return "points" if self.x.dim() == 2 and self.x.shape[1] == 2 else "vector"


# ----------------------------------------------------------------- toys


def toy_2d(name: str, n: int, generator: torch.Generator | None = None) -> Tensor:
    """n points of a 2-D toy distribution, roughly within [-4, 4]^2."""
    if name not in TOYS:
        raise DataError(f"unknown toy distribution {name!r}: choose from {list(TOYS)}")
    g = generator

    def rand(*shape):
        return torch.rand(*shape, generator=g)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    if name == "checkerboard":
        x1 = rand(n) * 4 - 2
        x2 = rand(n) - torch.randint(0, 2, (n,), generator=g) * 2.0
        x2 = x2 + torch.floor(x1) % 2
        return torch.stack([x1, x2], 1) * 2
    if name == "moons":
        upper = torch.randint(0, 2, (n,), generator=g).bool()
        angle = rand(n) * math.pi
        x = torch.where(upper, torch.cos(angle), 1 - torch.cos(angle))
        y = torch.where(upper, torch.sin(angle), 0.5 - torch.sin(angle))
        return (torch.stack([x - 0.5, y - 0.25], 1) + 0.08 * randn(n, 2)) * 2
    if name == "8gaussians":
        centers = torch.tensor([(math.cos(k * math.pi / 4), math.sin(k * math.pi / 4)) for k in range(8)]) * 2.5
        return centers[torch.randint(0, 8, (n,), generator=g)] + 0.2 * randn(n, 2)
    # spirals: two interleaved arms
    arm = torch.randint(0, 2, (n,), generator=g)
    r = torch.sqrt(rand(n)) * 3.5
    angle = r * 2.2 + arm * math.pi
    return torch.stack([r * torch.cos(angle), r * torch.sin(angle)], 1) + 0.08 * randn(n, 2)


# --------------------------------------------------------------- digits


def load_digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's 8x8 digits as [1797, 1, 8, 8] in [-1, 1] and labels [1797]."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError:
        raise DataError("the digits data needs scikit-learn: pip install 'sit_ext[digits]' "
                        "(or pip install scikit-learn)") from None
    digits = sk_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    return x, torch.tensor(digits.target, dtype=torch.int64)


# --------------------------------------------------------------- folder


def load_folder(path: str) -> Dataset:
    """Every .npy / .pt file in `path` is one sample; all must have one shape."""
    if not os.path.isdir(path):
        raise DataError(f"data folder {path!r} does not exist")
    names = sorted(f for f in os.listdir(path) if f.endswith((".npy", ".pt")) and not f.startswith("labels."))
    if not names:
        raise DataError(f"data folder {path!r} holds no .npy or .pt arrays")
    arrays = [_load_array(os.path.join(path, f)) for f in names]
    shapes = {tuple(a.shape) for a in arrays}
    if len(shapes) > 1:
        examples = ", ".join(f"{n}: {tuple(a.shape)}" for n, a in list(zip(names, arrays))[:4])
        raise DataError(f"arrays in {path!r} have {len(shapes)} different shapes ({examples}, ...): "
                        "every sample must have the same shape")
    x = torch.stack(arrays).float()
    labels = None
    for label_file in ("labels.npy", "labels.pt"):
        if os.path.exists(os.path.join(path, label_file)):
            labels = _load_array(os.path.join(path, label_file)).long().reshape(-1)
            if labels.shape[0] != x.shape[0]:
                raise DataError(f"{label_file} has {labels.shape[0]} labels for {x.shape[0]} samples")
            if labels.min() < 0:
                raise DataError(f"{label_file} holds negative labels")
    return Dataset(os.path.basename(os.path.normpath(path)), x, labels,
                   int(labels.max()) + 1 if labels is not None else None)


def _load_array(path: str) -> Tensor:
    try:
        if path.endswith(".npy"):
            return torch.from_numpy(np.load(path, allow_pickle=False))
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise DataError(f"cannot read {path}: {e}") from None
    if not isinstance(value, Tensor):
        raise DataError(f"{path} holds a {type(value).__name__}, not a tensor")
    return value


# ---------------------------------------------------------------- loading


def load(name: str, n: int = 50_000, seed: int = 0) -> Dataset:
    """A built-in data set by name (a toy, "digits") or a folder path."""
    if name in TOYS:
        return Dataset(name, toy_2d(name, n, torch.Generator().manual_seed(seed)))
    if name == "digits":
        x, y = load_digits()
        return Dataset("digits", x, y, 10)
    if os.path.isdir(name):
        return load_folder(name)
    raise DataError(f"unknown data {name!r}: choose one of {list(TOYS) + ['digits']} or a folder of arrays")


# --------------------------------------------------------------- quality


def sliced_wasserstein(a: Tensor, b: Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced 1-Wasserstein distance between two point sets [N, D] (equal N):
    the mean over random directions of the W1 distance of the projections."""
    if a.shape != b.shape:
        n = min(a.shape[0], b.shape[0])
        a, b = a[:n], b[:n]
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], projections, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa = torch.sort(a.double().cpu() @ dirs, dim=0).values
    pb = torch.sort(b.double().cpu() @ dirs, dim=0).values
    return (pa - pb).abs().mean().item()


class DigitClassifier:
    """Multinomial logistic regression on the 64 pixels of the real digits: the
    judge of class-conditional samples."""

    def __init__(self, x: Tensor, y: Tensor, steps: int = 500):
        torch.manual_seed(0)
        self.weight = torch.zeros(64, 10, requires_grad=True)
        self.bias = torch.zeros(10, requires_grad=True)
        opt = torch.optim.LBFGS([self.weight, self.bias], max_iter=steps, line_search_fn="strong_wolfe")
        flat = x.reshape(len(x), -1)

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(flat @ self.weight + self.bias, y)
            loss = loss + 1e-3 * self.weight.square().sum()
            loss.backward()
            return loss

        opt.step(closure)

    @torch.no_grad()
    def accuracy(self, x: Tensor, y: Tensor) -> float:
        pred = (x.reshape(len(x), -1).float().cpu() @ self.weight + self.bias).argmax(1)
        return (pred == y.cpu()).float().mean().item()
