"""dns_core: Dynamic Network Surgery (Guo, Yao & Chen, NIPS 2016) in pure PyTorch.

No web, queue or database imports: progress and cancellation enter as callbacks.
"""

from .rule import (
    hysteresis_scores,
    layer_statistics,
    surgery_probability,
    threshold,
    update_mask,
)
from .surgery import DNS, LayerReport, Ramp, ScheduledSurgery, Surgery, SurgeryError, Target, select_layers
from .train import AccuracyBudget, Callbacks, Cancelled, Progress, TrainConfig, evaluate, fit

__version__ = "0.1.0"

__all__ = [
    "DNS",
    "AccuracyBudget",
    "Callbacks",
    "Cancelled",
    "LayerReport",
    "Progress",
    "Ramp",
    "ScheduledSurgery",
    "Surgery",
    "SurgeryError",
    "Target",
    "TrainConfig",
    "evaluate",
    "fit",
    "hysteresis_scores",
    "layer_statistics",
    "select_layers",
    "surgery_probability",
    "threshold",
    "update_mask",
]
