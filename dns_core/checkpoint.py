"""Checkpoints without pickle: tensors in safetensors, structure in its JSON metadata.

A nested state (dicts, lists, numbers, strings, tensors) is flattened: every tensor goes into the
safetensors body under a path key, and the rest of the tree, with ``{"__tensor__": key}``
placeholders, goes into the header's metadata as JSON. Loading it back runs no code from the file.
Writes are atomic: the file is written in a temporary folder beside the target, fsync'ed, then
moved into place with ``os.replace``.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import InputError

_META_KEY = "netsurgery.state"


def _flatten(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = path or "root"
        tensors[key] = obj.detach().contiguous().cpu()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"checkpoint keys must be str or int, got {type(k).__name__}")
            out[f"{type(k).__name__[0]}:{k}"] = _flatten(v, f"{path}/{k}", tensors)
        return {"__dict__": out}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_flatten(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {path or '/'}")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__list__" in obj:
            return [_unflatten(v, tensors) for v in obj["__list__"]]
        out: dict[Any, Any] = {}
        for k, v in obj["__dict__"].items():
            kind, _, name = k.partition(":")
            out[int(name) if kind == "i" else name] = _unflatten(v, tensors)
        return out
    return obj


def save_state(path: str | os.PathLike[str], state: Any) -> None:
    """Write ``state`` atomically to ``path`` (safetensors)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    tree = _flatten(state, "", tensors)
    # a folder of our own, so that safetensors' own temporary file (it writes through one) lands in
    # it too: a writer killed midway leaves one name that remove_stale_temporaries recognises
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        save_file(tensors, tmp / path.name, metadata={_META_KEY: json.dumps(tree)})
        with open(tmp / path.name, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporaries that :func:`save_state` calls killed midway left beside ``path``.

    Only for a path no live writer uses (a resumed job's checkpoint, once its lease is held).
    """
    path = Path(path)
    stale = sorted(path.parent.glob(f".{glob.escape(path.name)}.*.tmp"))
    for tmp in stale:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    return stale


def load_state(path: str | os.PathLike[str]) -> Any:
    """Read a state written by :func:`save_state`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if _META_KEY not in meta:
        raise InputError(f"{path} is not a netsurgery checkpoint")
    return _unflatten(json.loads(meta[_META_KEY]), load_file(str(path)))
