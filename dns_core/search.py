"""The highest compression within an accuracy budget, searched for in one run.

A job that gives only ``max_accuracy_drop`` climbs a ladder of *rungs* instead of aiming at one
compression. Each rung starts from the last state that held the budget, ramps the kept count to a
higher compression (DNS keeps pruning and splicing for a while after the ramp, as in a
target-driven run), and ends with a recovery whose learning rate decays to zero, so that the
strict evaluation at the rung's end judges a finished model, not a mid-run one at a high learning
rate. Each rung is ``growth`` times longer than the one before: low compressions are cheap to
reach, high ones need the time. The first rung, from the reference to 2x, runs at a tenth of the
learning rate (``first_lr``), so that fine-tuning starts near where the reference's schedule ended;
one evaluation in it, before its ramp passes 1.5x, shows what the restart costs.

- Within budget on validation: the state is a point of the *frontier* and a candidate (the
  ``keep`` highest compressions stay), and the next rung climbs by ``step``.
- Over budget: the state of the last rung that held comes back (DNS with ``splice_back``
  instead retargets down from where it is, splicing weights back), the step shrinks to its square
  root (not under ``resolution``), and the next rung climbs from there by the smaller step. With
  ``regrow``, each rung that holds squares the step again, up to ``step``.

The result is the highest compression that held. When no rung from ``floor`` up holds, the last
rung's state is handed over and the run says it missed the budget.

A job that asks for a compression *and* a budget climbs the same ladder with the asked compression
as its ceiling (``cap``): the path is the budget-only run's until the next aim would pass the cap,
which is then aimed at exactly. Once a rung at the ceiling holds, what is left of the run becomes
one last rung at the same compression, and the more accurate of the two (on validation) is the
result, so a job uses the iterations it was given. The job lands on the asked compression when a
rung there holds the budget, and otherwise on the highest one below it that did, never on a
state judged mid-run. After a miss at the cap, the next aim is halfway (geometrically) between
what held and the cap. A capped search with too few iterations for every rung climbs in fewer,
the first one higher, so that the ladder still reaches the cap.
"""

from __future__ import annotations

import bisect
import copy
import itertools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .errors import ConfigError
from .surgery import ScheduledSurgery
from .train import Controller, TrainConfig

#: the fewest iterations a rung may have
MIN_RUNG = 20
#: a rung that lands this close below the ceiling (relatively) has reached it (kept counts are whole)
CEILING_TOLERANCE = 0.005


@dataclass
class FrontierPoint:
    """One rung's strict evaluation: the compression, validation and test accuracy, and the verdict."""

    rung: int
    iteration: int
    compression: float
    val_acc: float
    test_acc: float | None
    within_budget: bool


@dataclass
class SearchSettings:
    """The ladder's shape; rung fractions are of one rung's iterations."""

    rungs: int = 8  # the iteration budget is cut into this many rungs
    growth: float = 1.25  # each rung this many times longer than the one before
    first: float = 2.0  # the first rung's compression
    step: float = 2.0  # the climb per rung until a rung misses the budget
    resolution: float = 1.1  # the smallest climb
    floor: float = 2.0  # below this compression a run is not worth handing over
    warmup: float = 0.05  # linear warm-up of the learning rate at the start of each rung
    #: the first rung's peak learning rate, relative to the run's, when it climbs no higher than ``first`` and
    #: rungs follow it: halving a converged model needs little recovery, and a full restart knocks it out of its minimum
    first_lr: float = 0.1
    #: the peak learning rate of every later rung, relative to the run's
    rung_lr: float = 1.0
    check: float = 1.5  # one evaluation in the first rung, just before its ramp passes this compression
    ramp: float = 0.4  # the kept count reaches the rung's compression here
    surgery: float = 0.6  # DNS prunes and splices at that count until here; then the masks freeze
    keep: int = 3  # candidates kept (the highest compressions within budget)
    splice_back: bool = False  # DNS: after a miss, retarget down from the state reached instead of rolling back
    #: after a rung that holds, the step grows back to its square (not over ``step``): one miss on a noisy
    #: verdict does not slow the rest of the climb
    regrow: bool = False
    #: a later rung may aim again at a compression that missed the budget (its state judged again on the same
    #: validation images); off, later aims stay below the lowest miss (halfway between it and what held, at
    #: least ``resolution`` up), and when no such climb fits the rest of the run polishes what held
    retry_missed: bool = True

    def __post_init__(self) -> None:
        if self.rungs < 1 or self.keep < 1:
            raise ConfigError("a budget search needs at least one rung and one candidate")
        if not (self.step > 1 and self.resolution > 1 and self.first >= 1 and self.floor >= 1 and self.growth > 0):
            raise ConfigError("the search's step and resolution must be above 1, first and floor at least 1")
        if not 0 <= self.warmup < self.ramp <= self.surgery <= 1:
            raise ConfigError("rung fractions must satisfy 0 ≤ warmup < ramp ≤ surgery ≤ 1")
        if not 0 < self.first_lr <= 1:
            raise ConfigError("the first rung's learning rate is a fraction of the run's, in (0, 1]")
        if not 0 < self.rung_lr <= 4:
            raise ConfigError("the later rungs' learning rate is a multiple of the run's, in (0, 4]")


