"""Reading files that others wrote without running their code.

A pickle can name any importable callable and have it called while loading, so a checkpoint,
feature cache or dataset file from somewhere else could run code. Every such file gossiplab reads
goes through here: torch files with `weights_only` (tensors, numbers, strings, lists and dicts
only), and pickled numpy arrays with an unpickler that resolves numpy's array constructors and
nothing else.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

# what a pickled numpy array needs (numpy 1 and 2 module paths), and nothing that can run code
NUMPY_PICKLE_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
}


class UnsafeFileError(ValueError):
    """A file holds pickled objects other than plain data, which could run code when loaded."""


class PlainDataFileError(ValueError):
    """A file cannot be read as the plain data it should hold (truncated, corrupt, or another kind)."""


def load_tensors(path: Path, what: str) -> Any:
    """torch.load(path, weights_only=True), refusing pickled code with a message that says why."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as error:
        raise UnsafeFileError(
            f"{path}: refusing to load this {what}: it holds pickled objects other than tensors and plain "
            "data, which could run code (gossiplab loads only tensors and plain data)"
        ) from error
    except Exception as error:  # damaged bytes fail anywhere in the unpickler: IndexError, KeyError, EOFError, ...
        reason = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
        raise PlainDataFileError(f"{path}: this {what} cannot be read ({reason})") from error


class _NumpyOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in NUMPY_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"'{module}.{name}' is not a numpy array constructor")
        return super().find_class(module, name)


def load_numpy_pickle(handle: IO[bytes], path: Path) -> np.ndarray:
    """A pickled numpy array (or list of numbers), resolving numpy's array constructors only."""
    try:
        return np.asarray(_NumpyOnly(handle).load())
    except pickle.UnpicklingError as error:
        raise UnsafeFileError(f"{path}: refusing to load it: {error} (only pickled numpy arrays are read)") from error


def plain_error(error: BaseException) -> str:
    """An error as a user reads it: an OSError's own words ('Permission denied', with the file),
    not Python's '[Errno 13] ...'; anything else as it is."""
    if isinstance(error, OSError) and error.strerror:
        return f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    return str(error)
