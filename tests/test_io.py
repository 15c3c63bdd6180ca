"""Damaged files: torch_load's failures are FileFormatErrors that name the
file, and garbage is never reported as a code payload; damaged .npy, .npz and
image files are DataErrors naming the file, never another exception (which
the CLI would show as a traceback)."""

import io
import os
import pickle
import random

import numpy as np
import pytest
import torch

from sit_ext import data as data_lib
from sit_ext import images as images_lib
from sit_ext._io import FileFormatError, torch_load


def saved(zip_format: bool) -> bytes:
    buf = io.BytesIO()
    torch.save({"model": {"w": torch.randn(3, 4)}, "step": 3, "config": {"model": "SiT-S/2"}}, buf,
               _use_new_zipfile_serialization=zip_format)
    return buf.getvalue()


class Payload:
    def __reduce__(self):
        return (os.system, ("true",))


def test_good_files_load(tmp_path):
    for zip_format in (True, False):
        path = tmp_path / f"good{zip_format}.pt"
        path.write_bytes(saved(zip_format))
        assert torch_load(path)["step"] == 3


def test_code_payload_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(FileFormatError, match="imports or calls objects"):
        torch_load(path)


# Random bytes that begin with an opcode that imports or calls (GLOBAL, REDUCE,
# STACK_GLOBAL, INST, OBJ): once reported as a code payload, since the scan
# stopped at the first such opcode before finding the rest was not a pickle.
GARBAGE = [bytes([lead]) + random.Random(seed).randbytes(size)
           for seed, (lead, size) in enumerate((lead, size) for lead in b"cR\x93io\x80N" for size in (0, 1, 7, 2000))]
GARBAGE += [random.Random(1000 + seed).randbytes(2000) for seed in range(200)]


def test_garbage_is_corrupt(tmp_path):
    path = tmp_path / "garbage.pt"
    for data in GARBAGE:
        path.write_bytes(data)
        with pytest.raises(FileFormatError, match="garbage.pt' is truncated or corrupt"):
            torch_load(path, "checkpoint")


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_damaged_checkpoints(tmp_path, zip_format):
    """Flipped bytes, truncation and overwritten runs in a real checkpoint:
    it either still loads or is a FileFormatError naming the file."""
    path = tmp_path / "damaged.pt"
    refused = 0
    for data in damaged(saved(zip_format), random.Random(7), 400):
        path.write_bytes(data)
        try:
            torch_load(path, "checkpoint")
        except FileFormatError as e:
            assert "damaged.pt" in str(e) and "\n" not in str(e)
            refused += 1
    assert refused > 200


def damaged(good: bytes, rng: random.Random, count: int):
    """count copies of `good` with flipped bytes, cut short, or a run overwritten."""
    for _ in range(count):
        data = bytearray(good)
        damage = rng.randrange(3)
        if damage == 0:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif damage == 1:
            data = data[:rng.randrange(1, len(data))]
        else:
            at = rng.randrange(len(data))
            data[at:at + rng.randint(1, 40)] = rng.randbytes(rng.randint(1, 40))
        yield bytes(data)


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def npz_bytes() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, arr_0=np.arange(3 * 4 * 4 * 3, dtype=np.uint8).reshape(3, 4, 4, 3), labels=np.arange(3))
    return buf.getvalue()


# numpy raised tokenize's TokenError on a damaged header, EOFError on a cut one,
# and zipfile NotImplementedError on a damaged .npz: all reached the CLI as tracebacks.
@pytest.mark.parametrize("reader, suffix, good", [
    (data_lib._load_array, ".npy", lambda: npy_bytes(np.random.default_rng(0).standard_normal((3, 4)))),
    (lambda p: np.array(data_lib._open_npy(p)), ".npy", lambda: npy_bytes(np.arange(12.0).reshape(3, 4))),
    (lambda p: np.array(images_lib.read_npz(p)), ".npz", npz_bytes),
], ids=["data-folder-array", "latent-shard", "adm-npz"])
def test_damaged_numpy_files(tmp_path, reader, suffix, good):
    path = tmp_path / f"damaged{suffix}"
    rng = random.Random(11)
    refused = 0
    for data in [*damaged(good(), rng, 600), *(rng.randbytes(rng.randint(1, 300)) for _ in range(100))]:
        path.write_bytes(data)
        try:
            reader(str(path))
        except data_lib.DataError as e:
            assert f"damaged{suffix}" in str(e) and "\n" not in str(e)
            refused += 1
    assert refused > 300


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's notes on damaged TIFF and EXIF data
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "TIFF"])
def test_damaged_images(tmp_path, fmt):
    """A damaged BMP could claim 5e10 pixels: Pillow's DecompressionBombError."""
    Image = pytest.importorskip("PIL.Image")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, format=fmt)
    path = tmp_path / f"damaged.{fmt.lower()}"
    refused = 0
    for data in damaged(buf.getvalue(), random.Random(fmt), 300):
        path.write_bytes(data)
        for size in (None, 8):
            try:
                images_lib.read_image(str(path), size)
            except data_lib.DataError as e:
                assert path.name in str(e) and "\n" not in str(e)
                refused += 1
    assert refused > 100
