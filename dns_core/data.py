"""Data sets as in-memory tensors and a resumable, deterministic batch stream.

MNIST-sized data fits in memory many times over; indexing a tensor is an order of magnitude faster
than a ``DataLoader`` with workers on two cores, and a stream whose batch ``t`` is a pure function
of ``(seed, t)`` makes a resumed run see exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .defaults import BUILTIN_SETS
from .errors import ConfigError, InputError

if TYPE_CHECKING:
    from .inputs import ModelInput

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


#: Built-in data adapted to a model (:func:`adapt_builtin`) is cut to this many bytes of inputs in all
#: (train, validation and test together): 60,000 Fashion-MNIST images at 3×224×224 would take 36 GB.
BUILTIN_MAX_BYTES = 2 * 1024**3


@dataclass
class Dataset:
    """Inputs and optional integer class targets, held in memory.

    ``inputs`` is float (images N×C×H×W, features N×F, ...) or, for token sequences, int64 of
    shape N×2×L: the token ids and the attention mask stacked (see :attr:`is_tokens`).
    """

    inputs: torch.Tensor
    targets: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.targets is not None and len(self.targets) != len(self.inputs):
            raise DataError(f"{len(self.inputs)} inputs but {len(self.targets)} targets")

    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def is_tokens(self) -> bool:
        """Token sequences: int64 inputs N×2×L, ``inputs[:, 0]`` the ids and ``inputs[:, 1]`` the mask."""
        return self.inputs.dtype == torch.int64 and self.inputs.dim() == 3 and self.inputs.shape[1] == 2

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
    raw = load_fashion_mnist_raw(split, root)
    return Dataset(raw.inputs.sub_(FASHION_MEAN).div_(FASHION_STD), raw.targets)


def load_fashion_mnist_raw(split: str = "train", root: str | os.PathLike[str] | None = None) -> Dataset:
    """Fashion-MNIST as N×1×28×28 float values in [0, 1] (not normalised), with int64 targets."""
    base = Path(root) if root is not None else fashion_mnist_dir()
    if split not in ("train", "test"):
        raise DataError(f"unknown Fashion-MNIST split {split!r}; choose train or test")
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
    x = read_idx(images).to(torch.float32).div_(255.0)
    return Dataset(x.unsqueeze(1), read_idx(labels).to(torch.int64))


def fashion_mnist_splits(n_valid: int = 5000, seed: int = 0) -> tuple[Dataset, Dataset, Dataset]:
    """55K train / 5K validation (carved with ``seed``) / the 10K test set."""
    train, valid = load_fashion_mnist("train").split(n_valid, seed=seed)
    return train, valid, load_fashion_mnist("test")


def load_digits() -> tuple[Dataset, Dataset]:
    """scikit-learn's 8x8 digits (1,797 images), padded to 1×28×28 and split 1,497 / 300."""
    raw = _load_digits_raw()
    x = (raw.inputs - raw.inputs.mean()) / raw.inputs.std()
    return Dataset(x, raw.targets).split(300, seed=0)


def _load_digits_raw() -> Dataset:
    """The digits as 1×28×28 values in [0, 1] (bilinear upsampling of 0..16 counts)."""
    try:
        from sklearn.datasets import load_digits as _load  # optional dependency
    except ImportError:
        raise DataError("the digits set needs scikit-learn, which is not installed here; use fashion-mnist") from None

    bunch = _load()
    x = torch.tensor(bunch.images, dtype=torch.float32) / 16.0
    x = torch.nn.functional.interpolate(x.unsqueeze(1), size=(28, 28), mode="bilinear", align_corners=False)
    return Dataset(x, torch.tensor(bunch.target, dtype=torch.int64))


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
        raise DataError(f"{where}: inputs of dtype {x.dtype} are not supported (use float32 or uint8; "
                        "store token sequences as input_ids)")  # fmt: skip
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


_TOKEN_KEYS = ("input_ids", "attention_mask", "labels", "targets")


def _int_array(x: torch.Tensor, name: str, where: str) -> torch.Tensor:
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise DataError(f"{where}: {name} must be an integer array, got {x.dtype}")
    return x.to(torch.int64)


