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

Optional value codecs (beyond the paper, off by default) shrink the stored values of floating
tensors further: ``float16``; ``int8`` (symmetric, one scale per tensor); ``shared`` (weight sharing
as in Deep Compression: k-means over a tensor's kept values, at most 256 centroids stored as
float32, one uint8 code per value). A file that uses one is format version 2 and names the codec
in the tensor's manifest entry; files without codecs stay version 1.
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

from .defaults import CODECS
from .errors import InputError
from .io import read_safetensors

FORMAT_VERSION = 1
CODEC_VERSION = 2  # the format version of files that use a value codec
META_KEY = "netsurgery.sparse"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8,
           "int8": torch.int8, "bool": torch.bool}  # fmt: skip
_NAMES = {v: k for k, v in _DTYPES.items()}


class SparseFormatError(InputError):
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


def _encode(t: torch.Tensor, itemsize: int) -> tuple[str, torch.Tensor, torch.Tensor]:
    """(encoding, values, index) for ``t``; the cheapest by bytes (index is empty for dense).

    ``itemsize`` is the stored size of one value (smaller than the element size under a codec).
    """
    flat = t.detach().contiguous().cpu().flatten()
    nz = torch.nonzero(flat).flatten()
    values = flat[nz].contiguous()
    bitmap = torch.from_numpy(np.packbits((flat != 0).numpy()))
    gaps = encode_gaps(nz)
    none = torch.zeros(0, dtype=torch.uint8)
    options = [
        (flat.numel() * itemsize, "dense", flat, none),
        (values.numel() * itemsize + bitmap.numel(), "bitmap", values, bitmap),
        (values.numel() * itemsize + gaps.numel(), "gaps", values, gaps),
    ]
    _, encoding, vals, index = min(options, key=lambda o: o[0])
    return encoding, vals, index


