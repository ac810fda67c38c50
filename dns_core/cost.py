"""What one forward pass costs, in floating-point operations, counted from shapes alone.

:func:`count_flops` runs any callable under :class:`torch.utils.flop_counter.FlopCounterMode`, which
counts the operators that carry the arithmetic (matrix products, convolutions, attention) by their
shapes, as two FLOPs per multiply-add; element-wise work (activations, normalisation, bias adds) is
left out, so the figure is a floor that is close for the networks worth pruning. It works on the
``meta`` device: a module built there (no memory, no weights) counts as well as a real one.

The upload checks record :func:`forward_flops` of one example for every model; the service turns it
into a training-time estimate (``service.estimates``: forward and backward are about 3 forwards).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .inputs import ModelInput

log = logging.getLogger(__name__)


def count_flops(run: Callable[[], Any], *, examples: int = 1) -> int | None:
    """FLOPs that ``run()`` performs, divided by ``examples`` (the batch it runs on); None if it fails.

    Gradients are off while it runs. A failure is logged (at debug level) and answered None: a
    figure that cannot be counted is unknown, not an error of the model.
    """
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            run()
    except Exception as e:
        log.debug("FLOPs not counted: %s: %s", type(e).__name__, e)
        return None
    return int(counter.get_total_flops()) // max(1, examples)


def forward_flops(
    module: nn.Module, example: torch.Tensor | Mapping[str, torch.Tensor], *, examples: int = 1
) -> int | None:
    """FLOPs of ``module``'s forward pass on ``example``, per example; None if the forward pass fails.

    ``example`` is the input tensor, or keyword arguments (``{"input_ids": …}`` for a transformers
    model). It holds ``examples`` examples along its first dimension (one, unless the module cannot
    run on a batch of one, as batch norm in training mode on 1×1 maps). Module and example may be on
    the ``meta`` device.
    """
    if isinstance(example, torch.Tensor):
        return count_flops(lambda: module(example), examples=examples)
    kwargs = dict(example)
    return count_flops(lambda: module(**kwargs), examples=examples)


def meta_example(spec: ModelInput, n: int = 1) -> torch.Tensor:
    """``n`` examples of ``spec`` on the meta device: float (n, C, H, W) or (n, F); int64 (n, L) token ids."""
    if spec.kind == "tokens":
        return torch.zeros((n, *spec.shape), dtype=torch.int64, device="meta")
    return torch.zeros((n, *spec.shape), device="meta")
