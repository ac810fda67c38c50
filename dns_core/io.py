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


CONVERT_HINT = (
    "netsurgery reads safetensors weights only and never unpickles a file; convert with "
    "`safetensors.torch.save_file(model.state_dict(), 'model.safetensors')` where you trust the file"
)


def sniff_weights(path: str | os.PathLike[str]) -> None:
    """Refuse, by content and not by name, anything that is not a safetensors file."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        raise ValueError(f"{path} is a zip archive (torch.save, TorchScript or torch.export); {CONVERT_HINT}")
    if head[:1] == b"\x80" or head[:1] in (b"c", b"(", b"}", b"]"):
        raise ValueError(f"{path} looks like a pickle (torch.save .pt/.pth/.bin/.pkl); {CONVERT_HINT}")
    if len(head) < 9 or int.from_bytes(head[:8], "little") > 100_000_000 or head[8:9] != b"{":
        raise ValueError(f"{path} is not a safetensors file; {CONVERT_HINT}")


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


def load_model(path: str | os.PathLike[str], arch: str | None = None) -> tuple[nn.Module, str]:
    """Rebuild a zoo model from safetensors weights; the state dict must match exactly."""
    sniff_weights(path)
    meta, state = read_safetensors(path)
    name = arch or meta.get("netsurgery.arch")
    if name is None:
        raise ValueError(f"{path}: no architecture named in the file; pass one (e.g. lenet-5)")
    model = models.build(name, **json.loads(meta.get("netsurgery.config", "{}")))
    check_state_dict(model, state)
    model.load_state_dict(state)
    return model, name


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Raise a ValueError listing missing, unexpected and mis-shaped keys."""
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
        raise ValueError("weights do not match the architecture: " + " | ".join(parts))
