"""``netsurgery bench models``: DNS against AGP beyond LeNet, on a ResNet and a ViT.

Both models take Fashion-MNIST made 3-channel (3×28×28, :func:`dns_core.data.adapt_builtin`), as
a user's image data reaches a model that expects colour. Each gets a dense reference trained here
(cached), then every method is searched for the highest compression it holds within the model's
accuracy budget, at the same iteration budget: a run holds one asked compression (no back-off), and
it counts when both its validation and its test accuracy are within the budget of the reference's.

The search climbs a ladder of compressions 1.25x apart: two rungs at a time while runs stay within
budget, then the rung between the last good one and the first bad one. The rows it keeps are the
best run of each method; every run tried goes to the results file.

The allocation rules (one global ranking, per-layer spread, uniform) are compared at DNS's best
compression, with the default's run among them.
"""

from __future__ import annotations

import copy
import functools
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from .bench import RunJournal, weights_digest
from .compress import compress
from .data import Dataset, adapt_builtin
from .defaults import ALLOCATION, ALLOCATIONS
from .inputs import ModelInput
from .methods import default_schedule
from .reference import cache_dir
from .spec import CompressSpec
from .surgery import SurgeryError
from .train import TrainConfig, evaluate, fit

INPUT = ModelInput("image", (3, 28, 28))
#: asked compressions are STEP ** n (1.95, 2.44, 3.05, 3.81, 4.77, 5.96, 7.45, 9.31, 11.64, …)
STEP = 1.25
#: the lowest rung the search asks (1.95x)
LOWEST = 3


@dataclass(frozen=True)
class BenchModel:
    """One model of the bench: how to build it, its reference recipe and its compression runs."""

    name: str
    build: Callable[[], nn.Module]
    max_drop: float  # the accuracy budget, percentage points
    ref_epochs: int
    ref_lr: float
    iterations: int  # every compression run's budget
    lr: float  # the compression runs' peak learning rate
    start: float  # the first compression the search asks
    allocation_at: tuple[float, ...]  # the compressions ``bench allocation`` compares the rules at


