"""Data sets as in-memory tensors and a resumable, deterministic batch stream.

MNIST-sized data fits in memory many times over; indexing a tensor is an order of magnitude faster
than a ``DataLoader`` with workers on two cores, and a stream whose batch ``t`` is a pure function
of ``(seed, t)`` makes a resumed run see exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_ENV = "NETSURGERY_FASHION_MNIST"
#: Per-pixel mean and std of the Fashion-MNIST training images (after scaling to [0, 1]).
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530

_IDX_DTYPES = {
    0x08: torch.uint8,
    0x09: torch.int8,
    0x0B: torch.int16,
    0x0C: torch.int32,
    0x0D: torch.float32,
    0x0E: torch.float64,
}


class DataError(ValueError):
    """A data file or data set cannot be used; the message says why."""


@dataclass
class Dataset:
    """Inputs and optional integer class targets, held in memory."""

    inputs: torch.Tensor
    targets: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.targets is not None and len(self.targets) != len(self.inputs):
            raise DataError(f"{len(self.inputs)} inputs but {len(self.targets)} targets")

    def __len__(self) -> int:
        return len(self.inputs)

    def split(self, n_valid: int, seed: int = 0) -> tuple[Dataset, Dataset]:
        """Carve a validation set of ``n_valid`` examples with a seeded permutation."""
        if not 0 < n_valid < len(self):
            raise DataError(f"validation size {n_valid} must be between 1 and {len(self) - 1}")
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        valid, train = perm[:n_valid], perm[n_valid:]
        return self.subset(train), self.subset(valid)

    def subset(self, index: torch.Tensor) -> Dataset:
        return Dataset(self.inputs[index], None if self.targets is None else self.targets[index])


def read_idx(path: str | os.PathLike[str]) -> torch.Tensor:
    """Read an IDX file (the MNIST format), gzip-compressed or plain."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic)")
    dtype = _IDX_DTYPES.get(raw[2])
    if dtype is None:
        raise DataError(f"{path}: unknown IDX element type 0x{raw[2]:02x}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(">" + "I" * ndim, raw[4:header])
    itemsize = torch.empty(0, dtype=dtype).element_size()
    count = 1
    for s in shape:
        count *= s
    if len(raw) - header != count * itemsize:
        raise DataError(f"{path}: header announces {count} elements, file holds {(len(raw) - header) // itemsize}")
    data = torch.frombuffer(bytearray(raw[header:]), dtype=dtype)
    if itemsize > 1:  # IDX is big-endian
        data = torch.from_numpy(data.numpy().byteswap())
    return data.reshape(shape)


def fashion_mnist_dir() -> Path:
    return Path(os.environ.get(FASHION_MNIST_ENV, FASHION_MNIST_DIR))


def load_fashion_mnist(split: str = "train", root: str | os.PathLike[str] | None = None) -> Dataset:
    """Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (normalised, N×1×28×28)."""
    base = Path(root) if root is not None else fashion_mnist_dir()
    prefix = {"train": "train", "test": "t10k"}[split]
    images, labels = base / f"{prefix}-images-idx3-ubyte.gz", base / f"{prefix}-labels-idx1-ubyte.gz"
    if not images.exists():
        images, labels = images.with_suffix(""), labels.with_suffix("")
    if not images.exists():
        raise DataError(
            f"Fashion-MNIST not found under {base}. Install it with "
            f"`sudo apt-get install dataset-fashion-mnist`, or point {FASHION_MNIST_ENV} at a folder "
            "holding the four IDX files."
        )
    x = read_idx(images).to(torch.float32).div_(255.0).sub_(FASHION_MEAN).div_(FASHION_STD)
    return Dataset(x.unsqueeze(1), read_idx(labels).to(torch.int64))


def load_digits() -> tuple[Dataset, Dataset]:
    """scikit-learn's 8x8 digits (1,797 images), padded to 1×28×28 and split 1,497 / 300."""
    from sklearn.datasets import load_digits as _load  # optional dependency, tests only

    bunch = _load()
    x = torch.tensor(bunch.images, dtype=torch.float32) / 16.0
    x = torch.nn.functional.interpolate(x.unsqueeze(1), size=(28, 28), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    return Dataset(x, torch.tensor(bunch.target, dtype=torch.int64)).split(300, seed=0)


def synthetic_classification(
    n: int = 512, shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10, seed: int = 0
) -> Dataset:
    """A learnable synthetic task: class = argmax of a fixed random linear map of the input."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *shape), generator=g)
    w = torch.randn((x[0].numel(), num_classes), generator=g)
    return Dataset(x, (x.flatten(1) @ w).argmax(1))


class BatchStream:
    """Deterministic shuffled mini-batches: batch ``t`` depends only on ``(seed, t)``.

    Each epoch draws a fresh permutation from ``seed + epoch``; a resumed run asks for the same
    ``t`` and gets the same examples.
    """

    def __init__(self, data: Dataset, batch_size: int, seed: int = 0, device: torch.device | str = "cpu") -> None:
        if batch_size <= 0:
            raise ValueError("batch_size must be positive")
        self.inputs = data.inputs.to(device)
        self.targets = None if data.targets is None else data.targets.to(device)
        self.batch_size = min(batch_size, len(data))
        self.per_epoch = len(data) // self.batch_size
        self.seed = seed
        self._epoch = -1
        self._perm = torch.empty(0, dtype=torch.int64)

    def batch(self, t: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        epoch, pos = divmod(t, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(len(self.inputs), generator=g).to(self.inputs.device)
            self._epoch = epoch
        idx = self._perm[pos * self.batch_size : (pos + 1) * self.batch_size]
        return self.inputs[idx], None if self.targets is None else self.targets[idx]
