"""The Dynamic Network Surgery rule as pure functions (Guo, Yao & Chen, NIPS 2016).

These follow the authors' Caffe layers (``compress_conv_layer``, ``compress_inner_product_layer``):
statistics pooled over a layer's weights and bias with exact zeros left out, a threshold
``max(μ + crate·σ, 0)``, and a hysteresis band (prune at ``≤ 0.9θ``, splice at ``> 1.1θ``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

#: Lower edge of the hysteresis band, as a fraction of θ: a kept weight is pruned at |w| ≤ 0.9θ.
PRUNE_FACTOR = 0.9
#: Upper edge of the band: a pruned weight is spliced back once |w| > 1.1θ.
SPLICE_FACTOR = 1.1


@dataclass(frozen=True)
class LayerStatistics:
    """Mean ``mu`` of |w| and standard deviation ``sigma`` of |w| over the non-zero entries."""

    mu: float
    sigma: float
    count: int


def layer_statistics(tensors: Iterable[torch.Tensor]) -> LayerStatistics:
    """μ = Σ|w|/n and σ = sqrt(Σw²/n − μ²), pooled over ``tensors``, exact zeros not counted in n."""
    abs_sum = 0.0
    sq_sum = 0.0
    n = 0
    for t in tensors:
        t = t.detach().double()
        abs_sum += float(t.abs().sum())
        sq_sum += float((t * t).sum())
        n += int(torch.count_nonzero(t))
    if n == 0:
        return LayerStatistics(0.0, 0.0, 0)
    mu = abs_sum / n
    return LayerStatistics(mu, math.sqrt(max(sq_sum / n - mu * mu, 0.0)), n)


def threshold(stats: LayerStatistics, crate: float) -> float:
    """θ = max(μ + crate·σ, 0): ``crate`` (the paper's compression-rate knob) moves the cut."""
    return max(stats.mu + crate * stats.sigma, 0.0)


def update_mask(weight: torch.Tensor, mask: torch.Tensor, theta: float) -> torch.Tensor:
    """One surgery step on a mask (1 kept, 0 pruned), returned as a new tensor of ``mask``'s dtype.

    Prune: a kept weight with |w| ≤ 0.9θ. Splice: a pruned weight with |w| > 1.1θ.
    Anything inside the band keeps its state.
    """
    return update_mask_(weight, mask.clone(), theta)


def update_mask_(weight: torch.Tensor, mask: torch.Tensor, theta: float) -> torch.Tensor:
    """In-place :func:`update_mask` for a floating-point 0/1 ``mask`` (the training hot path).

    Kept entries must exceed 0.9θ and pruned ones 1.1θ, i.e. |w| + 0.2θ·mask > 1.1θ: three
    elementwise passes and no temporaries beyond |w|.
    """
    lo, hi = PRUNE_FACTOR * theta, SPLICE_FACTOR * theta
    score = weight.detach().abs().add_(mask, alpha=hi - lo)
    return torch.gt(score, hi, out=mask)


def update_masks_(weights: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], thetas: Sequence[float]) -> None:
    """:func:`update_mask_` on many tensors at once, with the same result bit for bit.

    ``thetas`` holds each pair's θ. One pass takes every |w|, one adds each band (0.2θ where the
    mask is 1: mask·mask·0.2θ, exact for a 0/1 mask), then each mask is the comparison with its
    1.1θ: fewer calls into PyTorch than three per tensor, which is what a small layer costs.
    """
    if not weights:
        return
    with torch.no_grad():
        scores = list(torch._foreach_abs([w.detach() for w in weights]))
        bands = [(SPLICE_FACTOR - PRUNE_FACTOR) * theta for theta in thetas]
        torch._foreach_addcmul_(scores, list(masks), list(masks), bands)
        for score, mask, theta in zip(scores, masks, thetas, strict=True):
            torch.gt(score, SPLICE_FACTOR * theta, out=mask)


def surgery_probability(t: int, gamma: float, power: float) -> float:
    """Probability that a layer updates its mask at iteration ``t``: (1 + γ·t)^(−power)."""
    return float((1.0 + gamma * t) ** (-power))


def hysteresis_scores(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scores whose top-k is the banded update that keeps exactly k entries.

    With s = |w|/0.9 for kept and |w|/1.1 for pruned entries, ``s > θ`` is exactly the rule of
    :func:`update_mask`. Choosing θ as the k-th largest score therefore hits a kept count of k
    while still pruning only below 0.9θ and splicing only above 1.1θ.
    """
    a = weight.detach().abs()
    return torch.where(mask.bool(), a * (1.0 / PRUNE_FACTOR), a * (1.0 / SPLICE_FACTOR))


def cubic_schedule(t: int, t0: int, t1: int, start: float, end: float) -> float:
    """Zhu & Gupta's gradual schedule: ``start`` at t0 → ``end`` at t1, fast early, slow late."""
    if t <= t0:
        return start
    if t >= t1:
        return end
    frac = (t - t0) / (t1 - t0)
    return end + (start - end) * (1.0 - frac) ** 3
