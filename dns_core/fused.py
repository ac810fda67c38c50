"""The DNS mask update as one pass over memory on CPU, compiled with numba.

Eager PyTorch needs three elementwise passes per tensor for the banded update (|w|, add the band
where the mask is 1, compare) and a fourth for the product W ⊙ T that the next forward pass reads.
On LeNet-5 those passes are nearly all over fc1's 400K weights, and after a training step has
pushed them out of cache each pass runs at memory speed: about a third of the surgery step's
overhead. The kernels here read W and T once and write, in the same loop, the entries of T that
change (once the masks settle most of T's cache lines stay clean and are not written back to
memory) and optionally W ⊙ T, with the same float arithmetic as :func:`dns_core.rule.update_masks_`
(a float32 tensor's θ-bounds rounded to float32 as PyTorch rounds a Python scalar; the band is
added to |w| only where the mask is 1, which is exact), so the masks and products are the same bit
for bit, a mask's -0.0 entries included (they come out 0.0, as the eager passes write them).

They serve CPU tensors of float32 or float64 laid out contiguously; anything else (CUDA, half
precision, channels-last weights) and a Python without numba go through the eager PyTorch passes.
The kernels compile on first use (numba's on-disk cache, next to this file or under
``NUMBA_CACHE_DIR`` or the user's cache folder, makes later processes' first use cheap; where none
of these can be written they compile in memory in each process).
A :class:`Pair` keeps numpy views of its tensors; :meth:`Pair.current` tells whether a tensor's
storage has been replaced since (an in-place ``.to()``), after which the pair must be prepared again.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def _masks(w: Any, m: Any, band: Any, hi: Any) -> None:  # pragma: no cover - runs compiled
    for i in range(w.size):
        old = m[i]
        new = 1.0 if abs(w[i]) + band * old > hi else 0.0
        # stored only where it differs, bit for bit (a -0.0 becomes 0.0, as the eager passes write it)
        if old != new or math.copysign(1.0, old) < 0.0:
            m[i] = new


def _masks_and_products(w: Any, m: Any, p: Any, band: Any, hi: Any) -> None:  # pragma: no cover - runs compiled
    for i in range(w.size):
        old = m[i]
        new = 1.0 if abs(w[i]) + band * old > hi else 0.0
        if old != new or math.copysign(1.0, old) < 0.0:
            m[i] = new
        p[i] = w[i] * new


@functools.cache
def kernels() -> tuple[Callable[..., None], Callable[..., None]] | None:
    """The compiled (masks, masks-and-products) kernels, or None where numba is not installed."""
    try:
        import numba
    except ImportError:  # e.g. a GPU image that carries only pure-Python wheels
        return None
    try:
        jit = numba.njit(cache=True, nogil=True, boundscheck=False)
        return jit(_masks), jit(_masks_and_products)
    except RuntimeError:
        # no cache folder can be written (a read-only install without a writable home or
        # NUMBA_CACHE_DIR): compile in memory, once per process
        jit = numba.njit(cache=False, nogil=True, boundscheck=False)
        return jit(_masks), jit(_masks_and_products)


def eligible(weight: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether the one-pass kernel can update ``mask`` from ``weight``."""
    return (
        weight.device.type == "cpu"
        and mask.device.type == "cpu"
        and weight.dtype in _DTYPES
        and mask.dtype == weight.dtype
        and weight.shape == mask.shape
        and weight.is_contiguous()
        and mask.is_contiguous()
        and type(weight) in (torch.Tensor, torch.nn.Parameter)
        and type(mask) in (torch.Tensor, torch.nn.Parameter)
    )


def _flat(t: torch.Tensor) -> np.ndarray[Any, Any]:
    return t.detach().numpy().reshape(-1)


class Pair:
    """A (W, T) pair prepared for the one-pass update with fixed bounds: numpy views of both tensors
    (and of a buffer for W ⊙ T, made on first use), and the band and bound in the tensors' dtype."""

    __slots__ = ("band", "high", "mask", "pointers", "product", "views", "weight")

    def __init__(self, weight: torch.Tensor, mask: torch.Tensor, band: float, high: float) -> None:
        scalar = _DTYPES[weight.dtype]
        self.weight, self.mask = weight, mask
        self.band, self.high = scalar(band), scalar(high)
        self.pointers = (weight.data_ptr(), mask.data_ptr())
        self.views = [_flat(weight), _flat(mask)]
        self.product: torch.Tensor | None = None

    def current(self) -> bool:
        """Whether both tensors still have the storage the views were made of."""
        return self.weight.data_ptr() == self.pointers[0] and self.mask.data_ptr() == self.pointers[1]


def prepare(weight: torch.Tensor, mask: torch.Tensor, band: float, high: float) -> Pair | None:
    """A :class:`Pair` for ``weight`` and ``mask``, or None where the kernels cannot serve them."""
    if kernels() is None or not eligible(weight, mask):
        return None
    return Pair(weight, mask, band, high)


def run(pairs: Sequence[Pair], products: bool = False) -> list[torch.Tensor]:
    """Each pair's mask becomes |w| + band·T > high, in one pass per pair.

    The pairs must be :meth:`Pair.current`. The masks change in place, and their version counters
    move as with an in-place PyTorch op. With ``products`` the same pass writes W ⊙ T (from the new
    mask) into each pair's product buffer, and the returned list holds those buffers: they belong
    to the pairs and are overwritten by the pair's next run.
    """
    compiled = kernels()
    assert compiled is not None, "fused.run needs pairs from fused.prepare"
    only_masks, with_products = compiled
    out: list[torch.Tensor] = []
    for pair in pairs:
        views = pair.views
        if products:
            if pair.product is None:
                pair.product = torch.empty_like(pair.weight, requires_grad=False)
                views.append(_flat(pair.product))
            with_products(views[0], views[1], views[2], pair.band, pair.high)
            out.append(pair.product)
        else:
            only_masks(views[0], views[1], pair.band, pair.high)
    _increment_version([p.mask for p in pairs] + out)
    return out


def _increment_version(tensors: list[torch.Tensor]) -> None:
    try:
        torch.autograd.graph.increment_version(tensors)
    except TypeError:  # torch before 2.8 takes one tensor at a time
        for t in tensors:
            torch.autograd.graph.increment_version(t)
