"""Pictures on disk: image folders in (ImageFolder's layout, ADM's center crop)
and uint8 images out (PNG files, a PNG grid, the ``.npz`` layout of the ADM
evaluation suite). Needs Pillow, which comes with the ``sit_ext[vae]`` extra.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch import Tensor

from .data import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("images need Pillow: pip install 'sit_ext[vae]' (or pip install pillow)") from None
    return Image


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def list_image_folder(root: str) -> tuple[list[str], list[int] | None, list[str]]:
    """(paths, labels, class names) as torchvision's ImageFolder: each
    subfolder is a class (sorted names give the indices), its images at any
    depth, sorted. A folder without subfolders is one unlabelled set."""
    if not os.path.isdir(root):
        raise DataError(f"image folder {root!r} does not exist")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    paths, labels = [], []
    for index, name in enumerate(classes):
        for folder, _, files in sorted(os.walk(os.path.join(root, name), followlinks=True)):
            found = [os.path.join(folder, f) for f in sorted(files) if _is_image(f)]
            paths += found
            labels += [index] * len(found)
    if not classes:
        paths = sorted(os.path.join(root, f) for f in os.listdir(root) if _is_image(f))
    if not paths:
        raise DataError(f"{root!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})"
                        + (f" in its class folders {classes[:5]}" if classes else ""))
    return paths, (labels if classes else None), classes


def center_crop(image, size: int) -> np.ndarray:
    """ADM's center_crop_arr (used by DiT and SiT): halve with a box filter
    while the short side is at least 2 * size, resize it to size (bicubic),
    then crop the middle: a uint8 array [size, size, 3]."""
    Image = _pil()
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image.convert("RGB"))
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


def read_image(path: str, size: int | None = None) -> np.ndarray:
    """An RGB image as uint8 [H, W, 3], center-cropped to size x size if given."""
    Image = _pil()
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            return center_crop(image, size) if size else np.asarray(image)
    except OSError as e:
        raise DataError(f"cannot read image {path}: {e}") from None


def to_uint8(images: Tensor) -> np.ndarray:
    """Images [N, 3, H, W] in [-1, 1] -> uint8 [N, H, W, 3], rounded as DiT's sampler."""
    x = (images.float() * 127.5 + 128.0).clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(images: np.ndarray) -> Tensor:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def save_png(path: str, image: np.ndarray) -> None:
    """Writes a temporary file and renames it: an interrupted run never
    leaves a truncated PNG that a resumed run would keep."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        _pil().fromarray(image).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_grid(path: str, images: np.ndarray, nrow: int | None = None, pad: int = 2) -> None:
    """uint8 images [N, H, W, 3] tiled nrow to a row on white, as one PNG."""
    n, h, w, c = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    canvas = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, q = divmod(i, nrow)
        canvas[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = image
    save_png(path, canvas)


def save_npz(path: str, images: np.ndarray, labels: np.ndarray | None = None) -> None:
    """The ADM evaluation suite's layout: arr_0, uint8 [N, H, W, 3]; labels,
    when given, as "labels"."""
    arrays = {"arr_0": images} if labels is None else {"arr_0": images, "labels": labels}
    np.savez(path, **arrays)


def read_npz(path: str) -> np.ndarray:
    """arr_0 of an ADM-layout .npz: uint8 [N, H, W, 3]."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if "arr_0" not in f.files:
                raise DataError(f"{path} has no arr_0 (it holds {f.files}): expected the ADM layout, "
                                "uint8 images [N, H, W, 3] in arr_0")
            images = f["arr_0"]
    except (OSError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"cannot read {path}: {e}") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(f"{path}: arr_0 is {images.dtype} {list(images.shape)}, expected uint8 [N, H, W, 3]")
    return images


def read_images(source: str) -> np.ndarray:
    """uint8 [N, H, W, 3] from an ADM .npz or a folder of images (searched at
    any depth; all must have one size)."""
    if os.path.isfile(source):
        return read_npz(source)
    if not os.path.isdir(source):
        raise DataError(f"{source!r} is neither an .npz file nor a folder of images")
    paths = sorted(os.path.join(folder, f) for folder, _, files in os.walk(source) for f in files if _is_image(f))
    if not paths:
        raise DataError(f"{source!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    images = [read_image(p) for p in paths]
    for p, image in zip(paths, images):
        if image.shape != images[0].shape:
            raise DataError(f"images in {source!r} differ in size: {paths[0]} is {images[0].shape[:2]}, "
                            f"{p} is {image.shape[:2]}")
    return np.stack(images)
