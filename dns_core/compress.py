"""Compression as one plain function: a dense model and data in, a pruned model and a report out.

The command line, the benchmarks and the service's worker all call :func:`compress`, through
:meth:`dns_core.spec.CompressSpec.compress`, which builds its settings from a job spec.
"""

from __future__ import annotations

import copy
import platform
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import numerics
from .data import Dataset
from .defaults import SEARCH_METHODS
from .errors import ConfigError
from .methods import MethodSettings, default_schedule, make_surgery, unread_schedule_fields
from .search import CEILING_TOLERANCE, BudgetSearch, SearchSettings
from .surgery import ScheduledSurgery, Surgery, Target
from .train import (
    Callbacks,
    Progress,
    TrainConfig,
    agreement,
    evaluate,
    fit,
    recalibrate_batchnorm,
    resolve_device,
)

#: At most this many points of the training history go into the report.
HISTORY_POINTS = 200


@dataclass
class Candidate:
    """Another point of a budget search's frontier, as a model of its own (squashed, W ⊙ T)."""

    compression: float
    val_acc: float | None
    test_acc: float | None
    model: nn.Module  # squashed, like the chosen model


@dataclass
class CompressResult:
    model: nn.Module  # squashed: plain modules holding W ⊙ T
    report: dict[str, Any] = field(default_factory=dict)
    #: a budget search's other candidates (the next-highest compressions within budget), best first
    candidates: list[Candidate] = field(default_factory=list)


def _accuracy(model: nn.Module, data: Dataset | None, teacher: nn.Module | None) -> float | None:
    if data is None:
        return None
    if data.targets is not None:
        return evaluate(model, data)
    return agreement(model, teacher, data) if teacher is not None else None


def compress(
    model: nn.Module,
    train: Dataset,
    valid: Dataset,
    *,
    method: str = "dns",
    target: Target | None = None,
    config: TrainConfig,
    settings: MethodSettings | None = None,
    test: Dataset | None = None,
    callbacks: Callbacks | None = None,
    checkpoint: str | Path | None = None,
    search: SearchSettings | None = None,
    reference_acc: tuple[float | None, float | None] | None = None,
) -> CompressResult:
    """Run ``method`` on ``model`` (converged, dense) and return the pruned model and a report.

    Without labels in ``train`` the objective is label-free self-distillation from the dense
    model, and "accuracy" is top-1 agreement with it. A target that is only an accuracy budget
    runs a :class:`~dns_core.search.BudgetSearch` shaped by ``search``. ``reference_acc``: the dense
    model's accuracy on ``valid`` and ``test``, where the caller has measured them (a bench that
    compresses one reference many times); else they are measured here.
    """
    if train.targets is None and config.objective == "ce":
        config = TrainConfig(**{**asdict(config), "objective": "distill"})
    device = next(model.parameters()).device
    teacher = copy.deepcopy(model).eval() if config.objective != "ce" or valid.targets is None else None
    if reference_acc is not None:
        ref_val, ref_test = reference_acc
    else:
        ref_val, ref_test = _accuracy(model, valid, teacher), _accuracy(model, test, teacher)
    example = train.inputs[:2].to(device) if len(train) else None
    surgery = make_surgery(method, model, config.iterations, target, settings, seed=config.seed, example=example)
    budget: BudgetSearch | None = None
    labelled = ref_val is not None and valid.targets is not None
    if target is not None and target.searching and not labelled:
        raise ConfigError("a job with only an accuracy budget needs labelled validation data to search with")
    if target is not None and target.max_accuracy_drop is not None and labelled and _holds_budget(method, target):
        assert isinstance(surgery, ScheduledSurgery) and ref_val is not None
        budget = BudgetSearch(
            surgery, ref_val, target.max_accuracy_drop, config.iterations, settings=search,
            evaluate_test=(lambda: evaluate(model, test)) if test is not None and test.targets is not None else None,
            cap=target.compression,
        )  # fmt: skip
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = fit(
        model,
        train,
        config,
        surgery=surgery,
        valid=valid,
        teacher=teacher,
        budget=budget,
        callbacks=callbacks,
        checkpoint=checkpoint,
    )
    layers = surgery.report()
    total = surgery.model_total()
    nonzero = surgery.nonzero()
    others = _other_candidates(budget, model, surgery) if isinstance(budget, BudgetSearch) else []
    surgery.squash()
    model.to(device)
    if teacher is not None:
        teacher.to(device)
    val_acc: float | None
    same_kernels = resolve_device(config.device).type == device.type  # fit measured on the device measured on here
    if valid.targets is not None and result.val_acc is not None and same_kernels:
        val_acc = result.val_acc  # squashing keeps the function (W ⊙ T stored as W): fit's last evaluation holds
    else:
        val_acc = _accuracy(model, valid, teacher)
    batchnorm = _recalibrate(model, train, valid, teacher, config, val_acc)
    if batchnorm is not None:
        val_acc = batchnorm["val_acc"]
    test_acc = _accuracy(model, test, teacher)
    candidates = [_candidate(model, c, train, valid, test, teacher, config) for c in others]
    budget_met = (
        None
        if target is None or target.max_accuracy_drop is None or ref_val is None or val_acc is None
        else ref_val - val_acc <= target.max_accuracy_drop
    )
    report = {
        "method": method,
        "target": asdict(target) if target is not None else None,
        "total_parameters": total,
        "nonzero_parameters": nonzero,
        "compression": total / max(nonzero, 1),
        "layers": [
            {"name": r.name, "kept": r.kept, "total": r.total, "kept_fraction": r.kept_fraction} for r in layers
        ],
        # the first convolution and the classifier head, where they were kept out of the selection
        "left_dense": list(surgery.left_dense),
        "reference_val_acc": ref_val,
        "val_acc": val_acc,
        "reference_test_acc": ref_test,
        "test_acc": test_acc,
        "iterations": result.iterations,
        "seconds": result.seconds,
        "backoffs": result.backoffs,
        # the accuracy budget on validation data: met, broken, or None when there was none to check
        "budget_met": budget_met,
        "restored_last_good": result.restored_last_good,
        # BatchNorm statistics re-estimated on the pruned model: validation accuracy before and after
        "batchnorm": batchnorm,
        "peak_memory": _peak_memory(device),
        # micro-batches per batch at the end (more than asked when a batch ran out of CUDA memory)
        "micro_batches": result.micro_batches,
        "train": asdict(config),
        "history": compact_history(result.history),
        "settings": _settings_record(method, settings, surgery),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        # the CPU kernels the job ran on: under portable numerics another machine with AVX2 trains the same bits
        "numerics": numerics.describe(),
    }
    if isinstance(budget, BudgetSearch):
        frontier = budget.summary()
        frontier["candidates"] = [
            {"compression": total / max(nonzero, 1), "val_acc": val_acc, "test_acc": test_acc, "chosen": True},
            *({"compression": c.compression, "val_acc": c.val_acc, "test_acc": c.test_acc, "chosen": False}
              for c in candidates),
        ]  # fmt: skip
        report["verdict"] = frontier["verdict"] = search_verdict(report)
        report["frontier"] = frontier
    return CompressResult(model, report, candidates)


