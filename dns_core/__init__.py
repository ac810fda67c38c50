"""dns_core: Dynamic Network Surgery (Guo, Yao & Chen, NIPS 2016) in pure PyTorch.

No web, queue or database imports: progress and cancellation enter as callbacks.

The names below are imported lazily, so that ``import dns_core.uploads`` (the format checks the
service's API runs on uploads) does not pull in torch's training code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .errors import ConfigError, InputError, NetsurgeryError
    from .rule import hysteresis_scores, layer_statistics, surgery_probability, threshold, update_mask
    from .search import BudgetSearch
    from .spec import CompressSpec
    from .surgery import DNS, LayerReport, Ramp, ScheduledSurgery, Surgery, SurgeryError, Target, select_layers
    from .train import Callbacks, Cancelled, Progress, TrainConfig, evaluate, fit

__version__ = "0.1.0"

_WHERE = {
    **dict.fromkeys(["ConfigError", "InputError", "NetsurgeryError"], "errors"),
    "CompressSpec": "spec",
    **dict.fromkeys(["hysteresis_scores", "layer_statistics", "surgery_probability", "threshold", "update_mask"],
                    "rule"),
    **dict.fromkeys(["DNS", "LayerReport", "Ramp", "ScheduledSurgery", "Surgery", "SurgeryError", "Target",
                     "select_layers"], "surgery"),
    "BudgetSearch": "search",
    **dict.fromkeys(["Callbacks", "Cancelled", "Progress", "TrainConfig", "evaluate", "fit"],
                    "train"),
}  # fmt: skip

__all__ = [
    "DNS",
    "BudgetSearch",
    "Callbacks",
    "Cancelled",
    "CompressSpec",
    "ConfigError",
    "InputError",
    "LayerReport",
    "NetsurgeryError",
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
assert sorted(__all__) == sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'dns_core' has no attribute {name!r}")
