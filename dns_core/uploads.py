"""Untrusted files: recognised by content, validated before use, refused when loading could run code.

Nothing here unpickles, imports or executes what it reads. A file is classified from its first bytes
(and, for zip archives, from the names in the central directory, which ``zipfile`` reads without
extracting anything); safetensors headers are parsed and checked by hand before the safetensors
library maps a single tensor; archives are checked for path traversal, links, entry count and
expansion ratio before any member is read.

Three error types, all ``ValueError`` subclasses, tell a caller (the command line, the service) how
to answer: :class:`RefusedFormat` (a format we never load, with how to convert), :class:`FileTooLarge`
(a size cap) and :class:`InvalidFile` (a format we accept, but this file is malformed).
"""

from __future__ import annotations

import gzip
import json
import math
import os
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError

#: Default caps; callers (the service settings, the command line) may pass their own.
MAX_FILE_BYTES = 512 * 1024 * 1024
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_ARCHIVE_ENTRIES = 64
MAX_EXPANSION_RATIO = 200.0
MAX_EXPANDED_BYTES = 2 * 1024 * 1024 * 1024

#: safetensors element types we accept, with their size in bytes.
SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "BOOL": 1}  # fmt: skip

CONVERT_WEIGHTS = (
    "export the model to ONNX (torch.onnx.export) or save its state dict as safetensors "
    "(safetensors.torch.save_file(model.state_dict(), 'model.safetensors')) on a machine where you trust the file"
)


class UploadError(InputError):
    """A file that cannot be used; the message says why and what to do."""


class RefusedFormat(UploadError):
    """A format that is never loaded (it could run code), or one this project does not read."""


class FileTooLarge(UploadError):
    """A file, header or archive past a size cap."""


class InvalidFile(UploadError):
    """A file of an accepted format that is malformed or inconsistent."""


# --------------------------------------------------------------------------------------------------
# Recognising a file by its content


@dataclass(frozen=True)
class Sniffed:
    """What a file is: ``kind`` is one of ``safetensors``, ``onnx``, ``npz``, ``idx``, ``zip``, ``tar``.

    ``zip`` is any zip archive that is neither an .npz of arrays nor a torch format; ``tar`` a tar
    archive, plain or gzip-compressed (``gzipped``). Neither is opened here: unpack them with
    :func:`dns_core.archives.extract_archive`, which checks every entry.
    """

    kind: str
    gzipped: bool = False