def _rung_bounds(iterations: int, rungs: int, growth: float) -> tuple[list[int], int]:
    """The first iteration of each rung and the end of the last, and the shortest rung's length."""
    weights = [growth**r for r in range(rungs)]
    ends = [round(iterations * sum(weights[: r + 1]) / sum(weights)) for r in range(rungs)]
    bounds = [0, *ends]  # rung r runs over [bounds[r], bounds[r + 1])
    return bounds, min(b - a for a, b in itertools.pairwise(bounds))


def _passes(surgery: ScheduledSurgery, compression: float) -> int | None:
    """The first mask update of the current ramp that takes the model past ``compression`` (None: none does)."""
    ramp = surgery.ramp
    total = surgery.model_total()
    other = total - surgery.prunable_total()
    for u in sorted({*range(ramp.t0, ramp.t1 + 1, surgery.interval), ramp.t1}):
        kept = round(ramp.kept(u, surgery.start_kept, surgery.final_kept))
        if total / (other + kept) > compression:
            return u  # evaluated after u iterations: before that update
    return None


def _best_per_compression(
    candidates: list[tuple[FrontierPoint, dict[str, Any]]],
) -> list[tuple[FrontierPoint, dict[str, Any]]]:
    """One candidate per compression (the most accurate on validation), the highest compression first."""
    best: dict[float, tuple[FrontierPoint, dict[str, Any]]] = {}
    for point, state in candidates:
        held = best.get(point.compression)
        if held is None or point.val_acc > held[0].val_acc:
            best[point.compression] = (point, state)
    return sorted(best.values(), key=lambda c: c[0].compression, reverse=True)


