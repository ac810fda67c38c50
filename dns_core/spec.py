"""What a compression run is asked to do: a job spec checked and mapped to the engine's configuration.

:class:`CompressSpec` is the one mapping from a job's JSON spec (``{"method": …, "target": {…},
"settings": {…}}``, as the service stores it) or the command line's options to the engine's
configuration: a :class:`~dns_core.surgery.Target`, :class:`~dns_core.methods.MethodSettings`
and a :class:`~dns_core.train.TrainConfig`, with the defaults of :mod:`dns_core.defaults`.

Importing this module does not import torch; the engine's objects are built by
:meth:`CompressSpec.build`, which imports them when called.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, NamedTuple

from .defaults import (
    ALLOCATION,
    ALLOCATIONS,
    BATCH_SIZE,
    CODECS,
    CRATE,
    CRATE_DRIVEN,
    CRATE_KNOBS,
    EVALUATIONS,
    FIRST_LAST,
    FIRST_LAST_DEFAULT,
    GAMMA,
    ITERATIONS,
    LOG_EVERY,
    LR,
    METHODS,
    OBJECTIVES,
    POWER,
    SEARCH_METHODS,
    SEARCH_METHODS_TEXT,
    SETTING_KEYS,
    TARGET_KEYS,
)
from .errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from .compress import CompressResult
    from .data import Dataset
    from .methods import MethodSettings
    from .surgery import Target
    from .train import TrainConfig

_NUMBERS: dict[str, type[float] | type[int]] = {
    "compression": float, "max_accuracy_drop": float, "crate": float, "gamma": float, "power": float,
    "lr": float, "iter_stop": int, "iterations": int, "batch_size": int, "seed": int,
    "eval_every": int, "log_every": int, "checkpoint_every": int,
}  # fmt: skip


class EngineConfig(NamedTuple):
    """The engine's objects for one run (``target`` is None for the crate-driven method)."""

    target: Target | None
    settings: MethodSettings
    config: TrainConfig


