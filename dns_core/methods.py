"""One constructor for every method the product offers, with the schedule each one uses.

All methods share the training loop, data, optimizer and learning-rate schedule; only the way
masks change differs. The schedule fractions below are the same for DNS and AGP so that the
comparison isolates what splicing adds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from torch import nn

from .surgery import DNS, Ramp, ScheduledSurgery, Surgery, SurgeryError, Target

METHODS = ("dns", "dns-fixed-crates", "han", "one-shot", "agp")


@dataclass
class Schedule:
    """Fractions of the iteration budget.

    ``ramp_end``: the kept count reaches the target (cubic ramp from dense, or Han's rounds).
    ``surgery_end``: DNS keeps pruning and splicing at the final count until here, then masks
    freeze and the rest of the budget is recovery. ``interval``: iterations between mask updates.
    """

    ramp_start: float = 0.0
    ramp_end: float = 0.5
    surgery_end: float = 0.7
    interval: int = 50
    han_rounds: int = 5


@dataclass
class MethodSettings:
    """Expert knobs; anything left at None takes the method's default."""

    crate: float = 1.0
    crates: Mapping[str, float] | None = None
    gamma: float = 1e-4
    power: float = 1.0
    iter_stop: int | None = None
    phases: Sequence[str] | None = None
    include: Sequence[str] = ("*",)
    exclude: Sequence[str] = ()
    prune_bias: bool = True
    min_layer_kept: float = 0.0
    schedule: Schedule = field(default_factory=Schedule)


def make_surgery(
    method: str,
    model: nn.Module,
    iterations: int,
    target: Target | None,
    settings: MethodSettings | None = None,
    seed: int = 0,
) -> Surgery:
    """Attach the masks of ``method`` to ``model`` (in place) for a run of ``iterations``."""
    s = settings or MethodSettings()
    sched = s.schedule
    if method == "dns-fixed-crates":
        iter_stop = s.iter_stop if s.iter_stop is not None else int(sched.surgery_end * iterations)
        phase_length = iter_stop // len(s.phases) if s.phases else None
        return DNS(
            model, crate=s.crate, crates=s.crates, gamma=s.gamma, power=s.power, iter_stop=iter_stop,
            phases=s.phases, phase_length=phase_length, include=s.include, exclude=s.exclude,
            prune_bias=s.prune_bias, seed=seed,
        )  # fmt: skip
    if method not in METHODS:
        raise SurgeryError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if target is None:
        raise SurgeryError(f"method {method!r} needs a target (compression or per-layer kept fractions)")
    t0 = int(sched.ramp_start * iterations)
    t1 = max(int(sched.ramp_end * iterations), t0)

    def scheduled(ramp: Ramp, splice: bool, iter_stop: int | None = None, normalize: str = "none") -> Surgery:
        return ScheduledSurgery(
            model, target, ramp=ramp, interval=sched.interval, iter_stop=iter_stop, splice=splice,
            normalize=normalize, min_layer_kept=s.min_layer_kept, method=method, include=s.include,
            exclude=s.exclude, prune_bias=s.prune_bias, seed=seed,
        )  # fmt: skip

    if method == "dns":
        stop = s.iter_stop if s.iter_stop is not None else max(int(sched.surgery_end * iterations), t1 + 1)
        return scheduled(Ramp(t0, t1, "cubic"), splice=True, iter_stop=stop)
    if method == "agp":
        return scheduled(Ramp(t0, t1, "cubic"), splice=False)
    if method == "han":
        return scheduled(Ramp(t0, t1, "steps", rounds=sched.han_rounds), splice=False, normalize="std")
    # one-shot: global magnitude cut at the start, then fine-tuning with fixed masks
    return scheduled(Ramp(t0, t0, "one-shot"), splice=False)