class BudgetSearch(Controller):
    """Drives ``surgery`` up the ladder of compressions within ``max_drop`` of ``reference_acc``.

    ``evaluate_test`` (optional) gives the test accuracy of the model as it stands, for the frontier.
    """

    def __init__(
        self,
        surgery: ScheduledSurgery,
        reference_acc: float,
        max_drop: float,
        iterations: int,
        *,
        settings: SearchSettings | None = None,
        evaluate_test: Callable[[], float | None] | None = None,
        cap: float | None = None,
    ) -> None:
        self.surgery = surgery
        self.reference_acc = reference_acc
        self.max_drop = max_drop
        self.s = settings or SearchSettings()
        if cap is not None and cap < 1:
            raise ConfigError(f"a search's cap is a compression of at least 1, got {cap}")
        # a search toward an asked compression climbs in as many rungs as its iterations allow
        fits = [r for r in range(self.s.rungs, 0, -1) if _rung_bounds(iterations, r, self.s.growth)[1] >= MIN_RUNG]
        self.rungs = self.s.rungs if cap is None else (fits[0] if fits else 1)
        self.bounds, shortest = _rung_bounds(iterations, self.rungs, self.s.growth)
        if shortest < MIN_RUNG and cap is None:
            weights = [self.s.growth**r for r in range(self.rungs)]
            needed = math.ceil(MIN_RUNG * sum(weights) / min(weights))
            raise ConfigError(
                f"a budget search needs at least {needed} iterations ({self.rungs} rungs of at least {MIN_RUNG}); "
                f"{iterations} were given"
            )
        self.evaluate_test = evaluate_test
        self.frontier: list[FrontierPoint] = []
        self.candidates: list[tuple[FrontierPoint, dict[str, Any]]] = []  # best first
        self.held = 1.0  # the highest compression that held the budget (1: the reference)
        self.missed = math.inf  # the lowest compression judged over budget
        self.step = self.s.step
        self.good: dict[str, Any] | None = None  # the state to climb from (None: the reference's)
        self.done = False
        self.polished = False  # the rest of the run went into one rung at the ceiling, once it held
        self.backoffs = 0
        other = surgery.model_total() - surgery.prunable_total()
        self.ceiling = surgery.model_total() / (other + 1)  # one selected weight left
        if cap is not None:
            self.ceiling = min(self.ceiling, cap)
        # fewer rungs than the ladder's (a capped search short of iterations) start higher, so that
        # doubling from the first still reaches the ceiling
        first = self.s.first
        if self.rungs < self.s.rungs:
            first = max(first, self.ceiling / self.s.step ** (self.rungs - 1))
        self.aim = min(first, self.ceiling)
        # a first rung that only halves the model, with rungs after it, starts gently; a capped search that
        # starts higher, or is a single rung, needs the full rate
        self.first_scale = self.s.first_lr if self.rungs > 1 and self.aim <= self.s.first else 1.0
        self._start_rung(0)
        self.check_at = _passes(surgery, self.s.check)  # the first rung's early evaluation

    # -- the schedule of one rung ------------------------------------------------------------------

    def _rung(self, t: int) -> int:
        """The rung that iteration ``t`` belongs to (the number of rungs, past the last)."""
        return bisect.bisect_right(self.bounds, t) - 1

    def lr_at(self, t: int, cfg: TrainConfig) -> float:
        r = min(self._rung(t), self.rungs - 1)
        length = self.bounds[r + 1] - self.bounds[r]
        offset = t - self.bounds[r]
        warm = int(self.s.warmup * length)
        peak = cfg.lr * (self.first_scale if r == 0 else self.s.rung_lr)
        if offset < warm:
            return peak * (offset + 1) / (warm + 1)
        span = max(length - warm, 1)
        return 0.5 * peak * (1 + math.cos(math.pi * min((offset - warm + 1) / span, 1.0)))

    def evaluates_at(self, done: int, cfg: TrainConfig) -> bool:
        return done in self.bounds[1:] or done == self.check_at or super().evaluates_at(done, cfg)

    def finished(self, done: int) -> bool:
        return self.done

    def _start_rung(self, t: int) -> None:
        r = self._rung(t)
        length = self.bounds[r + 1] - self.bounds[r]
        surgery = self.surgery
        surgery.retarget(t, self.aim, t + int(self.s.ramp * length))
        if surgery.splice:
            surgery.iter_stop = max(t + int(self.s.surgery * length), surgery.ramp.t1 + 1)

    # -- decisions at the end of each rung -----------------------------------------------------------

    def _snapshot(self, model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
        return copy.deepcopy(
            {"model": model.state_dict(), "optimizer": opt.state_dict(), "surgery": self.surgery.state_dict()}
        )

    def _restore(self, state: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer) -> None:
        state = copy.deepcopy(state)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        self.surgery.load_state_dict(state["surgery"])

    def observe(self, t: int, val_acc: float, model: nn.Module, opt: torch.optim.Optimizer, total: int) -> bool:
        if t not in self.bounds[1:] or self.done:
            return False  # a progress evaluation inside a rung: no decision
        rung = self._rung(t) - 1
        point = FrontierPoint(
            rung=rung,
            iteration=t,
            compression=self.surgery.compression(),
            val_acc=val_acc,
            test_acc=self.evaluate_test() if self.evaluate_test is not None else None,
            within_budget=self.reference_acc - val_acc <= self.max_drop,
        )
        self.frontier.append(point)
        rolled_back = False
        if point.within_budget:
            self.held = max(self.held, point.compression)
            if self.s.regrow:
                self.step = min(self.step**2, self.s.step)
            self.good = self._snapshot(model, opt)
            self.candidates = _best_per_compression([*self.candidates, (point, self.good)])[: self.s.keep]
        else:
            self.backoffs += 1
            self.missed = min(self.missed, point.compression)
            self.step = max(math.sqrt(self.step), self.s.resolution)
            if self.good is not None and not (self.s.splice_back and self.surgery.splice):
                self._restore(self.good, model, opt)
                rolled_back = True
            if self.good is None and point.compression <= self.s.floor * self.s.resolution:
                self.done = True  # nothing from the floor up holds the budget
        aim = min(max(self.held * self.step, self.s.floor), self.ceiling)
        missed_ceiling = self.aim >= self.ceiling and not point.within_budget
        if missed_ceiling and aim >= self.ceiling:
            aim = math.sqrt(max(self.held, 1.0) * self.ceiling)  # not the missed ceiling again: halfway there
        boxed_in = False  # no climb of at least the resolution fits below the lowest miss
        below = self.missed * (1 - CEILING_TOLERANCE)
        if not self.s.retry_missed and (aim >= below or missed_ceiling):  # a missed ceiling is a miss: finite
            # below the lowest miss: halfway there, but at least the smallest climb
            aim = max(math.sqrt(max(self.held, 1.0) * self.missed), self.held * self.s.resolution)
            boxed_in = aim >= below
        if rung + 1 >= self.rungs:
            self.done = True  # that was the last rung
        if boxed_in and self.good is not None and not self.done:
            self._polish(rung)  # no climb fits under the lowest miss
            aim = self.held
        elif self.held >= self.ceiling * (1 - CEILING_TOLERANCE) and not self.done:
            self._polish(rung)  # the ceiling held
        elif missed_ceiling and self.held * self.s.resolution >= self.ceiling:
            self.done = True  # the ceiling missed and no climb fits between it and what held
        if not self.done:
            self.aim = aim
            self._start_rung(t)
        return rolled_back

    def _polish(self, rung: int) -> None:
        """What is left of the run becomes one last rung at the compression that held (the more accurate of
        the two states is the result); a second call, once that rung is spent, ends the search."""
        if self.polished:
            self.done = True
            return
        self.polished = True
        self.bounds = [*self.bounds[: rung + 2], self.bounds[-1]]
        self.rungs = len(self.bounds) - 1

    def finish(self, val_acc: float, model: nn.Module, opt: torch.optim.Optimizer) -> bool:
        """The result is the best candidate: the highest compression that held the budget."""
        if not self.candidates:
            return False
        self._restore(self.candidates[0][1], model, opt)
        return True

    def points(self) -> list[dict[str, Any]]:
        return [asdict(p) for p in self.frontier]

    def chosen(self) -> FrontierPoint | None:
        return self.candidates[0][0] if self.candidates else None

    def candidate_states(self) -> list[tuple[FrontierPoint, dict[str, Any]]]:
        """The kept candidates, best first: each point with its model and surgery state."""
        return list(self.candidates)

    def summary(self) -> dict[str, Any]:
        """The frontier for the report: every point, and the chosen one."""
        chosen = self.chosen()
        return {
            "max_accuracy_drop": self.max_drop,
            "reference_val_acc": self.reference_acc,
            "rungs": [b - a for a, b in zip(self.bounds, self.bounds[1:], strict=False)],
            "points": [asdict(p) for p in self.frontier],
            "chosen": asdict(chosen) if chosen is not None else None,
        }

    def state_dict(self) -> dict[str, Any]:
        good_index = self._good_index()
        return {
            "frontier": [asdict(p) for p in self.frontier],
            "candidates": [(asdict(p), state) for p, state in self.candidates],
            "held": self.held,
            "missed": None if math.isinf(self.missed) else self.missed,
            "step": self.step,
            # the state to climb from is usually a candidate's too: stored once (checkpoints refuse shared tensors)
            "good": None if good_index is not None else self.good,
            "good_index": good_index,
            "done": self.done,
            "polished": self.polished,
            "bounds": list(self.bounds),
            "backoffs": self.backoffs,
            "aim": self.aim,
        }

    def _good_index(self) -> int | None:
        return next((i for i, (_, state) in enumerate(self.candidates) if state is self.good), None)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.frontier = [FrontierPoint(**p) for p in state["frontier"]]
        self.candidates = [(FrontierPoint(**p), s) for p, s in state["candidates"]]
        self.held = float(state["held"])
        missed = state.get("missed")
        self.missed = math.inf if missed is None else float(missed)
        self.step = float(state["step"])
        self.backoffs = int(state["backoffs"])
        self.aim = float(state["aim"])
        index = state["good_index"]
        self.good = state["good"] if index is None else self.candidates[int(index)][1]
        self.done = bool(state["done"])
        self.polished = bool(state.get("polished", False))
        self.bounds = [int(b) for b in state.get("bounds", self.bounds)]
        self.rungs = len(self.bounds) - 1
