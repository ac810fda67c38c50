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

from .defaults import BUILTIN_SETS
from .errors import ConfigError, InputError

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


class DataError(InputError):
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


def fashion_mnist_splits(n_valid: int = 5000, seed: int = 0) -> tuple[Dataset, Dataset, Dataset]:
    """55K train / 5K validation (carved with ``seed``) / the 10K test set."""
    train, valid = load_fashion_mnist("train").split(n_valid, seed=seed)
    return train, valid, load_fashion_mnist("test")


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
            raise ConfigError("batch_size must be positive")
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


# --------------------------------------------------------------------------------------------------
# Data files a user brings (untrusted): safetensors, .npz (no pickles), IDX pairs


def _as_inputs(x: torch.Tensor, where: str) -> torch.Tensor:
    if x.dim() < 2 or x.shape[0] == 0:
        raise DataError(f"{where}: inputs must have a batch dimension and at least one example, got shape "
                        f"{list(x.shape)}")  # fmt: skip
    if x.dtype == torch.uint8:  # images stored as bytes
        return x.to(torch.float32).div_(255.0)
    if x.dtype == torch.bool or not (x.is_floating_point() or x.dtype in (torch.int8, torch.int16, torch.int32)):
        raise DataError(f"{where}: inputs of dtype {x.dtype} are not supported (use float32 or uint8)")
    x = x.to(torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise DataError(f"{where}: inputs hold NaN or infinite values")
    return x


def _as_targets(y: torch.Tensor, n: int, where: str) -> torch.Tensor:
    if y.dim() != 1 or y.is_floating_point() or y.dtype == torch.bool:
        raise DataError(f"{where}: targets must be a 1-D integer array of class indices, got {y.dtype} "
                        f"{list(y.shape)}")  # fmt: skip
    if len(y) != n:
        raise DataError(f"{where}: {n} inputs but {len(y)} targets")
    y = y.to(torch.int64)
    if len(y) and int(y.min()) < 0:
        raise DataError(f"{where}: targets must be non-negative class indices")
    return y


def _from_arrays(arrays: dict[str, torch.Tensor], where: str) -> Dataset:
    extra = sorted(set(arrays) - {"inputs", "targets"})
    if "inputs" not in arrays or extra:
        raise DataError(
            f"{where}: expected arrays 'inputs' and optionally 'targets'"
            + (f"; found {', '.join(sorted(arrays)) or 'none'}" if arrays else "")
        )
    x = _as_inputs(arrays["inputs"], where)
    y = _as_targets(arrays["targets"], len(x), where) if "targets" in arrays else None
    return Dataset(x, y)


def load_data_file(
    path: str | os.PathLike[str], targets_path: str | os.PathLike[str] | None = None, *, max_bytes: int | None = None
) -> Dataset:
    """Read a user's data file, judged by content: safetensors or .npz with ``inputs`` and optional
    ``targets``, or an IDX file of inputs (plus ``targets_path``, an IDX file of labels).

    .npz files are opened with ``allow_pickle=False`` after their archive listing is checked; an
    object array is refused. uint8 inputs are scaled to [0, 1]. Raises :class:`DataError` or an
    :class:`~dns_core.uploads.UploadError`; never anything that runs code.
    """
    import numpy as np

    from . import uploads
    from .io import read_safetensors

    cap = uploads.MAX_FILE_BYTES if max_bytes is None else max_bytes
    p = Path(path)
    kind = uploads.sniff(p, max_bytes=cap).kind
    if targets_path is not None and kind != "idx":
        raise DataError(f"{p.name}: a separate targets file goes with IDX inputs only")
    if kind == "safetensors":
        uploads.validate_safetensors(p, max_bytes=cap)
        _, arrays = read_safetensors(p, DataError)
        return _from_arrays(arrays, p.name)
    if kind == "npz":
        uploads.check_archive(p)
        tensors: dict[str, torch.Tensor] = {}
        try:
            with np.load(p, allow_pickle=False) as npz:
                for key in npz.files:
                    tensors[key] = torch.from_numpy(np.ascontiguousarray(npz[key]))
        except ValueError as e:
            if "allow_pickle" in str(e):
                raise DataError(
                    f"{p.name}: holds object arrays, which would need pickle; store numeric arrays"
                ) from None
            raise DataError(f"{p.name}: not a readable .npz ({e})") from None
        except Exception as e:  # a damaged member fails deep in zipfile/zlib/numpy with many error types
            raise DataError(f"{p.name}: not a readable .npz ({type(e).__name__}: {e})") from None
        return _from_arrays(tensors, p.name)
    if kind == "idx":
        x = _as_inputs(read_idx(p), p.name)
        y = None
        if targets_path is not None:
            tp = Path(targets_path)
            if uploads.sniff(tp, max_bytes=cap).kind != "idx":
                raise DataError(f"{tp.name}: the targets of IDX inputs must be an IDX file too")
            y = _as_targets(read_idx(tp), len(x), tp.name)
        if x.dim() == 3:  # N×H×W images: add the channel dimension convolutions expect
            x = x.unsqueeze(1)
        return Dataset(x, y)
    raise DataError(f"{p.name}: a {kind} file is a model, not data; upload .npz, safetensors or IDX data")


def load_builtin(name: str) -> tuple[Dataset, Dataset, Dataset | None]:
    """A built-in set by name: (train, validation, test or None)."""
    if name == "fashion-mnist":
        return fashion_mnist_splits()
    if name == "digits":
        train, valid = load_digits()
        return train, valid, None
    raise DataError(f"unknown built-in data set {name!r}; built-in sets: {', '.join(BUILTIN_SETS)}")


def validation_split(
    data: Dataset, valid: Dataset | None = None, *, fraction: float = 0.1, seed: int = 0
) -> tuple[Dataset, Dataset]:
    """(train, validation): ``valid`` when given, else a seeded carve of ``fraction`` of ``data``."""
    if valid is not None:
        if (data.targets is None) != (valid.targets is None):
            raise DataError("training and validation data must both have targets or both have none")
        if data.inputs.shape[1:] != valid.inputs.shape[1:]:
            raise DataError(f"validation inputs {list(valid.inputs.shape[1:])} differ from training inputs "
                            f"{list(data.inputs.shape[1:])}")  # fmt: skip
        return data, valid
    if not 0 < fraction < 1:
        raise DataError(f"validation fraction {fraction} must be between 0 and 1")
    if len(data) < 2:
        raise DataError(f"{len(data)} example(s): too few to carve a validation set")
    return data.split(max(1, min(len(data) - 1, round(len(data) * fraction))), seed=seed)


def check_fits(model: torch.nn.Module, data: Dataset) -> int:
    """Check, before a job starts, that ``model`` accepts ``data``'s inputs and that its targets are
    within the model's outputs; return the number of outputs (classes)."""
    sample = data.inputs[:2].to(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(sample)
    except Exception as e:  # shape mismatches surface as RuntimeError/ValueError from deep inside torch
        raise DataError(
            f"inputs of shape {list(data.inputs.shape[1:])} (per example) do not fit the model: {e}"
        ) from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != len(sample):
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise DataError(f"the model's output {shape} is not one row of class scores per example")
    classes = int(out.shape[1])
    if data.targets is not None and len(data.targets) and int(data.targets.max()) >= classes:
        raise DataError(f"targets go up to {int(data.targets.max())} but the model has {classes} outputs")
    return classes