@dataclass(frozen=True)
class CompressSpec:
    """One compression run's settings, checked; anything not given takes its default from :mod:`dns_core.defaults`.

    ``eval_every`` and ``log_every`` left at None follow the budget: :data:`EVALUATIONS`
    evaluations per run, and a progress report at least every :data:`LOG_EVERY` iterations (50
    per run when that is fewer).
    """

    method: str = "dns"
    # the target (ignored by the crate-driven method)
    compression: float | None = None
    layer_kept: Mapping[str, float] | None = None
    max_accuracy_drop: float | None = None
    # the method's knobs (the paper's names)
    # the crate-driven method's knobs; None: the defaults (given to another method, they are refused)
    crate: float | None = None
    crates: Mapping[str, float] | None = None
    gamma: float | None = None
    power: float | None = None
    iter_stop: int | None = None
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    allocation: str = ALLOCATION
    first_last: str = FIRST_LAST_DEFAULT
    # training
    iterations: int = ITERATIONS
    batch_size: int = BATCH_SIZE
    lr: float = LR
    objective: str = "ce"
    seed: int = 0
    device: str = "auto"
    eval_every: int | None = None
    log_every: int | None = None
    checkpoint_every: int = 0
    # the value codec of the extra compact sparse file, if any
    codec: str | None = None
    # how image data is prepared for the model (dns_core.images.Preprocess, as JSON)
    preprocess: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value, kind = getattr(self, f.name), _NUMBERS.get(f.name)
            if kind is not None and value is not None:
                if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                    raise ConfigError(f"{f.name} must be a number, got {value!r}")
                try:
                    number = kind(value)
                    finite = math.isfinite(float(value))
                except (ValueError, OverflowError):
                    raise ConfigError(f"{f.name} must be a number, got {value!r}") from None
                if not finite:
                    raise ConfigError(f"{f.name} must be a finite number, got {value!r}")
                object.__setattr__(self, f.name, number)
        for name in ("layer_kept", "crates"):
            object.__setattr__(self, name, _number_map(name, getattr(self, name)))
        for name in ("include", "exclude"):
            patterns = getattr(self, name)
            if isinstance(patterns, str) or not isinstance(patterns, (list, tuple)):
                raise ConfigError(f"{name} must be a list of layer names or glob patterns, got {patterns!r}")
            if not all(isinstance(p, str) and p for p in patterns):
                raise ConfigError(f"{name} must hold non-empty strings, got {list(patterns)!r}")
            object.__setattr__(self, name, tuple(patterns))
        if not self.include:
            raise ConfigError("include must name at least one layer pattern (all layers: ['*'])")
        _choose("method", self.method, METHODS)
        _choose("objective", self.objective, OBJECTIVES)
        _choose("allocation", self.allocation, ALLOCATIONS)
        _choose("first_last", self.first_last, FIRST_LAST)
        knobs = [k for k in CRATE_KNOBS if getattr(self, k) is not None]
        if knobs and self.method != CRATE_DRIVEN:
            raise ConfigError(
                f"{', '.join(knobs)} set(s) the thresholds of the {CRATE_DRIVEN} method only; method {self.method!r} "
                "reaches its target by itself: leave them out, or choose --method dns-fixed-crates"
            )
        if self.codec is not None:
            _choose("codec", self.codec, CODECS)
        if self.preprocess is not None:
            from .images import Preprocess  # torch-free: validates the setting only

            object.__setattr__(self, "preprocess", Preprocess.from_json(self.preprocess).to_json())

    @classmethod
    def from_json(cls, spec: Mapping[str, Any], **defaults: Any) -> CompressSpec:
        """The spec of a job stored as JSON: ``{"method": …, "target": {…}, "settings": {…}}``.

        A key left out or null takes its value from ``defaults`` (the caller's, such as the
        service's device and iteration budget), then from this class. Unknown keys are refused.
        """
        _known("job spec", spec, ("method", "target", "settings"))
        values = dict(defaults)
        for part, keys in (("target", TARGET_KEYS), ("settings", SETTING_KEYS)):
            given = spec.get(part) or {}
            if not isinstance(given, Mapping):
                raise ConfigError(f"{part} must be a JSON object, got {type(given).__name__}")
            _known(part, given, keys)
            values.update({k: v for k, v in given.items() if v is not None})
        if spec.get("method") is not None:
            values["method"] = spec["method"]
        return cls(**values)

    def target(self) -> Target | None:
        """What to reach; None for the crate-driven method. ConfigError if the target is incomplete."""
        if self.method == CRATE_DRIVEN:
            return None
        from .surgery import Target

        layer_kept = dict(self.layer_kept) if self.layer_kept is not None else None
        target = Target(compression=self.compression, layer_kept=layer_kept, max_accuracy_drop=self.max_accuracy_drop)
        if target.searching and self.method not in SEARCH_METHODS:
            raise ConfigError(
                f"method {self.method!r} needs a compression; the highest compression within a budget is searched "
                f"for by {SEARCH_METHODS_TEXT}"
            )
        return target

    def method_settings(self) -> MethodSettings:
        from .methods import MethodSettings

        return MethodSettings(
            crate=CRATE if self.crate is None else self.crate, crates=self.crates,
            gamma=GAMMA if self.gamma is None else self.gamma, power=POWER if self.power is None else self.power,
            iter_stop=self.iter_stop,
            include=self.include, exclude=self.exclude, allocation=self.allocation, first_last=self.first_last,
        )  # fmt: skip

    def train_config(self) -> TrainConfig:
        from .train import TrainConfig

        n = self.iterations
        return TrainConfig(
            iterations=n,
            batch_size=self.batch_size,
            lr=self.lr,
            objective=self.objective,
            seed=self.seed,
            device=self.device,
            eval_every=self.eval_every if self.eval_every is not None else max(n // EVALUATIONS, 1),
            log_every=self.log_every if self.log_every is not None else max(min(LOG_EVERY, n // 50), 1),
            checkpoint_every=self.checkpoint_every,
        )

    def build(self) -> EngineConfig:
        """The engine's objects; ConfigError (an InputError) if the settings cannot work together."""
        return EngineConfig(self.target(), self.method_settings(), self.train_config())

    def compress(self, model: nn.Module, train: Dataset, valid: Dataset, **kwargs: Any) -> CompressResult:
        """Run :func:`dns_core.compress.compress` with this spec (``kwargs``: test, callbacks, checkpoint)."""
        from .compress import compress

        target, settings, config = self.build()
        return compress(
            model, train, valid, method=self.method, target=target, config=config, settings=settings, **kwargs
        )


def _choose(what: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")


def _known(what: str, given: Mapping[str, Any], keys: tuple[str, ...]) -> None:
    unknown = sorted(str(k) for k in given if k not in keys)
    if unknown:
        raise ConfigError(f"unknown key(s) in the {what}: {', '.join(unknown)}; known: {', '.join(keys)}")


def _number_map(what: str, value: object) -> dict[str, float] | None:
    """``{name: number}`` as a plain dict of floats; ConfigError for anything else."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ConfigError(f"{what} must map layer names to numbers, got {type(value).__name__}")
    out = {}
    for name, number in value.items():
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ConfigError(f"{what}[{name!r}] must be a number, got {number!r}")
        out[str(name)] = float(number)
    return out
