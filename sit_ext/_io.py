"""Reading torch files safely, with errors that name the file and say what is
wrong with it in one line."""

from __future__ import annotations

import os
import pickle
import pickletools
import struct
import tokenize
import warnings
import zipfile

import torch


class FileFormatError(ValueError):
    """A file that exists but cannot be used: empty, truncated, corrupt, or
    holding more than tensors and plain values."""


def first_line(e: BaseException) -> str:
    """The exception's type and the first line of its message (which may be empty)."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


# What numpy raises on a damaged .npy or .npz: a bad header (ValueError, or
# SyntaxError and tokenize's TokenError from parsing it), missing data
# (ValueError, EOFError), a damaged archive (BadZipFile, and
# NotImplementedError for a compression method or zip version it cannot read).
NUMPY_READ_ERRORS = (ValueError, OSError, EOFError, SyntaxError, tokenize.TokenError, zipfile.BadZipFile,
                     NotImplementedError, struct.error)

_CODE_OPCODES = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE"}


class _Discard:
    def write(self, _text: str) -> None:
        pass


def _plain_pickle_runs_code(path: str) -> bool | None:
    """For a file that is not a zip archive (torch.save's format): whether its
    first pickle imports or calls anything, or None when the file does not
    start with a whole, consistent pickle (opcodes, stack and memo checked by
    pickletools.dis), so that garbage is never mistaken for a code payload."""
    try:
        with open(path, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # dis decodes string arguments, and warns on escapes in garbage
            pickletools.dis(f, out=_Discard())
            f.seek(0)
            return any(op.name in _CODE_OPCODES for op, _, _ in pickletools.genops(f))
    except Exception:  # noqa: BLE001 - pickletools raises assorted errors on bytes that are not a pickle
        return None


def _is_zip(path: str) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except zipfile.BadZipFile:  # an end record that zipfile refuses (e.g. "spans multiple disks")
        return True  # torch.load reports it below


def torch_load(path: str | os.PathLike, what: str = "file", safe_globals: tuple = ()) -> object:
    """torch.load(path, weights_only=True) on the CPU. A missing path or a
    folder raises FileNotFoundError / IsADirectoryError naming it; a file
    that cannot be read raises FileFormatError naming it; one that would run
    code when unpickled is refused, never executed."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{what} {path!r} is a folder, not a file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    with open(path, "rb"):  # one that cannot be opened (permissions) raises OSError, naming it
        pass
    if os.path.getsize(path) == 0:
        raise FileFormatError(f"{what} {path!r} is empty (0 bytes)")
    if not _is_zip(path):
        runs_code = _plain_pickle_runs_code(path)
        if runs_code is None:
            raise FileFormatError(f"{what} {path!r} is truncated or corrupt (neither a zip archive nor a pickle)")
        if runs_code:
            raise FileFormatError(f"refusing to load {what} {path!r}: it is a pickle that imports or calls "
                                  "objects, and unpickling it could run code from the file")
    try:
        with torch.serialization.safe_globals(list(safe_globals)), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols: the error below says it all
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" in str(e).lower():  # the weights-only unpickler refused a class or function
            raise FileFormatError(f"refusing to load {what} {path!r}: it holds objects other than tensors and "
                                  "plain values, and unpickling them could run code from the file") from None
        raise FileFormatError(f"{what} {path!r} is truncated or corrupt (not a pickle torch can read)") from None
    except (EOFError, zipfile.BadZipFile, IndexError, KeyError, struct.error, UnicodeDecodeError, AssertionError,
            TypeError) as e:  # what torch's loaders raise on garbage inside a file of the right format
        raise FileFormatError(f"{what} {path!r} is truncated or corrupt ({first_line(e)})") from None
    except (RuntimeError, ValueError, OSError) as e:
        raise FileFormatError(f"cannot read {what} {path!r}: {first_line(e)}") from None