def _holds_budget(method: str, target: Target) -> bool:
    """Whether ``method`` climbs to ``target`` in rungs that each end judged within the budget.

    Methods that can aim at new compressions mid-run (:data:`SEARCH_METHODS`) do, for an overall
    compression or a budget alone. Per-layer kept fractions, and the other methods, run their own
    schedule; their budget is judged on the finished model only.
    """
    return method in SEARCH_METHODS and target.layer_kept is None


def search_verdict(report: dict[str, Any]) -> str:
    """One sentence on a budget search's outcome."""
    budget = report["target"]["max_accuracy_drop"]
    ref, val = report["reference_val_acc"], report["val_acc"]
    moved = f"validation {ref:.2f}% → {val:.2f}%" if ref is not None and val is not None else "no validation figure"
    asked = report["target"].get("compression")
    if report["budget_met"]:
        found = f"{report['compression']:.1f}x is the highest compression found"
        if asked is None:
            return f"{found} within the {budget:g}-point budget ({moved})."
        if report["compression"] >= asked * (1 - CEILING_TOLERANCE):
            return f"{report['compression']:.1f}x as asked, within the {budget:g}-point budget ({moved})."
        return f"{asked:g}x is out of reach within the {budget:g}-point budget: {found} ({moved})."
    return (
        f"No compression of {SearchSettings().floor:g}x or more stayed within the {budget:g}-point budget: "
        f"the model handed over is at {report['compression']:.1f}x ({moved})."
    )


def _other_candidates(search: BudgetSearch, model: nn.Module, surgery: Surgery) -> list[dict[str, torch.Tensor]]:
    """The squashed state of each candidate but the chosen one (the model holds that one)."""
    kept = search.candidate_states()[1:]
    if not kept:
        return []
    chosen = {"model": copy.deepcopy(model.state_dict()), "surgery": copy.deepcopy(surgery.state_dict())}
    out = []
    for _, state in kept:
        model.load_state_dict(state["model"])
        surgery.load_state_dict(state["surgery"])
        out.append(surgery.masked_state_dict())
    model.load_state_dict(chosen["model"])
    surgery.load_state_dict(chosen["surgery"])
    return out


