"""What a model takes as input, so that data can be checked against it and built-in sets adapted to it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

InputKind = Literal["image", "tokens", "features"]


@dataclass(frozen=True)
class ModelInput:
    """One example's input: ``shape`` is (C, H, W) for images, (L,) for token sequences, (F,) for features.

    ``vocab_size`` bounds token ids; ``mean`` and ``std`` (one per channel) are the normalisation
    the model was trained with, when its files say so.
    """

    kind: InputKind
    shape: tuple[int, ...]
    vocab_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
