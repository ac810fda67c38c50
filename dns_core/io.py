"""Saving and loading weights with safetensors (never pickle)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from . import models
from .errors import ModelError


def save_model(
    path: str | os.PathLike[str],
    model: nn.Module,
    arch: str,
    config: dict[str, Any] | None = None,
    extra: dict[str, str] | None = None,
) -> None:
    """Write ``model``'s state dict to ``path`` with the architecture name and config in the header."""
    meta = {"netsurgery.arch": arch, "netsurgery.config": json.dumps(config or {})}
    meta.update(extra or {})
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)


def read_safetensors(
    path: str | os.PathLike[str], error: type[ValueError] = ValueError
) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Header metadata and every tensor of a safetensors file; ``error`` for anything malformed."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            return meta, {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
    except Exception as e:  # safetensors raises its own error type for a malformed file
        raise error(f"{path}: not a readable safetensors file ({e})") from None


def load_model(
    path: str | os.PathLike[str],
    arch: str | None = None,
    config: dict[str, Any] | None = None,
    *,
    max_bytes: int | None = None,
) -> tuple[nn.Module, str]:
    """Rebuild a zoo model, or a torchvision/timm model by name (:mod:`dns_core.named`), from safetensors
    weights; the state dict must match exactly.

    The file is judged by content (pickles, TorchScript and torch.export archives are refused
    without being opened) and its header validated before any tensor is read. The architecture
    and config come from the arguments, else from the file's header; the config is checked by
    :func:`models.check_config` (the zoo's :data:`models.CONFIG_SCHEMA`, or the named model's table).
    """
    from . import uploads

    cap = uploads.MAX_FILE_BYTES if max_bytes is None else max_bytes
    kind = uploads.sniff(path, max_bytes=cap).kind
    if kind != "safetensors":
        raise uploads.RefusedFormat(
            f"{Path(path).name} is {'an' if kind[0] in 'aeiou' else 'a'} {kind} file, not safetensors weights"
            + ("; load ONNX models with dns_core.onnx_convert" if kind == "onnx" else "")
        )
    uploads.validate_safetensors(path, max_bytes=cap)
    meta, state = read_safetensors(path)
    name = arch or meta.get("netsurgery.arch")
    if name is None:
        raise ModelError(f"{Path(path).name}: no architecture named in the file; pass one (e.g. lenet-5)")
    if config is None:
        try:
            config = json.loads(meta.get("netsurgery.config", "{}"))
        except json.JSONDecodeError:
            raise ModelError(f"{Path(path).name}: the netsurgery.config header is not JSON") from None
    model = models.build(name, **models.check_config(name, config))
    check_state_dict(model, state)
    model.load_state_dict(state)
    return model, name


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Raise a ModelError listing missing, unexpected and mis-shaped keys."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    shapes = sorted(f"{k}: expected {want[k]}, got {got[k]}" for k in set(want) & set(got) if want[k] != got[k])
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append("missing " + ", ".join(missing))
        if unexpected:
            parts.append("unexpected " + ", ".join(unexpected))
        if shapes:
            parts.append("mis-shaped " + "; ".join(shapes))
        raise ModelError("weights do not match the architecture: " + " | ".join(parts))