class _Logits(nn.Module):
    """A transformers image classifier as one tensor in, logits out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(pixel_values=x).logits
        return out


def resnet(depth: int) -> Callable[[], nn.Module]:
    """A CIFAR-style ResNet-(6·depth+2) with a 3x3 stem (ResNet-20 at depth 3), 3-channel input."""

    def build() -> nn.Module:
        from .models import ResNetSmall

        return ResNetSmall(in_channels=3, num_classes=10, depth=depth, width=16)

    return build


def vit(hidden: int, layers: int, patch: int) -> Callable[[], nn.Module]:
    """A small transformers ViT on 28×28 images (attention, LayerNorm, GELU: what users' ViTs hold)."""

    def build() -> nn.Module:
        from transformers import ViTConfig, ViTForImageClassification

        labels: dict[str, Any] = {"num_labels": 10}
        config = ViTConfig(
            image_size=28, patch_size=patch, num_channels=3, hidden_size=hidden, num_hidden_layers=layers,
            num_attention_heads=4, intermediate_size=2 * hidden, **labels,
        )  # fmt: skip
        return _Logits(ViTForImageClassification(config))

    return build


MODELS: dict[str, BenchModel] = {
    "resnet-20": BenchModel("resnet-20", resnet(3), 0.5, 4, 0.05, 1200, 0.01, 5.96, (5.96, 7.45)),
    "vit": BenchModel("vit", vit(96, 4, 4), 1.0, 6, 0.05, 1200, 0.01, 3.05, (4.77, 5.96)),
}
QUICK: dict[str, BenchModel] = {
    "resnet-20": BenchModel("resnet-8", resnet(1), 0.5, 2, 0.05, 300, 0.01, 3.81, (3.81, 4.77)),
    "vit": BenchModel("vit-tiny", vit(64, 2, 7), 1.0, 3, 0.05, 300, 0.01, 3.81, (4.77, 5.96)),
}


def rung(n: int) -> float:
    return round(STEP**n, 2)


def rung_of(compression: float) -> int:
    return round(math.log(compression) / math.log(STEP))


def fashion_3ch() -> tuple[Dataset, Dataset, Dataset]:
    train, valid, test = adapt_builtin("fashion-mnist", INPUT)
    assert test is not None
    return train, valid, test


def reference(plan: BenchModel, train: Dataset, seed: int = 0) -> tuple[nn.Module, bool]:
    """The plan's dense reference: from the cache, or trained (SGD, cosine) and cached as safetensors."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(seed)
    model = plan.build()
    path = cache_dir() / f"ref-bench-{plan.name}-e{plan.ref_epochs}-lr{plan.ref_lr}-s{seed}.safetensors"
    if path.exists():
        model.load_state_dict(load_file(path))
        return model, True
    iterations = plan.ref_epochs * (len(train) // 64)
    config = TrainConfig(iterations=iterations, lr=plan.ref_lr, seed=seed, eval_every=0, log_every=iterations)
    fit(model, train, config)
    model.cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, False


def run(
    plan: BenchModel,
    model: nn.Module,
    data: tuple[Dataset, Dataset, Dataset],
    refs: tuple[float, float],
    method: str,
    compression: float,
    allocation: str = ALLOCATION,
    seed: int = 0,
    ramp_updates: int | None = None,
    dns_schedule: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """One compression run holding ``compression``; its row with the validation and test drops.

    ``ramp_updates``: DNS's fewest mask updates on its ramp (``Schedule.ramp_updates``; None: the
    product's :data:`~dns_core.methods.DNS_RAMP_UPDATES`, 0: one update every ``interval``).
    ``dns_schedule``: DNS's ``(ramp_end, surgery_end)``, fractions of the run (None: the product's,
    :data:`~dns_core.methods.SCHEDULES`).
    """
    train, valid, test = data
    spec = CompressSpec(
        method=method, compression=compression, iterations=plan.iterations, lr=plan.lr, seed=seed,
        allocation=allocation, eval_every=0, log_every=max(plan.iterations // 10, 1),
    )  # fmt: skip
    target, settings, config = spec.build()
    if method == "dns" and (ramp_updates is not None or dns_schedule is not None):
        schedule = default_schedule(method)
        if ramp_updates is not None:
            schedule = replace(schedule, ramp_updates=ramp_updates)
        if dns_schedule is not None:
            schedule = replace(schedule, ramp_end=dns_schedule[0], surgery_end=dns_schedule[1])
        settings = replace(settings, schedule=schedule)
    began = time.perf_counter()
    result = compress(
        copy.deepcopy(model), train, valid, method=method, target=target, config=config, settings=settings, test=test,
        reference_acc=refs,
    )  # fmt: skip
    seconds = time.perf_counter() - began
    r = result.report
    ref_val, ref_test = refs
    val, acc = float(r["val_acc"]), float(r["test_acc"])
    return {
        "model": plan.name,
        "method": method,
        "allocation": allocation,
        "seed": seed,
        "asked": compression,
        "compression": round(float(r["compression"]), 2),
        "ref_acc": round(ref_test, 2),
        "acc": round(acc, 2),
        "ref_val_acc": round(ref_val, 2),
        "val_acc": round(val, 2),
        "within_budget": ref_val - val <= plan.max_drop and ref_test - acc <= plan.max_drop,
        "iterations": int(r["iterations"]),  # as run
        "seconds": round(seconds, 1),
        "layers": {layer["name"]: round(layer["kept_fraction"], 4) for layer in r["layers"]},
        "update_interval": r["settings"]["schedule"]["update_interval"],
        "ramp_end": r["settings"]["schedule"]["ramp_end"],
        # None for the other methods: their masks stop changing where their ramp ends
        "surgery_end": r["settings"]["schedule"]["surgery_end"],
        "left_dense": r["left_dense"],
        "batchnorm": r["batchnorm"],
    }


def _with_iterations(plan: BenchModel, iterations: int | None) -> BenchModel:
    """``plan`` with its compression runs ``iterations`` long (None: as it is)."""
    return plan if iterations is None else replace(plan, iterations=iterations)


def search(
    plan: BenchModel,
    method: str,
    attempt: Callable[[float], dict[str, Any]],
    max_runs: int = 10,
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The best run within budget of ``method`` on the ladder, and every run tried.

    The search ends once it has a rung within budget next to one out of it (or nothing holds from
    about 2x up); ``max_runs`` only guards against a model that holds every rung it is asked.
    """
    tried: dict[int, dict[str, Any]] = {}

    def at(n: int) -> dict[str, Any]:
        if n not in tried:
            tried[n] = attempt(rung(n))
        return tried[n]

    n = rung_of(plan.start)
    good, bad = None, None
    while len(tried) < max_runs:
        if at(n)["within_budget"]:
            good = n if good is None else max(good, n)
            if bad is not None and bad - good <= 1:
                break
            n = n + 2 if bad is None else (good + bad) // 2
        else:
            bad = n if bad is None else min(bad, n)
            if good is not None and bad - good <= 1:
                break
            if good is None and n <= LOWEST:
                break  # nothing from about 2x up holds the budget
            n = max(n - 2, LOWEST) if good is None else (good + bad) // 2
    best = None
    for row in tried.values():
        if row["within_budget"] and (best is None or row["compression"] > best["compression"]):
            best = row
    return best, [tried[k] for k in sorted(tried)]