def _tokens_from_arrays(arrays: dict[str, torch.Tensor], where: str) -> Dataset:
    """``input_ids`` (N, L), optional ``attention_mask`` (N, L) of 0/1, ``labels`` or ``targets`` (N,)."""
    extra = sorted(set(arrays) - set(_TOKEN_KEYS))
    if extra:
        raise DataError(f"{where}: token data holds input_ids, optionally attention_mask, and labels or targets; "
                        f"found also {', '.join(extra)}")  # fmt: skip
    if "labels" in arrays and "targets" in arrays:
        raise DataError(f"{where}: give the classes as labels or as targets, not both")
    ids = _int_array(arrays["input_ids"], "input_ids", where)
    if ids.dim() != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise DataError(f"{where}: input_ids must be (examples, sequence length) with neither empty, "
                        f"got shape {list(ids.shape)}")  # fmt: skip
    if int(ids.min()) < 0:
        raise DataError(f"{where}: input_ids must be non-negative token ids (found {int(ids.min())})")
    if "attention_mask" in arrays:
        mask_in = arrays["attention_mask"]
        mask = mask_in.to(torch.int64) if mask_in.dtype == torch.bool else _int_array(mask_in, "attention_mask", where)
        if mask.shape != ids.shape:
            raise DataError(f"{where}: attention_mask has shape {list(mask.shape)}, input_ids {list(ids.shape)}; "
                            "they must agree")  # fmt: skip
        if bool(((mask != 0) & (mask != 1)).any()):
            raise DataError(f"{where}: attention_mask must hold only 0 and 1")
        empty = (mask.sum(1) == 0).nonzero()
        if len(empty):
            raise DataError(f"{where}: {len(empty)} sequence(s) have no token in their attention_mask "
                            f"(the first: example {int(empty[0])}); every sequence needs at least one")  # fmt: skip
    else:
        mask = torch.ones_like(ids)
    label_key = "labels" if "labels" in arrays else "targets"
    y = _as_targets(arrays[label_key], len(ids), f"{where} ({label_key})") if label_key in arrays else None
    return Dataset(torch.stack([ids, mask], dim=1).contiguous(), y)


def _from_arrays(arrays: dict[str, torch.Tensor], where: str) -> Dataset:
    if "input_ids" in arrays:
        return _tokens_from_arrays(arrays, where)
    extra = sorted(set(arrays) - {"inputs", "targets"})
    if "inputs" not in arrays or extra:
        raise DataError(
            f"{where}: expected arrays 'inputs' and optionally 'targets' (or, for token data, 'input_ids', "
            "optionally 'attention_mask', and 'labels' or 'targets')"
            + (f"; found {', '.join(sorted(arrays)) or 'none'}" if arrays else "")
        )
    x = _as_inputs(arrays["inputs"], where)
    y = _as_targets(arrays["targets"], len(x), where) if "targets" in arrays else None
    return Dataset(x, y)


