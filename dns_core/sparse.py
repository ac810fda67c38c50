"""A compact file for pruned weights: only the kept values plus a small index.

The file is plain safetensors (no code runs on load) holding a few flat arrays: ``values.<dtype>``
(the stored entries of every tensor of that dtype, one after another) and ``index`` (uint8, every
tensor's index, one after another). Each tensor is stored in the cheapest of three encodings,
chosen per tensor by exact byte count:

- ``dense``: all its entries in row-major order, no index;
- ``bitmap``: its non-zero entries, and one bit per entry (``numpy.packbits`` order);
- ``gaps``: its non-zero entries, and relative positions as in Deep Compression: starting before
  the first entry, a byte b in 1..255 moves b entries forward to the next kept value; the byte 0
  moves 255 entries forward without a value (an escape for long runs of zeros).

The header metadata ``netsurgery.sparse`` holds ``{"version": 1, "tensors": {name: {"encoding",
"shape", "dtype", "values": [start, count], "index": [start, length]}}}``; docs/sparse-format.md
describes the layout for readers without this package.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from .io import read_safetensors

FORMAT_VERSION = 1
META_KEY = "netsurgery.sparse"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8,
           "int8": torch.int8, "bool": torch.bool}  # fmt: skip
_NAMES = {v: k for k, v in _DTYPES.items()}


class SparseFormatError(ValueError):
    """A sparse weights file that is malformed or inconsistent."""


@dataclass(frozen=True)
class PackStats:
    """Byte accounting of one packed file."""

    file_bytes: int
    kept: int  # non-zero entries of the tensors stored sparse
    dense_bytes: int  # bytes of the tensors stored dense
    value_bytes: int  # kept × itemsize of the sparse tensors

    @property
    def overhead(self) -> float:
        """File bytes over (kept values + dense remainder): 1.0 would be a free index."""
        return self.file_bytes / max(self.value_bytes + self.dense_bytes, 1)


def encode_gaps(positions: torch.Tensor) -> torch.Tensor:
    """uint8 relative positions (with 0 as a 255-step escape) of sorted flat indices."""
    if positions.numel() == 0:
        return torch.zeros(0, dtype=torch.uint8)
    gaps = torch.diff(positions, prepend=torch.tensor([-1], dtype=positions.dtype))
    escapes = (gaps - 1) // 255
    ends = torch.cumsum(escapes + 1, 0) - 1
    out = torch.zeros(int(ends[-1]) + 1, dtype=torch.uint8)
    out[ends] = (gaps - 255 * escapes).to(torch.uint8)
    return out


def decode_gaps(stream: torch.Tensor) -> torch.Tensor:
    """Flat indices from :func:`encode_gaps` output."""
    steps = torch.where(stream == 0, 255, stream.to(torch.int64))
    return (torch.cumsum(steps, 0) - 1)[stream != 0]


def _encode(t: torch.Tensor) -> tuple[str, torch.Tensor, torch.Tensor]:
    """(encoding, values, index) for ``t``; the cheapest by bytes (index is empty for dense)."""
    flat = t.detach().contiguous().cpu().flatten()
    nz = torch.nonzero(flat).flatten()
    values = flat[nz].contiguous()
    bitmap = torch.from_numpy(np.packbits((flat != 0).numpy()))
    gaps = encode_gaps(nz)
    none = torch.zeros(0, dtype=torch.uint8)
    options = [
        (flat.numel() * flat.element_size(), "dense", flat, none),
        (values.numel() * values.element_size() + bitmap.numel(), "bitmap", values, bitmap),
        (values.numel() * values.element_size() + gaps.numel(), "gaps", values, gaps),
    ]
    _, encoding, vals, index = min(options, key=lambda o: o[0])
    return encoding, vals, index


def save_sparse(
    path: str | os.PathLike[str], state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> PackStats:
    """Write ``state`` (e.g. a squashed model's state dict) in the sparse layout."""
    values: dict[str, list[torch.Tensor]] = {}
    value_len: dict[str, int] = {}
    index: list[torch.Tensor] = []
    index_len = 0
    manifest: dict[str, Any] = {}
    kept = dense_bytes = value_bytes = 0
    for name, t in state.items():
        if t.dtype not in _NAMES:
            raise SparseFormatError(f"{name}: dtype {t.dtype} is not supported")
        dtype = _NAMES[t.dtype]
        encoding, vals, idx = _encode(t)
        start = value_len.get(dtype, 0)
        values.setdefault(dtype, []).append(vals)
        value_len[dtype] = start + vals.numel()
        manifest[name] = {"encoding": encoding, "shape": list(t.shape), "dtype": dtype,
                          "values": [start, vals.numel()], "index": [index_len, idx.numel()]}  # fmt: skip
        index.append(idx)
        index_len += idx.numel()
        if encoding == "dense":
            dense_bytes += t.numel() * t.element_size()
        else:
            kept += vals.numel()
            value_bytes += vals.numel() * t.element_size()
    tensors = {f"values.{dtype}": torch.cat(group) for dtype, group in values.items()}
    tensors["index"] = torch.cat(index) if index else torch.zeros(0, dtype=torch.uint8)
    meta = dict(metadata or {})
    meta[META_KEY] = json.dumps({"version": FORMAT_VERSION, "tensors": manifest}, separators=(",", ":"))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return PackStats(os.path.getsize(path), kept, dense_bytes, value_bytes)


def load_sparse(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Rebuild the dense state dict from a file written by :func:`save_sparse`."""
    meta, stored = read_safetensors(path, SparseFormatError)
    try:
        manifest = json.loads(meta[META_KEY])
        if manifest["version"] != FORMAT_VERSION:
            raise SparseFormatError(f"{path}: sparse format version {manifest['version']} is not supported")
        entries = manifest["tensors"].items()
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError):
        raise SparseFormatError(f"{path}: no valid {META_KEY} manifest in the header") from None
    return {name: _decode(name, spec, stored) for name, spec in entries}


def _slice(t: torch.Tensor, span: Any, what: str) -> torch.Tensor:
    start, count = int(span[0]), int(span[1])
    if start < 0 or count < 0 or start + count > t.numel():
        raise SparseFormatError(f"{what}: span [{start}, {count}] outside the stored {t.numel()} entries")
    return t[start : start + count]


def _decode(name: str, spec: Any, stored: dict[str, torch.Tensor]) -> torch.Tensor:
    try:
        encoding, dtype_name = spec["encoding"], spec["dtype"]
        shape = [int(s) for s in spec["shape"]]
        dtype = _DTYPES[dtype_name]
        values = _slice(_part(stored, f"values.{dtype_name}", dtype), spec["values"], name)
        index = _slice(_part(stored, "index", torch.uint8), spec["index"], name)
    except SparseFormatError:
        raise
    except (KeyError, TypeError, ValueError, IndexError):
        raise SparseFormatError(f"{name}: bad manifest entry {spec!r}") from None
    if any(s < 0 for s in shape):
        raise SparseFormatError(f"{name}: negative shape {shape}")
    numel = math.prod(shape)
    if encoding == "dense":
        if values.numel() != numel:
            raise SparseFormatError(f"{name}: {values.numel()} stored entries for shape {shape}")
        return values.clone().reshape(shape)
    if encoding == "bitmap":
        if index.numel() != (numel + 7) // 8:
            raise SparseFormatError(f"{name}: bitmap has {index.numel()} bytes for {numel} entries")
        positions = torch.from_numpy(np.unpackbits(index.numpy())[:numel].astype(bool)).nonzero().flatten()
    elif encoding == "gaps":
        positions = decode_gaps(index)
    else:
        raise SparseFormatError(f"{name}: unknown encoding {encoding!r}")
    if positions.numel() != values.numel() or (positions.numel() and int(positions[-1]) >= numel):
        raise SparseFormatError(f"{name}: index and values disagree ({positions.numel()} vs {values.numel()})")
    flat = torch.zeros(numel, dtype=dtype)
    flat[positions] = values
    return flat.reshape(shape)


def _part(stored: dict[str, torch.Tensor], key: str, dtype: torch.dtype) -> torch.Tensor:
    if key not in stored:
        raise SparseFormatError(f"missing tensor {key!r}")
    t = stored[key]
    if t.dtype != dtype:
        raise SparseFormatError(f"{key}: dtype {t.dtype}, expected {dtype}")
    return t