def _kmeans_1d(values: torch.Tensor, k: int, steps: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids, codes) of 1-D k-means with linear initialisation over [min, max], as Deep
    Compression found best for weight sharing (it keeps the rare large weights representable)."""
    v = values.to(torch.float64)
    k = max(1, min(k, v.numel()))
    centroids = torch.linspace(float(v.min()), float(v.max()), k, dtype=torch.float64)
    codes = torch.zeros(v.numel(), dtype=torch.int64)
    for _ in range(steps):
        bounds = (centroids[1:] + centroids[:-1]) / 2  # centroids stay sorted: nearest = bucketize
        new_codes = torch.bucketize(v, bounds)
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, new_codes, v)
        counts = torch.bincount(new_codes, minlength=k).to(torch.float64)
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
        if torch.equal(new_codes, codes):
            break
        codes = new_codes
    codes = torch.bucketize(v, (centroids[1:] + centroids[:-1]) / 2)
    return centroids.to(torch.float32), codes.to(torch.uint8)


def _apply_codec(vals: torch.Tensor, codec: str, clusters: int) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor]:
    """(stored values, codec spec, codebook) for ``vals`` under ``codec``."""
    empty = torch.zeros(0, dtype=torch.float32)
    if codec == "float16":
        return vals.to(torch.float16), {"kind": "float16"}, empty
    if codec == "int8":
        peak = float(vals.abs().max()) if vals.numel() else 0.0
        scale = peak / 127.0 if peak > 0 else 1.0
        q = torch.round(vals.to(torch.float64) / scale).clamp(-127, 127).to(torch.int8)
        return q, {"kind": "int8", "scale": scale}, empty
    if codec == "shared":
        if vals.numel() == 0:
            return vals.new_zeros(0, dtype=torch.uint8), {"kind": "shared"}, empty
        centroids, codes = _kmeans_1d(vals, clusters)
        return codes, {"kind": "shared"}, centroids
    raise SparseFormatError(f"unknown value codec {codec!r}; choose one of {', '.join(CODECS)}")


def save_sparse(
    path: str | os.PathLike[str],
    state: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
    *,
    codec: str | None = None,
    codec_tensors: set[str] | None = None,
    clusters: int = 256,
) -> PackStats:
    """Write ``state`` (e.g. a squashed model's state dict) in the sparse layout.

    ``codec`` (``float16``, ``int8`` or ``shared``; default none, lossless) compresses the values of
    the floating tensors named in ``codec_tensors`` (default: every floating tensor with two or more
    dimensions, i.e. the weights). ``clusters`` is the codebook size of ``shared`` (2 to 256).
    """
    if codec is not None and codec not in CODECS:
        raise SparseFormatError(f"unknown value codec {codec!r}; choose one of {', '.join(CODECS)}")
    if not 2 <= clusters <= 256:
        raise SparseFormatError(f"clusters must be between 2 and 256, got {clusters}")
    values: dict[str, list[torch.Tensor]] = {}
    value_len: dict[str, int] = {}
    index: list[torch.Tensor] = []
    index_len = 0
    manifest: dict[str, Any] = {}
    kept = dense_bytes = value_bytes = 0

    def put(dtype: str, t: torch.Tensor) -> list[int]:
        start = value_len.get(dtype, 0)
        values.setdefault(dtype, []).append(t)
        value_len[dtype] = start + t.numel()
        return [start, t.numel()]

    for name, t in state.items():
        if t.dtype not in _NAMES:
            raise SparseFormatError(f"{name}: dtype {t.dtype} is not supported")
        dtype = _NAMES[t.dtype]
        use_codec = codec is not None and t.is_floating_point()
        use_codec = use_codec and (name in codec_tensors if codec_tensors is not None else t.dim() >= 2)
        itemsize = {"float16": 2, "int8": 1, "shared": 1}[codec] if use_codec and codec else t.element_size()
        encoding, vals, idx = _encode(t, itemsize)
        entry: dict[str, Any] = {"encoding": encoding, "shape": list(t.shape), "dtype": dtype}
        if use_codec and codec:
            stored, spec, codebook = _apply_codec(vals, codec, clusters)
            if codebook.numel():
                spec["codebook"] = put("float32", codebook)
            entry["codec"] = spec
            entry["values"] = put(_NAMES[stored.dtype], stored)
        else:
            entry["values"] = put(dtype, vals)
        entry["index"] = [index_len, idx.numel()]
        manifest[name] = entry
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
    version = CODEC_VERSION if any("codec" in e for e in manifest.values()) else FORMAT_VERSION
    meta[META_KEY] = json.dumps({"version": version, "tensors": manifest}, separators=(",", ":"))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return PackStats(os.path.getsize(path), kept, dense_bytes, value_bytes)


def load_sparse(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Rebuild the dense state dict from a file written by :func:`save_sparse`."""
    meta, stored = read_safetensors(path, SparseFormatError)
    try:
        manifest = json.loads(meta[META_KEY])
        if manifest["version"] not in (FORMAT_VERSION, CODEC_VERSION):
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
        codec = spec.get("codec")
        if codec is None:
            values = _slice(_part(stored, f"values.{dtype_name}", dtype), spec["values"], name)
        else:
            values = _decode_values(name, codec, spec["values"], stored, dtype)
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


def _decode_values(
    name: str, codec: dict[str, Any], span: Any, stored: dict[str, torch.Tensor], dtype: torch.dtype
) -> torch.Tensor:
    """The values of a tensor stored under a codec, decoded to ``dtype``."""
    if not dtype.is_floating_point:
        raise SparseFormatError(f"{name}: a value codec on a {dtype} tensor")
    kind = codec["kind"]
    if kind == "float16":
        return _slice(_part(stored, "values.float16", torch.float16), span, name).to(dtype)
    if kind == "int8":
        scale = float(codec["scale"])
        if not math.isfinite(scale) or scale <= 0:
            raise SparseFormatError(f"{name}: bad int8 scale {scale!r}")
        return (_slice(_part(stored, "values.int8", torch.int8), span, name).to(torch.float64) * scale).to(dtype)
    if kind == "shared":
        codes = _slice(_part(stored, "values.uint8", torch.uint8), span, name).to(torch.int64)
        if codes.numel() == 0:
            return torch.zeros(0, dtype=dtype)
        book = _slice(_part(stored, "values.float32", torch.float32), codec["codebook"], name)
        if int(codes.max()) >= book.numel():
            raise SparseFormatError(f"{name}: a code points past the {book.numel()}-entry codebook")
        return book[codes].to(dtype)
    raise SparseFormatError(f"{name}: unknown value codec {kind!r}")


def _part(stored: dict[str, torch.Tensor], key: str, dtype: torch.dtype) -> torch.Tensor:
    if key not in stored:
        raise SparseFormatError(f"missing tensor {key!r}")
    t = stored[key]
    if t.dtype != dtype:
        raise SparseFormatError(f"{key}: dtype {t.dtype}, expected {dtype}")
    return t
