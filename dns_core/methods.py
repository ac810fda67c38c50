"""One constructor for every method the product offers, with the schedule each one uses.

All methods share the training loop, data, optimizer and learning-rate schedule; only the way
masks change differs, and when. Each method gets the schedule it does best with
(:data:`SCHEDULES`): splicing lets DNS reach its target in the first 30% of the budget and recover
for the last half, where gradual magnitude pruning, whose cuts are final, does better with the
slower ramp over the first half (measured on LeNet-300-100, docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from .defaults import ALLOCATION, ALLOCATIONS, CRATE, CRATE_DRIVEN, GAMMA, METHODS, POWER
from .surgery import DNS, Ramp, ScheduledSurgery, Surgery, SurgeryError, Target


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

    crate: float = CRATE
    crates: Mapping[str, float] | None = None
    gamma: float = GAMMA
    power: float = POWER
    iter_stop: int | None = None
    phases: Sequence[str] | None = None
    include: Sequence[str] = ("*",)
    exclude: Sequence[str] = ()
    prune_bias: bool = True
    min_layer_kept: float = 0.0
    allocation: str = ALLOCATION  # "global" or "layer" (target-driven methods but Han's, which is per layer)
    schedule: Schedule | None = None  # None: the method's own, SCHEDULES


#: Each method's default schedule. DNS: a 3-seed sweep on LeNet-300-100 at 50x gave a mean test
#: drop of 0.38 points with the ramp over 30% and surgery until 50%, against 0.66 at the 50%/70% once shared;
#: AGP at 40x did worse with the 30% ramp (0.68 against 0.53).
SCHEDULES: dict[str, Schedule] = {"dns": Schedule(ramp_end=0.3, surgery_end=0.5)}


def default_schedule(method: str) -> Schedule:
    return SCHEDULES.get(method, Schedule())


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
    sched = s.schedule or default_schedule(method)
    if method == CRATE_DRIVEN:
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

    if s.allocation not in ALLOCATIONS:
        raise SurgeryError(f"unknown allocation {s.allocation!r}; choose one of {', '.join(ALLOCATIONS)}")
    per_layer = "std" if s.allocation == "layer" else "none"

    def scheduled(ramp: Ramp, splice: bool, iter_stop: int | None = None, normalize: str = per_layer) -> Surgery:
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
