"""Built-in data (nothing is downloaded) and quality figures.

- 2-D toy distributions, generated: checkerboard, moons, 8gaussians, spirals.
- Handwritten digits: scikit-learn's bundled ``load_digits`` (8x8, 10 classes),
  through the optional extra ``pip install sit_ext[digits]``.
- A folder of ``.npy`` / ``.pt`` arrays, one sample per file (for example
  pre-extracted VAE latents), with optional integer labels in ``labels.npy``
  or ``labels.pt`` (one per sample, in sorted file-name order).
- A folder of latent shards written by ``sit-ext encode`` (``latents.json``
  and one ``.npy`` array per shard): see ``load_latent_shards``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ._io import NUMPY_READ_ERRORS, FileFormatError, first_line, torch_load

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
        from .images import IMAGE_EXTENSIONS

        pictures = any(f.lower().endswith(IMAGE_EXTENSIONS) for _, _, files in os.walk(path) for f in files)
        hint = (f": it holds images, which train reads as VAE latents: run sit-ext encode --images {path} --vae VAE "
                "--out LATENTS first, then train with --data LATENTS") if pictures else ""
        raise DataError(f"data folder {path!r} holds no .npy or .pt arrays{hint}")
    arrays = [_load_array(os.path.join(path, f)) for f in names]
    shapes = {tuple(a.shape) for a in arrays}
    if len(shapes) > 1:
        examples = ", ".join(f"{n}: {tuple(a.shape)}" for n, a in list(zip(names, arrays))[:4])
        raise DataError(f"arrays in {path!r} have {len(shapes)} different shapes ({examples}, ...): "
                        "every sample must have the same shape")
    for name, a in zip(names, arrays):
        if not (a.dtype.is_floating_point or a.dtype in _INTEGER):
            raise DataError(f"{os.path.join(path, name)} holds {a.dtype} values: expected numbers")
        if a.dtype.is_floating_point and not torch.isfinite(a).all():
            raise DataError(f"{os.path.join(path, name)} holds NaN or infinite values")
    x = torch.stack(arrays).float()
    labels = None
    for label_file in ("labels.npy", "labels.pt"):
        if os.path.exists(os.path.join(path, label_file)):
            labels = check_labels(_load_array(os.path.join(path, label_file)), x.shape[0],
                                  os.path.join(path, label_file))
    return Dataset(os.path.basename(os.path.normpath(path)), x, labels,
                   int(labels.max()) + 1 if labels is not None else None)


_INTEGER = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def check_labels(labels: Tensor, n: int, source: str) -> Tensor:
    """labels as int64 [n], refusing fractions, negatives and a wrong count, with `source` named."""
    labels = labels.reshape(-1)
    if labels.shape[0] != n:
        raise DataError(f"{source} has {labels.shape[0]} labels for {n} samples")
    if labels.dtype.is_floating_point:
        if not torch.isfinite(labels).all() or (labels != labels.round()).any():
            raise DataError(f"{source} holds labels that are not integers")
    elif labels.dtype not in _INTEGER:
        raise DataError(f"{source} holds {labels.dtype} labels: expected integers")
    labels = labels.long()
    if n and labels.min() < 0:
        raise DataError(f"{source} holds negative labels")
    return labels


def _load_array(path: str) -> Tensor:
    if path.endswith(".npy"):
        try:
            array = np.load(path, allow_pickle=False)
        except NUMPY_READ_ERRORS as e:  # truncated, pickled, or not an .npy file
            raise DataError(f"cannot read {path}: {first_line(e)}") from None
        try:
            return torch.from_numpy(array)
        except TypeError:  # strings, objects
            raise DataError(f"{path} holds values that are not numbers") from None
    try:
        value = torch_load(path, "array file")
    except (FileFormatError, FileNotFoundError, IsADirectoryError) as e:
        raise DataError(str(e)) from None
    if not isinstance(value, Tensor):
        raise DataError(f"{path} holds a {type(value).__name__}, not a tensor")
    return value


# --------------------------------------------------------- latent shards

LATENT_INDEX = "latents.json"


class LatentShardWriter:
    """Writes latents [N, C, H, W] and optional labels [N] as shards of
    `shard_size` samples, latents-00000.npy (float32) and labels-00000.npy
    (int64), then the index latents.json (shape, counts, files and `meta`).
    The index comes last: a folder without one was never finished."""

    def __init__(self, folder: str, shard_size: int, meta: dict):
        if os.path.exists(os.path.join(folder, LATENT_INDEX)):
            raise DataError(f"{folder!r} already holds latents ({LATENT_INDEX}): choose another folder")
        os.makedirs(folder, exist_ok=True)
        self.folder, self.shard_size, self.meta = folder, shard_size, meta
        self.shards: list[dict] = []
        self.shape: list[int] | None = None
        self.labeled = False
        self._x: list[Tensor] = []
        self._y: list[Tensor] = []
        self._pending = 0

    def add(self, latents: Tensor, labels: Tensor | None = None) -> None:
        if self.shape is None:
            self.shape, self.labeled = list(latents.shape[1:]), labels is not None
        if list(latents.shape[1:]) != self.shape or (labels is not None) != self.labeled:
            raise ValueError(f"latents {list(latents.shape[1:])} with{'out' if labels is None else ''} labels after "
                             f"{self.shape} with{'' if self.labeled else 'out'}: every batch must match the first")
        if labels is not None and len(labels) != len(latents):
            raise ValueError(f"{len(labels)} labels for {len(latents)} latents")
        self._x.append(latents.float())
        if labels is not None:
            self._y.append(labels.long())
        self._pending += len(latents)
        while self._pending >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, n: int) -> None:
        x = torch.cat(self._x)
        y = torch.cat(self._y) if self._y else None
        entry = {"latents": f"latents-{len(self.shards):05d}.npy", "count": n}
        np.save(os.path.join(self.folder, entry["latents"]), x[:n].numpy())
        if y is not None:
            entry["labels"] = f"labels-{len(self.shards):05d}.npy"
            np.save(os.path.join(self.folder, entry["labels"]), y[:n].numpy())
        self.shards.append(entry)
        self._x, self._y = [x[n:]], [y[n:]] if y is not None else []
        self._pending -= n

    def close(self) -> dict:
        """Writes the last shard and the index; returns the index."""
        if self._pending:
            self._flush(self._pending)
        index = {"format": "sit_ext latents", "count": sum(s["count"] for s in self.shards), "shape": self.shape,
                 "dtype": "float32", "shards": self.shards, **self.meta}
        tmp = os.path.join(self.folder, f".{LATENT_INDEX}.tmp")
        with open(tmp, "w") as f:
            json.dump(index, f, indent=1)
        os.replace(tmp, os.path.join(self.folder, LATENT_INDEX))
        return index


def _read_latent_index(path: str) -> tuple[list[int], list[dict], int | None]:
    """(sample shape, shards, num_classes) of a latent index, each checked:
    positive sizes, whole counts, file names inside the folder."""
    index_path = os.path.join(path, LATENT_INDEX)
    try:
        with open(index_path) as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read the latent index {index_path}: {first_line(e)}") from None

    def bad(what: str) -> DataError:
        return DataError(f"the latent index {index_path} is damaged: {what}")

    def whole(v, least: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= least

    def file_name(v) -> bool:
        return isinstance(v, str) and v != "" and os.path.basename(v) == v and v not in (".", "..")

    if not isinstance(index, dict):
        raise bad(f"it holds a {type(index).__name__}, not an object")
    shape, shards, num_classes = index.get("shape"), index.get("shards"), index.get("num_classes")
    if not (isinstance(shape, list) and shape and all(whole(s, 1) for s in shape)):
        raise bad(f"shape {shape!r} is not a list of positive integers")
    if not (isinstance(shards, list) and shards):
        raise bad("shards is not a non-empty list")
    for i, shard in enumerate(shards):
        if not (isinstance(shard, dict) and file_name(shard.get("latents")) and whole(shard.get("count"), 0)
                and ("labels" not in shard or file_name(shard["labels"]))):
            raise bad(f"shard {i} ({shard!r}) needs a latents file name in the folder, a count >= 0 and "
                      "optionally a labels file name")
        if num_classes is not None and "labels" not in shard:
            raise bad(f"it gives num_classes but no labels file for {shard['latents']}")
    if num_classes is not None and not whole(num_classes, 1):
        raise bad(f"num_classes {num_classes!r} is not a positive integer")
    return shape, shards, num_classes


def load_latent_shards(path: str, progress: bool = True) -> Dataset:
    """The latents a LatentShardWriter wrote (``sit-ext encode``), read shard
    by shard from memory-mapped .npy files, with a progress bar (rank 0, on a
    terminal). Checked, naming the file: the index itself, shapes and counts as
    it says (before any memory is taken), finite values, integer labels in
    [0, num_classes)."""
    shape, shards, num_classes = _read_latent_index(path)
    arrays = []
    for shard in shards:
        file = os.path.join(path, shard["latents"])
        arr = _open_npy(file)
        if list(arr.shape) != [shard["count"], *shape] or not np.issubdtype(arr.dtype, np.floating):
            raise DataError(f"{file} holds {arr.dtype} {list(arr.shape)}; {LATENT_INDEX} says float "
                            f"{[shard['count'], *shape]}")
        arrays.append(arr)
    if not sum(s["count"] for s in shards):
        raise DataError(f"{os.path.join(path, LATENT_INDEX)} lists no latents")
    x = torch.empty(sum(s["count"] for s in shards), *shape)
    labels = torch.empty(len(x), dtype=torch.int64) if num_classes is not None else None
    from tqdm.auto import tqdm

    quiet = not progress or os.environ.get("RANK", "0") != "0"
    with tqdm(total=len(x), desc="load latents", unit="sample", disable=True if quiet else None) as bar:
        start = 0
        for shard, arr in zip(shards, arrays):
            n, file = shard["count"], os.path.join(path, shard["latents"])
            block = x[start : start + n].numpy()
            block[...] = arr  # reads the memory-mapped shard into place
            if not np.isfinite(block).all():
                raise DataError(f"{file} holds NaN or infinite values")
            if labels is not None:
                label_file = os.path.join(path, shard["labels"])
                y = check_labels(torch.from_numpy(np.array(_open_npy(label_file))), n, label_file)
                if n and y.max() >= num_classes:
                    raise DataError(f"{label_file} holds labels >= {num_classes}, the index's num_classes")
                labels[start : start + n] = y
            start += n
            bar.update(n)
    return Dataset(os.path.basename(os.path.normpath(path)), x, labels, num_classes)


def _open_npy(path: str) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except NUMPY_READ_ERRORS as e:
        raise DataError(f"cannot read {path}: {first_line(e)}") from None


# ---------------------------------------------------------------- loading


def load(name: str, n: int = 50_000, seed: int = 0) -> Dataset:
    """A built-in data set by name (a toy, "digits") or a folder path."""
    if name in TOYS:
        return Dataset(name, toy_2d(name, n, torch.Generator().manual_seed(seed)))
    if name == "digits":
        x, y = load_digits()
        return Dataset("digits", x, y, 10)
    if os.path.isfile(os.path.join(name, LATENT_INDEX)):
        return load_latent_shards(name)
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
    @torch.no_grad()
    def features(self, x: Tensor) -> Tensor:
        """The 10 class logits per image [N, 10]: the features whose Fréchet
        distance (sit_ext.evaluate.frechet_distance) the digits demo reports."""
        return x.reshape(len(x), -1).float().cpu() @ self.weight + self.bias

    @torch.no_grad()
    def accuracy(self, x: Tensor, y: Tensor) -> float:
        pred = (x.reshape(len(x), -1).float().cpu() @ self.weight + self.bias).argmax(1)
        return (pred == y.cpu()).float().mean().item()
