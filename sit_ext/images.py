"""Pictures on disk: image folders in (ImageFolder's layout, ADM's center crop)
and uint8 images out (PNG files, a PNG grid, the ``.npz`` layout of the ADM
evaluation suite). Needs Pillow, which comes with the ``sit_ext[vae]`` extra.
"""

from __future__ import annotations

import math
import os
import struct
import zipfile
from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor

from ._io import NUMPY_READ_ERRORS, first_line
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


def _to_rgb(image, path: str):
    """image.convert("RGB"), except where Pillow's conversion is wrong: it
    clips 16-bit grey pixels at 255 and turns 32-bit and float pixels into 0 or
    255. 16-bit grey (mode I;16, or I from a PNG) is scaled to 8 bits here;
    other 32-bit and float images are refused."""
    if image.mode.startswith("I;16") or (image.mode == "I" and image.format == "PNG"):
        grey = np.rint(np.asarray(image).astype(np.float64) / 257.0).clip(0, 255).astype(np.uint8)
        return _pil().fromarray(np.repeat(grey[..., None], 3, axis=-1))
    if image.mode in ("I", "F"):
        raise DataError(f"cannot read image {path}: its pixels are {'float' if image.mode == 'F' else '32-bit'} "
                        f"(mode {image.mode}), which have no standard 8-bit colours: convert it to 8 or 16 bits")
    return image.convert("RGB")


def read_image(path: str, size: int | None = None) -> np.ndarray:
    """An RGB image as uint8 [H, W, 3], center-cropped to size x size if given."""
    Image = _pil()
    try:
        with Image.open(path) as image:
            image = _to_rgb(image, path)
            return center_crop(image, size) if size else np.asarray(image)
    except DataError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # damaged, or claims a huge size
        raise DataError(f"cannot read image {path}: {first_line(e)}") from None


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


def write_npz(path: str, chunks: Iterable[np.ndarray], shape: tuple[int, ...],
              labels: np.ndarray | None = None) -> None:
    """The ADM evaluation suite's layout: arr_0, uint8 [N, H, W, 3] (`shape`),
    written chunk by chunk as they come, so that no more than one chunk is in
    memory; labels, when given, as "labels". Uncompressed, as np.savez
    writes it (read_npz memory-maps it), through a temporary file that is
    renamed when complete."""
    shape = tuple(int(n) for n in shape)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                          "shape": shape}
                np.lib.format.write_array_header_2_0(f, header)
                written = 0
                for chunk in chunks:
                    if chunk.dtype != np.uint8 or chunk.shape[1:] != shape[1:]:
                        raise ValueError(f"write_npz: a chunk is {chunk.dtype} {list(chunk.shape)}, expected "
                                         f"uint8 [n, {', '.join(map(str, shape[1:]))}]")
                    written += len(chunk)
                    if written > shape[0]:
                        raise ValueError(f"write_npz: the chunks hold more than the {shape[0]} images of the shape")
                    f.write(np.ascontiguousarray(chunk).data)
                if written != shape[0]:
                    raise ValueError(f"write_npz: the chunks hold {written} images, the shape says {shape[0]}")
            if labels is not None:
                with zf.open("labels.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asarray(labels), allow_pickle=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _stored_npy(path: str, name: str) -> np.ndarray | None:
    """Member `name` of an .npz memory-mapped, or None when it is compressed
    (np.savez_compressed) or not a plain array."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)  # the local file header: its name and extra field lengths end it
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            return None
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            return None
        shape, fortran_order, dtype = read_header(f)
        offset = f.tell()
    data_end = info.header_offset + 30 + name_len + extra_len + info.file_size
    if dtype.hasobject or offset + dtype.itemsize * math.prod(shape) > data_end:
        return None
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran_order else "C")


def read_npz(path: str) -> np.ndarray:
    """arr_0 of an ADM-layout .npz: uint8 [N, H, W, 3], memory-mapped when it
    is stored uncompressed (np.savez, write_npz), so that 50,000 images need
    not fit in memory."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if "arr_0" not in f.files:
                raise DataError(f"{path} has no arr_0 (it holds {f.files}): expected the ADM layout, "
                                "uint8 images [N, H, W, 3] in arr_0")
        images = _stored_npy(path, "arr_0.npy")
        if images is None:
            with np.load(path, allow_pickle=False) as f:
                images = f["arr_0"]
    except DataError:
        raise
    except NUMPY_READ_ERRORS as e:
        raise DataError(f"cannot read {path}: {first_line(e)}") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(f"{path}: arr_0 is {images.dtype} {list(images.shape)}, expected uint8 [N, H, W, 3]")
    return images


class ImageFolderArray:
    """The images of a folder (at any depth, sorted by path) as uint8
    [N, H, W, 3], read from disk when indexed, so that a large folder need
    not fit in memory. All must have one size, checked from the files'
    headers when it is made."""

    def __init__(self, source: str):
        self.paths = sorted(os.path.join(folder, f) for folder, _, files in os.walk(source) for f in files
                            if _is_image(f))
        if not self.paths:
            raise DataError(f"{source!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        Image = _pil()
        sizes = []
        for path in self.paths:
            try:
                with Image.open(path) as image:
                    sizes.append(image.size)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                raise DataError(f"cannot read image {path}: {first_line(e)}") from None
            if sizes[-1] != sizes[0]:
                raise DataError(f"images in {source!r} differ in size: {self.paths[0]} is {sizes[0][::-1]}, "
                                f"{path} is {sizes[-1][::-1]}")
        width, height = sizes[0]
        self.shape = (len(self.paths), height, width, 3)
        self.dtype = np.dtype(np.uint8)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        if isinstance(index, slice):
            out = np.empty((len(self.paths[index]), *self.shape[1:]), np.uint8)
            for i, path in enumerate(self.paths[index]):
                out[i] = read_image(path)
            return out
        return read_image(self.paths[index])

    def __array__(self, dtype=None, copy=None):
        images = self[:]
        return images if dtype is None else images.astype(dtype)


def read_images(source: str) -> np.ndarray | ImageFolderArray:
    """uint8 [N, H, W, 3] from an ADM .npz (memory-mapped when uncompressed)
    or a folder of images (searched at any depth; all must have one size; read
    when sliced)."""
    if os.path.isfile(source):
        return read_npz(source)
    if not os.path.isdir(source):
        raise DataError(f"{source!r} is neither an .npz file nor a folder of images")
    return ImageFolderArray(source)