def bench(
    *,
    quick: bool = False,
    names: Sequence[str] = ("resnet-20", "vit"),
    methods: Sequence[str] = ("dns", "agp"),
    seeds: Sequence[int] = (0,),
    allocation: str = ALLOCATION,
    ramp_updates: int | None = None,
    dns_schedule: tuple[float, float] | None = None,
    iterations: int | None = None,
    start: float | None = None,
    log: Callable[[str], None] = print,
    on_model: Callable[[dict[str, Any]], None] | None = None,
    journal: RunJournal | None = None,
) -> dict[str, Any]:
    """The table (best row per model, seed and method), every run tried, the allocation comparison
    and, per model, each method's median over ``seeds`` (:func:`summarize`).

    Each seed trains its own reference and runs every search from it. The searches use
    ``allocation``; the comparison runs every other rule at DNS's best, on the first seed.
    ``ramp_updates`` sets DNS's fewest mask updates on its ramp and ``dns_schedule`` where its ramp
    and its splicing end (see :func:`run`); ``iterations`` replaces each model's own run length
    (:attr:`BenchModel.iterations`) and ``start`` the first compression its search asks (taken to the
    nearest rung; :attr:`BenchModel.start`).
    ``on_model`` receives the results so far after each model and seed (to write them as they come).
    ``journal``: where finished runs are kept and read back (:class:`~dns_core.bench.RunJournal`), so
    that a stopped bench goes on from its last finished run.
    """
    default = allocation
    import json

    journal = journal or RunJournal(None)

    plans = QUICK if quick else MODELS
    data = fashion_3ch()
    rows: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    allocations: list[dict[str, Any]] = []
    for key, seed in [(k, s) for k in names for s in seeds]:
        plan = _with_iterations(plans[key], iterations)
        if start is not None:
            plan = replace(plan, start=rung(rung_of(start)))
        began = time.perf_counter()
        model, cached = reference(plan, data[0], seed)
        refs = (evaluate(model, data[1]), evaluate(model, data[2]))
        log(f"{plan.name}, seed {seed}: reference {'loaded' if cached else 'trained'} in "
            f"{time.perf_counter() - began:.0f}s, validation {refs[0]:.2f}%, test {refs[1]:.2f}%")  # fmt: skip
        best_dns: dict[str, Any] | None = None
        digest = weights_digest(model)

        def one(method: str, compression: float, allocation: str) -> dict[str, Any]:
            try:
                return run(plan, model, data, refs, method, compression, allocation, seed, ramp_updates, dns_schedule)  # noqa: B023
            except SurgeryError as e:  # e.g. more than the parameters left out of the selection allow: out of reach
                return {"model": plan.name, "method": method, "allocation": allocation, "seed": seed,  # noqa: B023
                        "asked": compression, "within_budget": False, "unreachable": str(e)}  # fmt: skip

        def attempt(method: str, compression: float, allocation: str = default) -> dict[str, Any]:
            key = journal.key(
                bench="models", model=plan.name, reference=digest, iterations=plan.iterations, method=method,  # noqa: B023
                asked=compression, allocation=allocation, seed=seed, ramp_updates=ramp_updates,  # noqa: B023
                **({"dns_schedule": list(dns_schedule)} if dns_schedule is not None else {}),
            )  # fmt: skip
            row = journal.row(key, one, method, compression, allocation)
            log(json.dumps({k: v for k, v in row.items() if k != "layers"}))
            return row

        for method in methods:
            best, tried = search(plan, method, functools.partial(attempt, method))
            runs += tried
            if best is not None:
                rows.append(best)
            if method == "dns":
                best_dns = best
        if best_dns is not None and seed == seeds[0]:
            for rule in ALLOCATIONS:
                if rule == default:
                    allocations.append(best_dns)
                    continue
                allocations.append(attempt("dns", best_dns["asked"], rule))
        if on_model is not None:
            on_model({"rows": rows, "runs": runs, "allocations": allocations})
    summary = summarize(rows, [plans[k].name for k in names], methods, seeds)
    return {"rows": rows, "runs": runs, "allocations": allocations, "summary": summary}