def _zip_kind(path: Path) -> str:
    """Classify a zip archive from its member names; never extracts or reads a member.

    A torch format (``torch.save``, TorchScript, ``.pt2``, ``torch.package``) is recognised by the
    names those writers use, wherever they sit in the archive, so that wrapping one in a folder
    does not get it past; an archive of ``.npy`` files is an .npz; any other is a plain ``zip``.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except Exception as e:  # zipfile fails in many ways on damaged input (BadZipFile, NotImplementedError, ...)
        raise InvalidFile(f"{path.name}: a damaged zip archive ({e})") from None
    parts = [n.split("/") for n in names]
    base = {p[-1] for p in parts}
    dirs = {d for p in parts for d in p[:-1]}
    if (
        "serialized_exported_program.json" in base
        or "archive_format" in base
        or any(n.endswith(".json") and "/models/" in n for n in names)
    ):
        return "torch-export"
    if "code" in dirs or "constants.pkl" in base:
        return "torchscript"
    if ".data" in dirs and ("extern_modules" in base or "python_version" in base):
        return "torch-package"
    if "data.pkl" in base or any(n.endswith(".pkl") for n in names):
        return "torch-save"
    if names and all(n.endswith(".npy") for n in names):
        return "npz"
    return "zip"


_REFUSALS = {
    "pickle": "a pickle (torch.save .pt/.pth/.bin/.pkl in the legacy format); loading it could run code",
    "torch-save": "a torch.save archive (.pt/.pth/.bin); loading it unpickles and could run code",
    "torchscript": "a TorchScript archive (torch.jit.save); loading it runs code",
    "torch-export": "a torch.export archive (.pt2); loading it unpickles and could run code",
    "torch-package": "a torch.package archive; loading it imports code",
}


def is_tar_header(block: bytes) -> bool:
    """A tar header block (POSIX ustar, pax or GNU): the magic at offset 257 and a correct checksum."""
    if len(block) < 512 or block[257:262] != b"ustar":
        return False
    field = block[148:156].split(b"\0", 1)[0].strip()
    try:
        checksum = int(field, 8)
    except ValueError:
        return False
    blank = block[:148] + b" " * 8 + block[156:512]
    return checksum in (sum(blank), sum(b - 256 if b > 127 else b for b in blank))


def _is_idx(head: bytes) -> bool:
    return len(head) >= 4 and head[0] == 0 and head[1] == 0 and head[2] in (8, 9, 11, 12, 13, 14) and 1 <= head[3] <= 6


def _idx_size(p: Path) -> int:
    """The file size an IDX header announces (magic, dimensions, elements)."""
    with open(p, "rb") as f:
        head = f.read(4)
        dims = f.read(4 * head[3])
    if len(dims) < 4 * head[3]:
        return -1
    item = {8: 1, 9: 1, 11: 2, 12: 4, 13: 4, 14: 8}[head[2]]
    return 4 + len(dims) + item * math.prod(int.from_bytes(dims[i : i + 4], "big") for i in range(0, len(dims), 4))


def _is_pickle(head: bytes) -> bool:
    # protocol 2+ starts with PROTO (0x80) and a version; protocols 0/1 with a handful of opcodes
    return (head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5) or head[:1] in (b"(", b"c", b"}", b"]")


def sniff(path: str | os.PathLike[str], *, max_bytes: int = MAX_FILE_BYTES) -> Sniffed:
    """What ``path`` holds, judged by content; refuses code-carrying formats and files past ``max_bytes``."""
    p = Path(path)
    size = p.stat().st_size
    if size > max_bytes:
        raise FileTooLarge(f"{p.name}: {size:,} bytes, more than the {max_bytes:,}-byte limit")
    with open(p, "rb") as f:
        block = f.read(512)
    head = block[:16]
    if not head:
        raise InvalidFile(f"{p.name}: the file is empty")
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        kind = _zip_kind(p)
        if kind in ("npz", "zip"):
            return Sniffed(kind)
        raise RefusedFormat(f"{p.name} is {_REFUSALS[kind]}; {CONVERT_WEIGHTS}")
    if head[:2] == b"\x1f\x8b":
        try:
            with gzip.open(p, "rb") as g:
                inner = g.read(512)
        except (OSError, EOFError, zlib.error) as e:
            raise InvalidFile(f"{p.name}: a damaged gzip file ({e})") from None
        if _is_idx(inner):
            return Sniffed("idx", gzipped=True)
        if is_tar_header(inner):
            return Sniffed("tar", gzipped=True)
        if _is_pickle(inner):
            raise RefusedFormat(f"{p.name} is a gzip-compressed pickle; loading it could run code; {CONVERT_WEIGHTS}")
        raise RefusedFormat(
            f"{p.name}: a gzip file that holds neither IDX data nor a tar archive (the only compressed inputs read)"
        )
    if _is_idx(head) and _idx_size(p) == size:
        return Sniffed("idx")
    if is_tar_header(block):  # before the pickle test: a tar starts with a member's name, which may be "c…"
        return Sniffed("tar")
    if len(head) >= 9 and head[8:9] == b"{":  # an 8-byte header length, then the JSON header
        return Sniffed("safetensors")
    if _is_pickle(head):
        raise RefusedFormat(f"{p.name} is {_REFUSALS['pickle']}; {CONVERT_WEIGHTS}")
    if head[:1] == b"\x08":  # protobuf field 1 (ir_version, varint): how onnx.save starts a ModelProto
        return Sniffed("onnx")
    raise RefusedFormat(
        f"{p.name}: not a format netsurgery reads (ONNX, safetensors, .npz, IDX, zip, tar); "
        "upload models as ONNX or safetensors (or a zip/tar of a model folder) and data as .npz, "
        "safetensors, IDX or a zip/tar of class folders of images"
    )


# --------------------------------------------------------------------------------------------------
# safetensors


@dataclass(frozen=True)
class SafetensorsHeader:
    metadata: dict[str, str]
    tensors: dict[str, tuple[str, tuple[int, ...]]]  # name -> (dtype, shape)


def validate_safetensors(
    path: str | os.PathLike[str], *, max_bytes: int = MAX_FILE_BYTES, max_header: int = MAX_HEADER_BYTES
) -> SafetensorsHeader:
    """Check a safetensors file completely from its header, before anything maps it.

    The header length is capped and must fit in the file; the header must be a JSON object of
    tensors with an accepted dtype, a non-negative shape and offsets whose length matches
    ``numel × itemsize``; sorted by offset, the tensors must tile the data section exactly (no gap,
    no overlap, nothing after the last one).
    """
    p = Path(path)
    size = p.stat().st_size
    if size > max_bytes:
        raise FileTooLarge(f"{p.name}: {size:,} bytes, more than the {max_bytes:,}-byte limit")
    if size >= 9:  # long enough to judge: refuse pickles and archives for what they are
        kind = sniff(p, max_bytes=max_bytes).kind
        if kind != "safetensors":
            raise RefusedFormat(f"{p.name}: {kind} content, not safetensors")
    with open(p, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise InvalidFile(f"{p.name}: truncated safetensors file ({size} bytes, no header length)")
        n = int.from_bytes(prefix, "little")
        if n > max_header:
            raise FileTooLarge(f"{p.name}: safetensors header of {n:,} bytes, more than the {max_header:,} allowed")
        if 8 + n > size:
            raise InvalidFile(f"{p.name}: the header claims {n:,} bytes but the file holds only {size - 8:,} after it")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidFile(f"{p.name}: the safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise InvalidFile(f"{p.name}: the safetensors header is not a JSON object")
    meta = header.pop("__metadata__", {}) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise InvalidFile(f"{p.name}: __metadata__ must map strings to strings")
    data_len = size - 8 - n
    spans: list[tuple[int, int, str]] = []
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, spec in header.items():
        if not isinstance(spec, dict):
            raise InvalidFile(f"{p.name}: entry {name!r} is not an object")
        dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
        if dtype not in SAFETENSORS_DTYPES:
            raise InvalidFile(
                f"{p.name}: tensor {name!r} has dtype {dtype!r}; accepted: {', '.join(SAFETENSORS_DTYPES)}"
            )
        if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
            raise InvalidFile(f"{p.name}: tensor {name!r} has a bad shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise InvalidFile(f"{p.name}: tensor {name!r} has bad data_offsets {offsets!r}")
        want = math.prod(shape) * SAFETENSORS_DTYPES[dtype]
        if offsets[1] - offsets[0] != want:
            raise InvalidFile(
                f"{p.name}: tensor {name!r} of shape {shape} {dtype} needs {want:,} bytes, "
                f"its offsets span {offsets[1] - offsets[0]:,}"
            )
        spans.append((offsets[0], offsets[1], name))
        tensors[name] = (dtype, tuple(shape))
    end = 0
    for start, stop, name in sorted(spans):
        if start != end:
            what = "overlaps the previous tensor" if start < end else f"leaves a gap of {start - end:,} bytes"
            raise InvalidFile(f"{p.name}: tensor {name!r} {what} (offsets must tile the data exactly)")
        end = stop
    if end != data_len:
        raise InvalidFile(
            f"{p.name}: the tensors cover {end:,} bytes but the data section holds {data_len:,} "
            "(truncated, or bytes after the last tensor)"
        )
    return SafetensorsHeader(meta, tensors)


# --------------------------------------------------------------------------------------------------
# Archives (.npz)


def check_archive(
    path: str | os.PathLike[str],
    *,
    max_entries: int = MAX_ARCHIVE_ENTRIES,
    max_ratio: float = MAX_EXPANSION_RATIO,
    max_expanded: int = MAX_EXPANDED_BYTES,
) -> list[str]:
    """Refuse a zip archive with unsafe names, links, encryption, too many entries or too much expansion.

    Returns the member names. Reads only the central directory.
    """
    p = Path(path)
    try:
        with zipfile.ZipFile(p) as zf:
            infos = zf.infolist()
    except Exception as e:  # zipfile fails in many ways on damaged input (BadZipFile, NotImplementedError, ...)
        raise InvalidFile(f"{p.name}: a damaged zip archive ({e})") from None
    if len(infos) > max_entries:
        raise InvalidFile(f"{p.name}: {len(infos)} entries in the archive, more than the {max_entries} allowed")
    total = 0
    for info in infos:
        name = info.filename
        if name.startswith(("/", "\\")) or ".." in name.replace("\\", "/").split("/") or ":" in name:
            raise InvalidFile(f"{p.name}: archive entry {name!r} points outside the archive")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise InvalidFile(f"{p.name}: archive entry {name!r} is a link")
        if info.flag_bits & 0x1:
            raise InvalidFile(f"{p.name}: archive entry {name!r} is encrypted")
        ratio = info.file_size / max(info.compress_size, 1)
        if ratio > max_ratio:
            raise InvalidFile(
                f"{p.name}: archive entry {name!r} expands {ratio:.0f}x, more than the {max_ratio:.0f}x allowed"
            )
        total += info.file_size
    if total > max_expanded:
        raise FileTooLarge(f"{p.name}: the archive expands to {total:,} bytes, more than {max_expanded:,}")
    return [i.filename for i in infos]


def describe(header: SafetensorsHeader) -> dict[str, Any]:
    """A JSON-able summary (for reports and API answers)."""
    return {"tensors": {k: {"dtype": d, "shape": list(s)} for k, (d, s) in header.tensors.items()}}
