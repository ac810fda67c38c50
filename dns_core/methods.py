"""One constructor for every method the product offers, with the schedule each one uses.

All methods share the training loop, data, optimizer and learning-rate schedule; only the way
masks change differs, and when. Each method gets the schedule it does best with
(:data:`SCHEDULES`): splicing lets DNS reach its target in the first 30% of the budget and recover
for the last half, where gradual magnitude pruning, whose cuts are final, does better with the
slower ramp over the first half (measured on LeNet-300-100, docs/benchmarks.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from .defaults import (
    ALLOCATION,
    ALLOCATIONS,
    BALANCE,
    CRATE,
    CRATE_DRIVEN,
    EDGE_SHARE,
    FIRST_LAST,
    FIRST_LAST_DEFAULT,
    GAMMA,
    METHODS,
    POWER,
    SEARCH_METHODS,
    SEARCH_METHODS_TEXT,
    SEARCH_NOMINAL,
)
from .surgery import DNS, Ramp, ScheduledSurgery, Surgery, SurgeryError, Target, first_and_last, select_layers


@dataclass
class Schedule:
    """Fractions of the iteration budget.

    ``ramp_end``: the kept count reaches the target (cubic ramp from dense, or Han's rounds).
    ``surgery_end``: DNS keeps pruning and splicing at the final count until here, then masks
    freeze and the rest of the budget is recovery. ``interval``: iterations between mask updates,
    at most. ``ramp_updates``: the fewest mask updates the ramp gets; a ramp shorter than
    ``ramp_updates × interval`` iterations updates the masks more often (see :meth:`update_interval`).
    """

    ramp_start: float = 0.0
    ramp_end: float = 0.5
    surgery_end: float = 0.7
    interval: int = 50
    han_rounds: int = 5
    ramp_updates: int = 0

    def update_interval(self, ramp_length: int) -> int:
        """Iterations between mask updates for a ramp of ``ramp_length`` iterations.

        ``interval``, shortened (down to every iteration) where the ramp would otherwise get fewer
        than ``ramp_updates`` updates; ``ramp_updates=0`` keeps ``interval`` for any ramp.
        """
        if self.ramp_updates <= 0 or ramp_length <= 0:
            return self.interval
        return max(1, min(self.interval, ramp_length // self.ramp_updates))


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
    allocation: str = ALLOCATION  # see ALLOCATIONS (target-driven methods but Han's, which is per layer)
    first_last: str = FIRST_LAST_DEFAULT  # the first convolution and the head: "auto", "dense" or "prune"
    schedule: Schedule | None = None  # None: the method's own, SCHEDULES


#: Each method's default schedule. DNS: a 3-seed sweep on LeNet-300-100 at 50x gave a mean test
#: drop of 0.38 points with the ramp over 30% and surgery until 50%, against 0.66 at the 50%/70% once shared;
#: AGP at 40x did worse with the 30% ramp (0.68 against 0.53). A short DNS ramp with few mask
#: updates cuts a large share at each and splicing cannot follow: the bench ViT at 18.19x over
#: 1,200 iterations lost 2.50 validation points with 7 updates on its ramp, 0.98 with 72
#: (docs/benchmarks.md), so DNS's ramp gets at least :data:`DNS_RAMP_UPDATES`. AGP keeps Zhu &
#: Gupta's fixed interval.
DNS_RAMP_UPDATES = 64
SCHEDULES: dict[str, Schedule] = {"dns": Schedule(ramp_end=0.3, surgery_end=0.5, ramp_updates=DNS_RAMP_UPDATES)}


def default_schedule(method: str) -> Schedule:
    return SCHEDULES.get(method, Schedule())


def unread_schedule_fields(method: str) -> tuple[str, ...]:
    """The :class:`Schedule` fields ``method`` does not read: masks splice on to ``surgery_end``
    only under DNS's rules (AGP's, Han's and one-shot's stop changing where their ramp ends), and
    only Han's ramp comes in ``han_rounds``."""
    unread = []
    if method not in ("dns", CRATE_DRIVEN):
        unread.append("surgery_end")
    if method != "han":
        unread.append("han_rounds")
    return tuple(unread)