def summarize(
    rows: Sequence[dict[str, Any]], models: Sequence[str], methods: Sequence[str], seeds: Sequence[int]
) -> list[dict[str, Any]]:
    """Per model: each method's highest compression within budget per seed (1.0, the dense model,
    where no rung held) and their median; with DNS and AGP both run, DNS over AGP: ``STEP`` to the
    power of the difference of their median rungs (one rung up is 1.25x, free of the rungs' rounding)."""
    out: list[dict[str, Any]] = []
    for model in models:
        entry: dict[str, Any] = {"model": model, "seeds": list(seeds), "methods": {}}
        for method in methods:
            best = {r["seed"]: r["compression"] for r in rows if r["model"] == model and r["method"] == method}
            per_seed = [float(best.get(s, 1.0)) for s in seeds]
            entry["methods"][method] = {"per_seed": per_seed, "median": statistics.median(per_seed)}
        if "dns" in entry["methods"] and "agp" in entry["methods"]:
            dns, agp = (statistics.median(rung_of(c) for c in entry["methods"][m]["per_seed"]) for m in ("dns", "agp"))
            entry["dns_over_agp"] = round(STEP ** (dns - agp), 3)
        out.append(entry)
    return out


def format_summary(summary: Sequence[dict[str, Any]]) -> str:
    lines = ["| model | method | per seed | median |", "|---|---|---|---|"]
    for entry in summary:
        for method, m in entry["methods"].items():
            per_seed = ", ".join(f"{c:.2f}x" for c in m["per_seed"])
            lines.append(f"| {entry['model']} | {method} | {per_seed} | {m['median']:.2f}x |")
    ratios = [f"{e['model']} {e['dns_over_agp']:.2f}" for e in summary if "dns_over_agp" in e]
    if ratios:
        lines.append(f"DNS over AGP (medians): {', '.join(ratios)}")
    return "\n".join(lines)


def allocations(
    *,
    quick: bool = False,
    names: Sequence[str] = ("resnet-20", "vit"),
    seeds: Sequence[int] = (0, 1),
    rules: Sequence[str] = ALLOCATIONS,
    iterations: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """DNS under every allocation rule at each model's ``allocation_at`` compressions, over ``seeds``
    (``iterations``: each run's length, if not the model's own).

    Returns every run and one summary row per (model, compression, rule): the mean test and
    validation drops over the seeds.
    """
    import json

    plans = QUICK if quick else MODELS
    data = fashion_3ch()
    runs: list[dict[str, Any]] = []
    summary: list[dict[str, Any]] = []
    for key in names:
        plan = _with_iterations(plans[key], iterations)
        model, _ = reference(plan, data[0])
        refs = (evaluate(model, data[1]), evaluate(model, data[2]))
        for compression in plan.allocation_at:
            for rule in rules:
                mine = [run(plan, model, data, refs, "dns", compression, rule, seed) for seed in seeds]
                for row in mine:
                    log(json.dumps({k: v for k, v in row.items() if k not in ("layers", "batchnorm")}))
                runs += mine
                summary.append(
                    {
                        "model": plan.name,
                        "allocation": rule,
                        "compression": mine[0]["compression"],
                        "seeds": len(mine),
                        "test_drop": round(sum(r["ref_acc"] - r["acc"] for r in mine) / len(mine), 2),
                        "val_drop": round(sum(r["ref_val_acc"] - r["val_acc"] for r in mine) / len(mine), 2),
                        "smallest_layer_kept": min(min(r["layers"].values()) for r in mine),
                        "layers_left_whole": max(
                            sum(1 for n, f in r["layers"].items() if f >= 1 and n not in r["left_dense"]) for r in mine
                        ),
                    }
                )
    return {"runs": runs, "summary": summary}


def format_allocation_summary(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| model | compression | allocation | mean test Δ pp | mean validation Δ pp | seeds |"]
    lines.append("|---|---|---|---|---|---|")
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['compression']:.2f}x | {r['allocation']} | {-r['test_drop']:+.2f} | "
            f"{-r['val_drop']:+.2f} | {r['seeds']} |"
        )
    return "\n".join(lines)


def short_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    keys = ("model", "method", "compression", "ref_acc", "acc", "iterations", "seconds")
    return [{k: r[k] for k in keys} for r in rows]


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    head = (
        "| model | method | compression | test ref → pruned (Δ pp) | validation ref → pruned | iterations | seconds |"
    )
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['method']} | {r['compression']:.1f}x | {r['ref_acc']:.2f}% → {r['acc']:.2f}% "
            f"({r['acc'] - r['ref_acc']:+.2f}) | {r['ref_val_acc']:.2f}% → {r['val_acc']:.2f}% | "
            f"{r['iterations']:,} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def format_allocations(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| model | allocation | compression | test ref → pruned (Δ pp) | validation Δ pp |"]
    lines.append("|---|---|---|---|---|")
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['allocation']} | {r['compression']:.1f}x | {r['ref_acc']:.2f}% → {r['acc']:.2f}% "
            f"({r['acc'] - r['ref_acc']:+.2f}) | {r['val_acc'] - r['ref_val_acc']:+.2f} |"
        )
    return "\n".join(lines)