def load_data_file(
    path: str | os.PathLike[str], targets_path: str | os.PathLike[str] | None = None, *, max_bytes: int | None = None
) -> Dataset:
    """Read a user's data file, judged by content: safetensors or .npz with ``inputs`` and optional
    ``targets`` (or token data: ``input_ids``, optional ``attention_mask``, ``labels`` or
    ``targets``), an IDX file of inputs (plus ``targets_path``, an IDX file of labels), or a zip or
    tar archive of class folders of PNG/JPEG images (:func:`dns_core.images.load_image_folder`).

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
    if kind in ("zip", "tar"):
        return load_image_folder(p, max_expanded=cap)[0]
    raise DataError(f"{p.name}: a {kind} file is a model, not data; upload .npz, safetensors or IDX data")


def load_image_folder(
    path: str | os.PathLike[str],
    *,
    max_pixels_per_image: int | None = None,
    max_total_pixels: int | None = None,
    size: int | tuple[int, int] | None = None,
    max_expanded: int | None = None,
) -> tuple[Dataset, list[str]]:
    """A zip or tar archive (or a folder) of class folders of PNG/JPEG images as (Dataset of N×3×H×W
    floats in [0, 1] with the class indices as targets, the class names in index order).
    An archive that is not laid out as class folders of images raises DataError; a hostile archive,
    an image that cannot be decoded or one past the pixel caps an UploadError.

    See :mod:`dns_core.images` for the layout, what is skipped and refused, and the caps (left at
    None: :data:`~dns_core.images.MAX_PIXELS_PER_IMAGE`, :data:`~dns_core.images.MAX_TOTAL_PIXELS`,
    the archive's :data:`~dns_core.uploads.MAX_EXPANDED_BYTES`); ``size``: the output's side (int) or
    (height, width), by default the most common image size.
    """
    from . import images

    caps: dict[str, int] = {}
    if max_pixels_per_image is not None:
        caps["max_pixels_per_image"] = max_pixels_per_image
    if max_total_pixels is not None:
        caps["max_total_pixels"] = max_total_pixels
    if max_expanded is not None:
        caps["max_expanded"] = max_expanded
    try:
        x, y, classes = images.read_image_folder(path, size=size, **caps)
    except images.FolderLayoutError as e:
        raise DataError(str(e)) from None
    return Dataset(x, y), classes


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


def _vocab_size(model: torch.nn.Module, model_input: ModelInput | None) -> int | None:
    if model_input is not None and model_input.vocab_size is not None:
        return model_input.vocab_size
    for module in model.modules():  # the first embedding is the token embedding in every text classifier
        if isinstance(module, torch.nn.Embedding):
            return int(module.num_embeddings)
    return None


def check_fits(model: torch.nn.Module, data: Dataset, model_input: ModelInput | None = None) -> int:
    """Check, before a job starts, that ``model`` accepts ``data``'s inputs and that its targets are
    within the model's outputs; return the number of outputs (classes).

    With ``model_input`` (what the model takes), data of another kind is refused by name; token ids
    are checked against the vocabulary (``model_input.vocab_size``, else the model's first
    embedding) over the whole data set, not only the two examples tried.
    """
    if model_input is not None:
        kind = "tokens" if data.is_tokens else "image" if data.inputs.dim() == 4 else "features"
        if (model_input.kind == "tokens") != (kind == "tokens"):
            dims = "×".join(str(d) for d in model_input.shape)
            raise DataError(f"the model takes {model_input.kind} ({dims}) but the data is "
                            f"{'token sequences' if kind == 'tokens' else 'not token sequences'}")  # fmt: skip
    if data.is_tokens:
        vocab = _vocab_size(model, model_input)
        top = int(data.inputs[:, 0].max()) if len(data) else 0
        if vocab is not None and top >= vocab:
            raise DataError(f"token ids go up to {top} but the model's vocabulary has {vocab} entries")
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


# --------------------------------------------------------------------------------------------------
# The built-in sets made to fit any model: other image sizes and channels, token sequences, features

_CHUNK_ELEMENTS = 16 * 1024 * 1024  # values resized at a time (64 MB of floats): bounds the intermediate tensors


def _check_unit_range(x: torch.Tensor, what: str) -> None:
    if x.is_floating_point() and len(x) and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
        raise DataError(f"{what} expects image values in [0, 1]; this data holds values from "
                        f"{float(x.min()):.3g} to {float(x.max()):.3g} (already normalised?)")  # fmt: skip


def _per_channel(values: Sequence[float] | None, channels: int, what: str) -> torch.Tensor | None:
    if values is None:
        return None
    v = [float(x) for x in values]
    if len(v) == 1:
        v = v * channels
    if len(v) != channels:
        raise DataError(f"{what} has {len(v)} values for {channels} channels")
    if not all(math.isfinite(x) for x in v) or (what == "std" and min(v) <= 0):
        raise DataError(f"{what} must be finite{' and positive' if what == 'std' else ''}, got {v}")
    return torch.tensor(v, dtype=torch.float32).view(1, channels, 1, 1)


def adapt_images(
    ds: Dataset,
    channels: int,
    height: int,
    width: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Dataset:
    """Images in [0, 1] (N×C×H×W) resized to ``height``×``width`` (bilinear, antialiased when
    shrinking), their channels converted (grey replicated, RGB to grey by luminance, alpha dropped)
    and, with ``mean``/``std`` (one value, or one per channel), normalised. Works in chunks into
    one output tensor, so the memory is the output's plus a chunk's."""
    from .images import convert_channels

    x = ds.inputs
    if x.dim() != 4 or not x.is_floating_point():
        raise DataError(f"adapting images needs float N×C×H×W inputs, got {x.dtype} {list(x.shape)}")
    if min(channels, height, width) < 1:
        raise DataError(f"cannot adapt images to {channels}×{height}×{width}")
    m, sd = _per_channel(mean, channels, "mean"), _per_channel(std, channels, "std")
    out = torch.empty((len(x), channels, height, width), dtype=torch.float32)
    step = max(1, _CHUNK_ELEMENTS // (max(channels, x.shape[1]) * max(height * width, x.shape[2] * x.shape[3])))
    for i in range(0, len(x), step):
        chunk = convert_channels(x[i : i + step].to(torch.float32), channels)
        if chunk.shape[-2:] != (height, width):
            shrink = height < chunk.shape[-2] or width < chunk.shape[-1]
            chunk = torch.nn.functional.interpolate(
                chunk, size=(height, width), mode="bilinear", align_corners=False, antialias=shrink
            ).clamp_(0.0, 1.0)
        if m is not None:
            chunk = chunk - m
        if sd is not None:
            chunk = chunk / sd
        out[i : i + step] = chunk
    return Dataset(out, ds.targets)


def token_grid(seq_len: int) -> tuple[int, int]:
    """The height×width an image is resized to so that it becomes ``seq_len`` tokens (row by row):
    the most square factorisation of ``seq_len`` with sides at most 2:1 apart (16 -> 4×4, 128 -> 8×16),
    else the largest square that fits (the rest is padding, masked out)."""
    for h in range(math.isqrt(seq_len), 0, -1):
        if seq_len % h == 0:
            w = seq_len // h
            if w <= 2 * h:
                return h, w
            break
    side = math.isqrt(seq_len)
    return side, side


def tokens_from_images(ds: Dataset, seq_len: int, vocab_size: int) -> Dataset:
    """Images in [0, 1] as token sequences: each image is made grey, resized to :func:`token_grid`
    and read row by row; a pixel's intensity binned into ``min(vocab_size - 1, 256)`` levels becomes
    token id 1 + level, so that id 0 stays free for padding. Returns int64 N×2×``seq_len`` (ids,
    attention mask: ones, zeros on padding)."""
    if seq_len < 1:
        raise DataError(f"sequence length {seq_len} must be positive")
    if vocab_size < 3:
        raise DataError(f"a vocabulary of {vocab_size} tokens is too small to encode images (at least 3)")
    x = ds.inputs
    if x.dim() != 4 or not x.is_floating_point():
        raise DataError(f"token sequences are made from float N×C×H×W images, got {x.dtype} {list(x.shape)}")
    _check_unit_range(x, "turning images into tokens")
    h, w = token_grid(seq_len)
    bins = min(vocab_size - 1, 256)
    out = torch.zeros((len(x), 2, seq_len), dtype=torch.int64)
    grey = adapt_images(Dataset(x), 1, h, w).inputs.flatten(1)  # N×(h·w): no larger than the output
    out[:, 0, : h * w] = (grey * bins).long().clamp_(0, bins - 1) + 1
    out[:, 1, : h * w] = 1
    return Dataset(out, ds.targets)


def _raw_builtin(name: str) -> tuple[Dataset, Dataset, Dataset | None, float, float]:
    """(train, valid, test or None, mean, std) of a built-in set in [0, 1], split as :func:`load_builtin`."""
    if name == "fashion-mnist":
        train, valid = load_fashion_mnist_raw("train").split(5000, seed=0)
        return train, valid, load_fashion_mnist_raw("test"), FASHION_MEAN, FASHION_STD
    if name == "digits":
        raw = _load_digits_raw()
        mean, std = float(raw.inputs.mean()), float(raw.inputs.std())
        train, valid = raw.split(300, seed=0)
        return train, valid, None, mean, std
    raise DataError(f"unknown built-in data set {name!r}; built-in sets: {', '.join(BUILTIN_SETS)}")


def _cut_splits(
    splits: tuple[Dataset, Dataset, Dataset | None], per_example: int, max_examples: int | None, max_bytes: int
) -> tuple[Dataset, Dataset, Dataset | None]:
    """The three splits cut in proportion so that their inputs fit ``max_bytes`` and the training split
    ``max_examples``; seeded subsets, the same on every run."""
    train, valid, test = splits
    total = len(train) + len(valid) + (len(test) if test is not None else 0)
    fraction = min(1.0, max_bytes / (per_example * total))
    if max_examples is not None:
        fraction = min(fraction, max_examples / len(train))
    if fraction >= 1.0:
        return train, valid, test

    def cut(ds: Dataset) -> Dataset:
        n = max(1, int(len(ds) * fraction))
        perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n]
        return ds.subset(perm.sort().values)

    return cut(train), cut(valid), None if test is None else cut(test)


def _input_shape(name: str, model_input: ModelInput) -> tuple[int, ...]:
    kind, shape = model_input.kind, tuple(int(d) for d in model_input.shape)
    if kind == "image" and len(shape) != 3:
        raise DataError(f"an image input must be channels×height×width, got {list(shape)}")
    if kind in ("tokens", "features") and len(shape) != 1:
        raise DataError(f"a {kind} input must have one dimension, got {list(shape)}")
    if kind not in ("image", "tokens", "features") or not shape or min(shape) < 1:
        raise DataError(f"cannot adapt {name} to a {kind} input of shape {list(shape)}")
    if kind == "tokens" and model_input.vocab_size is None:
        raise DataError(f"the model takes token sequences but its vocabulary size is unknown; "
                        f"upload token data (input_ids) instead of using {name}")  # fmt: skip
    if kind == "features" and math.isqrt(shape[0]) ** 2 != shape[0]:
        raise DataError(f"the model takes {shape[0]} features, not a square number of pixels; "
                        f"{name} (images) cannot be made to fit it: upload your own data")  # fmt: skip
    return shape


def adapt_builtin(
    name: str,
    model_input: ModelInput | None,
    *,
    max_examples: int | None = None,
    max_bytes: int = BUILTIN_MAX_BYTES,
) -> tuple[Dataset, Dataset, Dataset | None]:
    """A built-in set (train, validation, test or None) made to fit what a model takes.

    - ``None``, or an image input of 1×28×28: :func:`load_builtin` (normalised as ever).
    - another image input C×H×W: :func:`adapt_images`, normalised with the model's mean/std when it
      has them, else with the set's own statistics (the same value for every channel).
    - token sequences of length L: :func:`tokens_from_images` with the model's ``vocab_size``.
    - features of size F: the images made s×s = F grey pixels and flattened, normalised with the
      set's statistics; DataError when F is not a square.

    The inputs of the three splits together are kept under ``max_bytes`` (default
    :data:`BUILTIN_MAX_BYTES`: about 3,500 examples at 3×224×224, all 70,000 at 3×32×32), and the
    training split under ``max_examples``: the splits are cut in proportion, to seeded subsets.
    """
    if model_input is None or (model_input.kind == "image" and tuple(model_input.shape) == (1, 28, 28)):
        return _cut_splits(load_builtin(name), 28 * 28 * 4, max_examples, max_bytes)
    shape = _input_shape(name, model_input)
    per_example = 2 * shape[0] * 8 if model_input.kind == "tokens" else math.prod(shape) * 4
    train, valid, test, mean, std = _raw_builtin(name)
    splits = _cut_splits((train, valid, test), per_example, max_examples, max_bytes)

    def adapt(ds: Dataset) -> Dataset:
        if model_input.kind == "image":
            m = model_input.mean if model_input.mean is not None else (mean,)
            s = model_input.std if model_input.std is not None else (std,)
            return adapt_images(ds, shape[0], shape[1], shape[2], m, s)
        if model_input.kind == "tokens":
            assert model_input.vocab_size is not None
            return tokens_from_images(ds, shape[0], model_input.vocab_size)
        side = math.isqrt(shape[0])
        return Dataset(adapt_images(ds, 1, side, side, (mean,), (std,)).inputs.flatten(1), ds.targets)

    return adapt(splits[0]), adapt(splits[1]), None if splits[2] is None else adapt(splits[2])
