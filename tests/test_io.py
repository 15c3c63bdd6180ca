"""sit_ext._io.torch_load on damaged files: every failure is a FileFormatError
that names the file, and garbage is never reported as a code payload."""

import io
import os
import pickle
import random

import pytest
import torch

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
    good = saved(zip_format)
    path = tmp_path / "damaged.pt"
    rng = random.Random(7)
    refused = 0
    for _ in range(400):
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
        path.write_bytes(bytes(data))
        try:
            torch_load(path, "checkpoint")
        except FileFormatError as e:
            assert "damaged.pt" in str(e) and "\n" not in str(e)
            refused += 1
    assert refused > 200