def dense_edges(
    method: str,
    model: nn.Module,
    target: Target | None,
    settings: MethodSettings,
    example: torch.Tensor | None = None,
) -> list[str]:
    """The selected layers among the first convolution and the classifier head that stay dense.

    ``first_last="dense"``: both (when they are selected); ``"prune"``: none. ``"auto"``: with an
    overall compression target, the smaller first, each as long as the ones kept dense take at most
    :data:`~dns_core.defaults.EDGE_SHARE` of the weights the target keeps; the crate-driven
    method and per-layer kept fractions prune them, as asked. Never all the selected layers.
    ``example`` (one batch of inputs) finds them in the order the forward pass runs the layers.
    """
    if settings.first_last not in FIRST_LAST:
        raise SurgeryError(f"unknown first_last {settings.first_last!r}; choose one of {', '.join(FIRST_LAST)}")
    if settings.first_last == "prune":
        return []
    selected = dict(select_layers(model, settings.include, settings.exclude))
    edges = [name for name in first_and_last(model, example) if name in selected]
    if len(edges) >= len(selected):
        return []
    if settings.first_last == "dense":
        return edges
    if method == CRATE_DRIVEN or target is None or target.compression is None:
        return []
    sizes = {name: sum(p.numel() for p in selected[name].parameters(recurse=False)) for name in edges}
    total = sum(p.numel() for p in model.parameters())
    selected_total = sum(p.numel() for m in selected.values() for p in m.parameters(recurse=False))
    kept_budget = math.floor(total / target.compression) - (total - selected_total)
    dense: list[str] = []
    used = 0
    for name in sorted(edges, key=lambda n: sizes[n]):
        if used + sizes[name] > EDGE_SHARE * kept_budget:
            break
        dense.append(name)
        used += sizes[name]
    return [name for name in edges if name in dense]


def make_surgery(
    method: str,
    model: nn.Module,
    iterations: int,
    target: Target | None,
    settings: MethodSettings | None = None,
    seed: int = 0,
    example: torch.Tensor | None = None,
) -> Surgery:
    """Attach the masks of ``method`` to ``model`` (in place) for a run of ``iterations``.

    The first convolution and the classifier head are left out as :func:`dense_edges` decides;
    the surgery's ``left_dense`` names them. A target that is only a budget (``target.searching``)
    gives a surgery aimed at :data:`~dns_core.defaults.SEARCH_NOMINAL` for a
    :class:`dns_core.search.BudgetSearch` to retarget.
    """
    s = settings or MethodSettings()
    if target is not None and target.searching:
        if method not in SEARCH_METHODS:
            raise SurgeryError(
                f"method {method!r} needs a compression; the highest compression within a budget is searched "
                f"for by {SEARCH_METHODS_TEXT}"
            )
        total = sum(p.numel() for p in model.parameters())
        selected = sum(p.numel() for _, m in select_layers(model, s.include, s.exclude) for p in m.parameters(False))
        if selected == 0:
            raise SurgeryError("no layer is selected for pruning")
        ceiling = total / (total - selected + 1)  # every selected weight but one pruned
        nominal = min(SEARCH_NOMINAL, max(1.0, 0.9 * ceiling))
        target = Target(compression=nominal, max_accuracy_drop=target.max_accuracy_drop)
    edges = dense_edges(method, model, target, s, example)
    if edges:
        s = replace(s, exclude=(*s.exclude, *edges))
    surgery = _make_surgery(method, model, iterations, target, s, seed)
    surgery.left_dense = edges
    return surgery


def _make_surgery(
    method: str, model: nn.Module, iterations: int, target: Target | None, s: MethodSettings, seed: int
) -> Surgery:
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
    interval = sched.update_interval(t1 - t0)

    if s.allocation not in ALLOCATIONS:
        raise SurgeryError(f"unknown allocation {s.allocation!r}; choose one of {', '.join(ALLOCATIONS)}")
    per_layer = "std" if s.allocation == "layer" else "none"
    uniform = s.allocation == "uniform"
    balance = BALANCE if s.allocation == "balanced" else None

    def scheduled(ramp: Ramp, splice: bool, iter_stop: int | None = None, normalize: str = per_layer) -> Surgery:
        return ScheduledSurgery(
            model, target, ramp=ramp, interval=interval, iter_stop=iter_stop, splice=splice,
            normalize=normalize, uniform=uniform and normalize == per_layer,
            balance=balance if normalize == per_layer else None, min_layer_kept=s.min_layer_kept,
            method=method, include=s.include, exclude=s.exclude, prune_bias=s.prune_bias, seed=seed,
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
