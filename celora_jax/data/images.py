"""Labelled images for vision-language tasks: Fashion-MNIST from its IDX files.

The default location is where Debian's ``dataset-fashion-mnist`` package puts the files
(``/usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``,
``apt-get install dataset-fashion-mnist``; setup.sh does); any directory with the same four
files (gzipped or not, e.g. the original Zalando or MNIST downloads) works.
"""

from __future__ import annotations

import dataclasses
import gzip
import pathlib

import numpy as np

from celora_jax.data.text import DataError

DEFAULT_FASHION_MNIST = pathlib.Path("/usr/share/datasets/fashion-mnist")
# Fashion-MNIST's classes, as the answers a vision-language model should give.
FASHION_MNIST_ANSWERS = ("a T-shirt", "trousers", "a pullover", "a dress", "a coat", "a sandal", "a shirt",
                         "a sneaker", "a bag", "an ankle boot")


@dataclasses.dataclass(frozen=True)
class ImageDataset:
    """Images ``[n, H, W]`` or ``[n, H, W, C]`` (uint8) with integer labels ``[n]``."""

    images: np.ndarray
    labels: np.ndarray
    label_names: tuple[str, ...]
    groups: np.ndarray | None = None

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


def read_idx(path: str | pathlib.Path) -> np.ndarray:
    """An IDX file (``.gz`` or plain) as a numpy array (the format of MNIST-style datasets)."""
    path = pathlib.Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except OSError as err:
        raise DataError(f"cannot read IDX file {path}: {err}") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * dims)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path}: header says {shape} = {int(np.prod(shape))} bytes, the file holds {body.size}")
    return body.reshape(shape)


def _find(directory: pathlib.Path, stem: str) -> pathlib.Path:
    for name in (f"{stem}.gz", stem):
        if (directory / name).is_file():
            return directory / name
    raise DataError(f"{directory} has no {stem}(.gz); install Debian's dataset-fashion-mnist "
                    "(apt-get install dataset-fashion-mnist; setup.sh does) or pass a directory with the "
                    "four IDX files")


def load_fashion_mnist(directory: str | pathlib.Path | None = None) -> ImageDataset:
    """Train and test images together (70,000 at 28 × 28); ``groups`` marks the original
    split (0 train, 1 test), which the partition may use as a source."""
    directory = DEFAULT_FASHION_MNIST if directory is None else pathlib.Path(directory)
    images, labels = [], []
    for prefix in ("train", "t10k"):
        images.append(read_idx(_find(directory, f"{prefix}-images-idx3-ubyte")))
        labels.append(read_idx(_find(directory, f"{prefix}-labels-idx1-ubyte")))
        if len(images[-1]) != len(labels[-1]):
            raise DataError(f"{directory}: {len(images[-1])} {prefix} images but {len(labels[-1])} labels")
    groups = np.concatenate([np.full(len(x), i, np.int32) for i, x in enumerate(labels)])
    labels = np.concatenate(labels).astype(np.int32)
    if labels.max() >= len(FASHION_MNIST_ANSWERS):
        raise DataError(f"{directory}: label {labels.max()} but Fashion-MNIST has 10 classes")
    return ImageDataset(np.concatenate(images), labels, FASHION_MNIST_ANSWERS, groups)