def _candidate(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    train: Dataset,
    valid: Dataset,
    test: Dataset | None,
    teacher: nn.Module | None,
    config: TrainConfig,
) -> Candidate:
    """A candidate as the chosen model is finished: its BatchNorm re-estimated, then evaluated."""
    twin = copy.deepcopy(model)
    twin.load_state_dict(state)
    val = _accuracy(twin, valid, teacher)
    recalibrated = _recalibrate(twin, train, valid, teacher, config, val)
    if recalibrated is not None:
        val = recalibrated["val_acc"]
    total = sum(p.numel() for p in twin.parameters())
    nonzero = sum(int(torch.count_nonzero(p)) for p in twin.parameters())
    return Candidate(total / max(nonzero, 1), val, _accuracy(twin, test, teacher), twin)


def _recalibrate(
    model: nn.Module,
    train: Dataset,
    valid: Dataset,
    teacher: nn.Module | None,
    config: TrainConfig,
    before: float | None,
) -> dict[str, Any] | None:
    """Re-estimate the pruned model's BatchNorm statistics on training data; keep them if validation
    accuracy does not drop (else the trained statistics come back). None without BatchNorm layers."""
    saved = copy.deepcopy(model.state_dict())
    layers = recalibrate_batchnorm(model, train, batch_size=config.batch_size, seed=config.seed)
    if layers == 0:
        return None
    after = _accuracy(model, valid, teacher)
    kept = before is None or after is None or after >= before
    if not kept:
        model.load_state_dict(saved)
    final = after if kept else before
    return {"layers": layers, "val_acc_before": before, "val_acc_after": after, "kept": kept, "val_acc": final}


def _peak_memory(device: torch.device) -> dict[str, Any]:
    """The run's peak memory: the CUDA allocator's on a GPU (this run only), else the process's peak
    resident set, which covers everything the process did before too."""
    if device.type == "cuda":
        return {"device": str(device), "bytes": int(torch.cuda.max_memory_allocated(device)), "scope": "run"}
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    except (ImportError, OSError):
        return {"device": "cpu", "bytes": None, "scope": "process"}
    return {"device": "cpu", "bytes": int(peak), "scope": "process"}


def _settings_record(method: str, settings: MethodSettings | None, surgery: Surgery) -> dict[str, Any]:
    """The settings as run: the method's own schedule filled in where none was given, with the
    iterations between mask updates the run used (None for the crate-driven rule, which draws).
    Schedule fields the method does not read are None."""
    s = settings or MethodSettings()
    record = asdict(s)
    record["schedule"] = asdict(s.schedule or default_schedule(method))
    record["schedule"].update(dict.fromkeys(unread_schedule_fields(method)))
    record["schedule"]["update_interval"] = surgery.interval if isinstance(surgery, ScheduledSurgery) else None
    out: dict[str, Any] = _jsonable(record)
    return out


def compact_history(history: list[Progress], limit: int = HISTORY_POINTS) -> list[dict[str, Any]]:
    """At most ``limit`` points of ``history`` as plain dicts, for the report and its charts.

    Evaluations and back-offs are kept first (evenly thinned only if they alone exceed ``limit``),
    then plain progress points evenly spread over the run fill the rest; the last point always stays.
    """
    if not history:
        return []
    n = len(history)
    keep: set[int] = set()
    if n <= limit:
        keep = set(range(n))
    else:
        keep.add(n - 1)
        evals = [i for i, p in enumerate(history) if p.event != "progress"]
        keep.update(_spread(evals, limit - len(keep)))
        rest = [i for i in range(n) if i not in keep]
        keep.update(_spread(rest, limit - len(keep)))
    return [
        {
            "iteration": p.iteration,
            "event": p.event,
            "loss": p.loss,
            "val_acc": p.val_acc,
            "compression": p.compression,
            "layers": {r.name: r.kept for r in p.layers},
        }
        for p in (history[i] for i in sorted(keep))
    ]


def _spread(items: list[int], k: int) -> list[int]:
    """``k`` of ``items`` evenly spaced, first and last included (all of them when ``k`` suffices)."""
    if k <= 0:
        return []
    if len(items) <= k:
        return items
    if k == 1:
        return [items[-1]]
    return [items[round(j * (len(items) - 1) / (k - 1))] for j in range(k)]


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj
