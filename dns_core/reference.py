"""Converged dense reference models (the starting point DNS assumes)."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from . import models, numerics
from .data import Dataset
from .io import load_model, save_model
from .train import Callbacks, TrainConfig, fit


def cache_dir() -> Path:
    return Path(os.environ.get("NETSURGERY_CACHE", Path.home() / ".cache" / "netsurgery"))


def train_reference(
    arch: str,
    train: Dataset,
    *,
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 0.01,
    seed: int = 0,
    valid: Dataset | None = None,
    callbacks: Callbacks | None = None,
    device: str = "auto",
) -> nn.Module:
    """Train a zoo architecture from scratch to convergence (SGD, momentum 0.9, cosine lr)."""
    # one fixed recipe for every reference: the benchmark's starting points must be comparable
    import torch

    torch.manual_seed(seed)
    model = models.build(arch)
    iterations = epochs * (len(train) // batch_size)
    cfg = TrainConfig(
        iterations=iterations,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        device=device,
        eval_every=0,
        log_every=max(iterations // 200, 1),
    )
    fit(model, train, cfg, valid=valid, callbacks=callbacks)
    return model.cpu()


def cached_reference(
    arch: str,
    train: Dataset,
    *,
    tag: str,
    epochs: int = 20,
    seed: int = 0,
    callbacks: Callbacks | None = None,
) -> tuple[nn.Module, bool]:
    """Load ``<cache>/ref-<arch>-<tag>-e<epochs>-s<seed>.safetensors`` or train and store it.

    Under portable numerics (:mod:`dns_core.numerics`) the name ends in ``-portable-<digest of the pins>``:
    a reference trained with the machine's own kernels, or other pins, is another model.
    """
    pins = numerics.tag()
    path = cache_dir() / f"ref-{arch}-{tag}-e{epochs}-s{seed}{f'-{pins}' if pins else ''}.safetensors"
    if path.exists():
        return load_model(path)[0], True
    model = train_reference(arch, train, epochs=epochs, seed=seed, callbacks=callbacks)
    save_model(path, model, arch)
    return model, False
