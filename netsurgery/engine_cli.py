"""The engine's subcommands: ``compress``, ``train-reference``, ``pack`` and ``bench``.

They need dns_core only (``bench service`` aside, which starts the service); dns_core, torch and rich
load when a command runs, not when the parser is built.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dns_core.defaults import (
    ALLOCATION,
    ALLOCATIONS,
    BATCH_SIZE,
    BUILTIN_SETS,
    CODECS,
    CRATE,
    EDGE_SHARE,
    FIRST_LAST,
    FIRST_LAST_DEFAULT,
    GAMMA,
    ITERATIONS,
    LR,
    METHODS,
    OBJECTIVES,
    POWER,
    SEARCH_METHODS,
)
from netsurgery.common import CliError, add_numerics, load_data, parse_pairs, progress_bar

if TYPE_CHECKING:
    from collections.abc import Sequence

    from dns_core.bench import RunJournal
    from dns_core.sparse import PackStats
    from dns_core.train import Progress
    from netsurgery.common import Subcommands

DEFAULT_ARCH = "lenet-300-100"


class _Bar:
    """A rich progress bar fed by dns_core's progress callback; plain lines when stdout is not a terminal.

    Redirected to a file or a pipe (a batch job, ``tee``, CI), the bar would show nothing until the end:
    there each evaluation is a line, and so is each further 1/:attr:`LINE_PARTS` of the run, and the
    progress at least every :attr:`LINE_SECONDS`.
    """

    LINE_SECONDS = 30.0
    LINE_PARTS = 20

    def __init__(self, description: str, total: int) -> None:
        self.progress = progress_bar(transient=False)
        self.task = self.progress.add_task(description, total=total, status="")
        self.last_acc: float | None = None
        self.description, self.total = description, total
        self.lines = not self.progress.console.is_terminal
        self.last_line = time.monotonic()
        self.parts_done = 0

    def __enter__(self) -> _Bar:
        if not self.lines:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.lines:
            self.progress.stop()

    def __call__(self, p: Progress) -> None:
        if p.val_acc is not None:
            self.last_acc = p.val_acc
        parts = [f"loss {p.loss:.3f}"]
        if self.last_acc is not None:
            parts.append(f"val {self.last_acc:.2f}%")
        if p.compression is not None:
            parts.append(f"{p.compression:.1f}x")
        status = "  ".join(parts)
        if not self.lines:
            self.progress.update(self.task, completed=p.iteration, status=status)
            return
        now = time.monotonic()
        done = p.iteration * self.LINE_PARTS // max(self.total, 1)  # whole parts of the run done
        if p.val_acc is not None or done > self.parts_done or now - self.last_line >= self.LINE_SECONDS:
            self.last_line, self.parts_done = now, done
            print(f"{self.description}: {p.iteration:,}/{self.total:,}  {status}", flush=True)


def cmd_train_reference(args: argparse.Namespace) -> int:
    from dns_core.io import save_model
    from dns_core.reference import train_reference
    from dns_core.train import Callbacks, evaluate

    train, valid, test = load_data(args)
    iterations = args.epochs * (len(train) // 64)
    with _Bar(f"reference {args.arch}", iterations) as bar:
        model = train_reference(
            args.arch,
            train,
            epochs=args.epochs,
            seed=args.seed,
            valid=valid,
            callbacks=Callbacks(on_progress=bar),
            device=args.device,
        )
    save_model(args.out, model, args.arch)
    acc = evaluate(model, test if test is not None else valid)
    print(f"saved {args.out}: {args.arch}, {'test' if test is not None else 'validation'} accuracy {acc:.2f}%")
    return 0


def _budget(text: str) -> float | None:
    """``--max-drop``: percentage points, or ``none`` for no budget."""
    if text.strip().lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number of percentage points or 'none', not {text!r}") from None


def _compression(text: str) -> float:
    """A compression ratio above 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a compression such as 18.19, not {text!r}") from None
    if not value > 1:
        raise argparse.ArgumentTypeError(f"a compression above 1, not {text}")
    return value


def _schedule_fractions(text: str) -> tuple[float, float]:
    """``RAMP_END,SURGERY_END``: two fractions of a run, 0 < ramp end < surgery end <= 1."""
    parts = text.split(",")
    try:
        ramp_end, surgery_end = (float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"two fractions RAMP_END,SURGERY_END such as 0.5,0.7, not {text!r}") from None
    if not 0 < ramp_end < surgery_end <= 1:
        raise argparse.ArgumentTypeError(f"0 < RAMP_END < SURGERY_END <= 1, not {text!r}")
    return ramp_end, surgery_end


def _non_negative_int(text: str) -> int:
    """A count of 0 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a whole number, not {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"0 or more, not {value}")
    return value


def cmd_compress(args: argparse.Namespace) -> int:
    from dns_core.artifacts import LoadedModel, load_model_file, write_artifacts
    from dns_core.data import DataError, check_fits
    from dns_core.errors import InputError
    from dns_core.reference import cached_reference
    from dns_core.spec import CompressSpec
    from dns_core.train import Callbacks, evaluate

    model_path = args.model or args.weights
    inputs: dict[str, str] = {}
    train = valid = test = None
    builtin = args.data in BUILTIN_SETS and not Path(args.data).exists()
    if not (model_path and builtin):  # a built-in set is loaded once the model says what it takes
        train, valid, test = load_data(args)
    if model_path:
        try:
            config = json.loads(args.config) if args.config else None
            loaded = load_model_file(model_path, args.arch, config)
        except json.JSONDecodeError as e:
            raise CliError(f"--config is not JSON: {e}") from None
        except (OSError, ValueError) as e:
            raise CliError(f"cannot load weights from {model_path}: {e}") from None
        inputs["model"] = model_path
        label = loaded.arch or Path(model_path).name
        if builtin:
            train, valid, test = load_data(args, loaded.model_input)
    else:
        assert train is not None
        arch = args.arch or DEFAULT_ARCH
        if args.data not in BUILTIN_SETS:
            raise CliError("give --model with your own data (the cached references are trained on built-in sets)")
        print(f"no --model given: using a converged {arch} reference trained on {args.data} (cached)")
        with _Bar(f"reference {arch}", 20 * (len(train) // 64)) as bar:
            module, _ = cached_reference(arch, train, tag=f"{args.data}-cli", callbacks=Callbacks(on_progress=bar))
        loaded, label = LoadedModel(module, "safetensors", arch=arch), arch
    assert train is not None and valid is not None
    for key in ("data", "targets", "valid_data", "valid_targets"):
        value = getattr(args, key, None)
        if value and Path(value).exists():
            inputs[key] = value
    try:
        check_fits(loaded.module, train, loaded.model_input)
        check_fits(loaded.module, valid, loaded.model_input)
    except DataError as e:
        raise CliError(str(e)) from None
    layer_kept = parse_pairs(args.layer_kept, "--layer-kept")
    try:
        spec = CompressSpec(
            method=args.method,
            compression=None if layer_kept else args.target,
            layer_kept=layer_kept,
            max_accuracy_drop=args.max_drop,
            crate=args.crate,
            crates=parse_pairs(args.crates, "--crates"),
            gamma=args.gamma,
            power=args.power,
            iter_stop=args.iter_stop,
            include=tuple(args.include.split(",")),
            allocation=args.allocation,
            first_last=args.first_last,
            exclude=tuple(args.exclude.split(",")) if args.exclude else (),
            iterations=args.iterations,
            batch_size=args.batch_size,
            lr=args.lr,
            objective=args.objective,
            seed=args.seed,
            device=args.device,
            checkpoint_every=args.checkpoint_every,
            codec=args.codec,
        )
        with _Bar(f"{args.method} {label}", args.iterations) as bar:
            result = spec.compress(
                loaded.module, train, valid, test=test, callbacks=Callbacks(on_progress=bar), checkpoint=args.checkpoint
            )
    except InputError as e:  # the engine's other exceptions are bugs: they keep their traceback
        raise CliError(str(e)) from None

    def accuracies(m: Any) -> dict[str, float | None]:
        return {"val_acc": evaluate(m, valid) if valid.targets is not None else None,
                "test_acc": evaluate(m, test) if test is not None else None}  # fmt: skip

    report = result.report | {"data": args.data}
    made = write_artifacts(args.out, loaded, result.model, report, inputs=inputs, codec=spec.codec,
                           clusters=args.clusters, evaluate=accuracies, candidates=result.candidates)  # fmt: skip
    _print_report(made.report)
    dense = next(p for n, p in made.files.items() if n.startswith("model.") and "sparse" not in n)
    _print_pack(made.packed, dense.stat().st_size)
    codec = made.report.get("value_codec")
    if codec:
        acc = "".join(f", {k} {codec[k]:.2f}%" for k in ("val_acc", "test_acc") if codec.get(k) is not None)
        print(
            f"{codec['codec']} values: {codec['bytes']:,} bytes ({codec['compression']:.1f}x smaller than dense){acc}"
        )
    print("wrote " + ", ".join(str(p) for p in made.files.values()))
    return 0


def _pack_summary(p: PackStats) -> dict[str, Any]:
    return {"bytes": p.file_bytes, "kept_values": p.kept, "value_bytes": p.value_bytes,
            "dense_bytes": p.dense_bytes, "overhead": round(p.overhead, 4)}  # fmt: skip


def _print_pack(p: PackStats, dense_file_bytes: int) -> None:
    print(
        f"sparse file: {p.file_bytes:,} bytes = {p.overhead:.3f} x (kept values {p.value_bytes:,} B + dense "
        f"remainder {p.dense_bytes:,} B); the dense file is {dense_file_bytes:,} bytes "
        f"({dense_file_bytes / p.file_bytes:.1f}x larger)"
    )


def cmd_pack(args: argparse.Namespace) -> int:
    import copy

    from dns_core.io import load_model
    from dns_core.sparse import load_sparse, save_sparse

    try:
        model, arch = load_model(args.weights)
    except (OSError, ValueError) as e:
        raise CliError(f"cannot load weights from {args.weights}: {e}") from None
    suffix = f".sparse.{args.codec}.safetensors" if args.codec else ".sparse.safetensors"
    out = Path(args.out or str(args.weights).replace(".safetensors", "") + suffix)
    pruned = {n for n, t in model.state_dict().items() if t.dim() >= 2}
    packed = save_sparse(out, model.state_dict(), {"netsurgery.arch": arch}, codec=args.codec,
                         codec_tensors=pruned, clusters=args.clusters)  # fmt: skip
    _print_pack(packed, Path(args.weights).stat().st_size)
    summary: dict[str, Any] = {"file": str(out), "codec": args.codec} | _pack_summary(packed)
    if args.data:
        from dns_core.train import evaluate

        _, _, test = load_data(args)
        if test is None:
            raise CliError(f"{args.data} has no test split to measure accuracy on")
        decoded = copy.deepcopy(model)
        decoded.load_state_dict(load_sparse(out))
        summary["test_acc"], summary["test_acc_decoded"] = evaluate(model, test), evaluate(decoded, test)
        print(f"test accuracy {summary['test_acc']:.2f}% as stored, {summary['test_acc_decoded']:.2f}% decoded "
              f"from {out.name}")  # fmt: skip
    print(json.dumps(summary))
    return 0


def _print_report(r: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(
        title=f"{r['method']}: {r['compression']:.1f}x ({r['nonzero_parameters']:,} of {r['total_parameters']:,} kept)"
    )
    t.add_column("layer")
    t.add_column("kept", justify="right")
    t.add_column("total", justify="right")
    t.add_column("kept %", justify="right")
    for layer in r["layers"]:
        t.add_row(layer["name"], f"{layer['kept']:,}", f"{layer['total']:,}", f"{100 * layer['kept_fraction']:.2f}")
    console = Console()
    console.print(t)
    for split in ("val", "test"):
        ref, acc = r.get(f"reference_{split}_acc"), r.get(f"{split}_acc")
        if ref is not None and acc is not None:
            console.print(f"{split} accuracy: {ref:.2f}% → {acc:.2f}% ({acc - ref:+.2f} pp)")
    frontier = r.get("frontier")
    if frontier:
        f = Table(title="frontier: each rung's end, judged on validation")
        for column in ("iteration", "compression", "val acc", "test acc", "within budget"):
            f.add_column(column, justify="right")
        for point in frontier["points"]:
            test = point["test_acc"]
            f.add_row(str(point["iteration"]), f"{point['compression']:.1f}x", f"{point['val_acc']:.2f}",
                      "" if test is None else f"{test:.2f}", "yes" if point["within_budget"] else "no")  # fmt: skip
        console.print(f)
    if r.get("verdict"):
        console.print(r["verdict"])
    elif r.get("budget_met") is False:
        console.print(
            f"[bold yellow]the accuracy budget ({r['target']['max_accuracy_drop']} pp on validation) was not met[/]"
            f" ({r['method']} runs its own schedule and is judged at the end; dns, agp and han hold a budget)"
        )


def _results_kind(args: argparse.Namespace) -> str:
    quick_kinds = ("table", "versus", "models", "allocation", "search", "promise")
    return str(args.which) + ("-quick" if args.quick and args.which in quick_kinds else "")


def _results_path(args: argparse.Namespace) -> Path:
    """``--results``, by default docs/results/<kind>.json."""
    return Path(args.results or f"docs/results/{_results_kind(args)}.json")


def _record_results(args: argparse.Namespace, results: Any) -> None:
    """Write a bench run's raw results to ``--results`` (default: docs/results/<kind>.json)."""
    from dns_core import bench

    arguments = {k: v for k, v in vars(args).items() if isinstance(v, str | int | float | bool | None)}
    path = bench.write_results(_results_path(args), _results_kind(args), arguments, results)
    print(f"results written to {path}", file=sys.stderr)


#: benchmarks that time the code rather than train to an accuracy: they run the kernels production runs
TIMING_BENCHES = ("overhead", "service")


def _bench_numerics(args: argparse.Namespace) -> str:
    """A benchmark's own numerics: portable where it trains to accuracy figures, so that they are the same on
    every machine; native where it times steps or the service, so that the times are those of the fast path."""
    return "native" if args.which in TIMING_BENCHES else "portable"


_ACCURACY_BENCHES = ("table", "versus", "models", "allocation", "search", "promise")
_SEARCHES = ("search", "promise")
_SEEDED = ("versus", "models", "allocation", "search", "promise")
#: each ``bench`` option and the benchmarks that read it; the others refuse it rather than ignore it
BENCH_OPTIONS: dict[str, tuple[str, ...]] = {
    "quick": _ACCURACY_BENCHES,
    "models": _ACCURACY_BENCHES,
    "iterations": _ACCURACY_BENCHES,
    "methods": ("table", "models"),
    "allocation": ("models",),
    "ramp_updates": ("models",),
    "dns_schedule": ("models",),
    "start": ("models",),
    "steps": ("overhead",),
    "first_lr": _SEARCHES,
    "rung_lr": _SEARCHES,
    "objective": _SEARCHES,
    "splice_back": _SEARCHES,
    "regrow": _SEARCHES,
    "no_retry": _SEARCHES,
    "reference_per_seed": _SEARCHES,
    "resume": (*_SEARCHES, "models"),
    "agp_target": ("versus",),
    "ratio": ("versus",),
    "seeds": _SEEDED,
    "first_seed": _SEEDED,
    "pair": ("versus", "search"),
}


def _refuse_foreign_options(args: argparse.Namespace) -> None:
    """A bench option given to a benchmark that does not read it is an error, not a silent no-op."""
    for dest, benches in BENCH_OPTIONS.items():
        if args.which not in benches and getattr(args, dest) != args.option_defaults[dest]:
            flag = "--" + dest.replace("_", "-")
            raise CliError(f"{flag} applies to bench {', '.join(benches)}, not to bench {args.which}")


def cmd_bench(args: argparse.Namespace) -> int:
    from dns_core import bench

    _refuse_foreign_options(args)
    if args.which == "overhead":
        result = bench.overhead(steps=args.steps)
        print(json.dumps(result))
        _record_results(args, result)
        return 0
    if args.which == "service":
        from netsurgery import bench_service

        figures = bench_service.run(log=lambda s: print(s, file=sys.stderr, flush=True))
        print(json.dumps(figures))
        _record_results(args, figures)
        return 0
    if args.which == "models":
        return _bench_models(args)
    if args.which == "allocation":
        return _bench_allocation(args)
    if args.which in ("search", "promise"):
        return _bench_search(args)
    if args.models is None:
        args.models = "lenet-300-100,lenet-5"
    if args.which == "versus":
        arch = args.models.split(",")[0]  # one model: the first of --models
        if arch not in bench.PLANS:
            raise CliError(f"unknown model {arch}; choose from {', '.join(bench.PLANS)}")
        first, second = _pair(args.pair, METHODS)
        result = bench.versus(
            arch,
            agp_target=args.agp_target,
            ratio=args.ratio,
            seeds=range(args.first_seed, args.first_seed + (args.seeds or 5)),
            iterations=args.iterations,
            quick=args.quick,
            pair=(first, second),
            log=lambda s: print(s, file=sys.stderr, flush=True),
        )
        for method, m in result["summary"].items():
            print(f"{method:4} {m['compression']:5.1f}x  test drop {m['mean_drop']:+.2f} ± {m['sd_drop']:.2f} pp "
                  f"(validation {m['mean_val_drop']:+.2f}) over {len(result['seeds'])} seeds")  # fmt: skip
        print(json.dumps(result))
        _record_results(args, result)
        return 0
    archs = args.models.split(",")
    unknown = [a for a in archs if a not in bench.PLANS]
    if unknown:
        raise CliError(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(bench.PLANS)}")
    methods = args.methods.split(",") if args.methods else bench.TABLE_METHODS
    rows = bench.table(
        archs,
        quick=args.quick,
        iterations=args.iterations,
        methods=methods,
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    print(bench.format_table(rows))
    extra = ("layers", "backoffs", "val_drop")  # the last line keeps the keys only
    print(json.dumps({"rows": [{k: v for k, v in r.items() if k not in extra} for r in rows]}))
    _record_results(args, {"rows": rows})  # the file keeps every key
    return 0


def _journal(args: argparse.Namespace) -> RunJournal:
    """The bench's journal: finished runs go to <results>.runs.jsonl as they end, so that a stopped bench
    can ``--resume``."""
    from dns_core.bench import RunJournal

    results = _results_path(args)
    path = results.with_name(results.name + ".runs.jsonl")
    if args.resume and not path.exists():
        print(f"{path} does not exist: every run starts afresh", file=sys.stderr)
    journal = RunJournal(path, resume=args.resume)
    if journal.done:
        print(f"{len(journal.done)} finished run(s) in {path}", file=sys.stderr)
    return journal


def _record_journaled(args: argparse.Namespace, result: Any, journal: RunJournal) -> None:
    """Write a journaled bench's results file, then drop its journal (the file now holds every run)."""
    if journal.reused:
        print(f"{journal.reused} run(s) read back from {journal.path}", file=sys.stderr)
    _record_results(args, result)
    journal.close()


def _bench_models(args: argparse.Namespace) -> int:
    from dns_core import bench_models

    names = (args.models or ",".join(bench_models.MODELS)).split(",")
    unknown = [n for n in names if n not in bench_models.MODELS]
    if unknown:
        raise CliError(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(bench_models.MODELS)}")
    methods = args.methods.split(",") if args.methods else ["dns", "agp"]
    bad = [m for m in methods if m not in METHODS or m == "dns-fixed-crates"]
    if bad:
        raise CliError(f"unknown or crate-driven method(s) {', '.join(bad)}; choose among dns, agp, han, one-shot")
    if args.seeds is not None and args.seeds < 1:
        raise CliError(f"--seeds must be 1 or more, not {args.seeds}")
    journal = _journal(args)
    result = bench_models.bench(
        quick=args.quick,
        names=names,
        methods=methods,
        seeds=range(args.first_seed, args.first_seed + (args.seeds or 1)),
        allocation=args.allocation,
        ramp_updates=args.ramp_updates,
        dns_schedule=args.dns_schedule,
        iterations=args.iterations,
        start=args.start,
        log=lambda s: print(s, file=sys.stderr, flush=True),
        on_model=lambda partial: _record_results(args, partial),  # each model's figures as soon as they exist
        journal=journal,
    )
    print(bench_models.format_table(result["rows"]))
    if result["allocations"]:
        print(bench_models.format_allocations(result["allocations"]))
    print(bench_models.format_summary(result["summary"]))
    print(json.dumps({"rows": bench_models.short_rows(result["rows"])}))
    _record_journaled(args, result, journal)
    return 0


def _pair(text: str, methods: Sequence[str], alone: bool = False) -> tuple[str, ...]:
    """``--pair``: two methods (or one where ``alone``), each with an optional share of the iterations
    (``dns@1/3``)."""
    names = text.split(",")
    shares_ok = all(re.fullmatch(r"[1-9]\d*/[1-9]\d*", n.partition("@")[2]) for n in names if "@" in n)
    counts = (1, 2) if alone else (2,)
    if len(names) not in counts or any(n.partition("@")[0] not in methods for n in names) or not shares_ok:
        what = "one or two methods" if alone else "two methods"
        raise CliError(f"--pair takes {what} among {', '.join(sorted(methods))} (e.g. dns@1/3,han)")
    return tuple(names)


def _bench_search(args: argparse.Namespace) -> int:
    from dns_core import bench

    archs = (args.models or ("lenet-300-100" if args.quick else "lenet-300-100,lenet-5")).split(",")
    unknown = [a for a in archs if a not in bench.PLANS]
    if unknown:
        raise CliError(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(bench.PLANS)}")
    run, show = (bench.search, bench.format_search) if args.which == "search" else (bench.promise, bench.format_promise)
    # the SearchSettings fields the options set; an option left out leaves the product's default
    given = {"first_lr": args.first_lr, "rung_lr": args.rung_lr, "splice_back": args.splice_back or None,
             "regrow": args.regrow or None, "retry_missed": False if args.no_retry else None}  # fmt: skip
    settings: dict[str, Any] = {name: v for name, v in given.items() if v is not None}
    extra: dict[str, Any] = {}
    if args.which == "search":
        extra["pair"] = _pair(args.pair, SEARCH_METHODS, alone=True)
    journal = _journal(args)
    result = run(
        archs,
        seeds=range(args.first_seed, args.first_seed + (args.seeds or (2 if args.quick else 5))),
        iterations=args.iterations,
        quick=args.quick,
        settings=settings,
        objective=args.objective,
        references="per-seed" if args.reference_per_seed else "shared",
        log=lambda s: print(s, file=sys.stderr, flush=True),
        journal=journal,
        **extra,
    )
    print(show(result["summary"]))
    print(json.dumps({"summary": result["summary"]}))
    _record_journaled(args, result, journal)
    return 0


def _bench_allocation(args: argparse.Namespace) -> int:
    from dns_core import bench_models

    names = (args.models or ",".join(bench_models.MODELS)).split(",")
    unknown = [n for n in names if n not in bench_models.MODELS]
    if unknown:
        raise CliError(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(bench_models.MODELS)}")
    result = bench_models.allocations(
        quick=args.quick,
        names=names,
        seeds=range(args.first_seed, args.first_seed + (args.seeds or 2)),
        iterations=args.iterations,
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    print(bench_models.format_allocation_summary(result["summary"]))
    print(json.dumps({"rows": result["summary"]}))
    _record_results(args, result)
    return 0


def add_engine_commands(sub: Subcommands) -> None:
    """Register compress, train-reference, pack and bench on the ``netsurgery`` subparsers."""
    c = sub.add_parser("compress", help="prune and splice a model toward a target (local, no service)")
    c.add_argument("--arch", default=None, help=f"zoo architecture (default {DEFAULT_ARCH})")
    c.add_argument("--model", help="the dense model (judged by content; default: a new --arch): ONNX, safetensors "
                   "weights of an --arch, "
                                   "or a folder or zip/tar of a Hugging Face folder or of model.onnx with its "
                                   "external data")  # fmt: skip
    c.add_argument("--weights", help=argparse.SUPPRESS)  # the earlier name of --model
    c.add_argument("--config", help="JSON config of the zoo architecture, e.g. '{\"num_classes\": 4}' (default: "
                   "the architecture's own)")  # fmt: skip
    c.add_argument("--data", default="fashion-mnist",
                   help=f"built-in set ({', '.join(BUILTIN_SETS)}) or a file: .npz/safetensors with inputs[, targets], "
                        "or IDX inputs")  # fmt: skip
    c.add_argument("--targets", help="IDX labels for IDX --data (default: none)")
    c.add_argument("--valid-data", help="validation file (default: carve --valid-fraction of --data)")
    c.add_argument("--valid-targets", help="IDX labels for IDX --valid-data (default: none)")
    c.add_argument("--valid-fraction", type=float, default=0.1,
                   help="share of the training data held out for validation when no --valid-data is given")  # fmt: skip
    c.add_argument("--method", default="dns", choices=METHODS, help="compression method")
    c.add_argument("--target", type=float, default=None,
                   help="overall compression (x) (default: none); left out, the run searches for the highest "
                        "compression within --max-drop (dns, agp and han) and writes the next-best candidates "
                        "too")  # fmt: skip
    c.add_argument("--layer-kept", help="per-layer kept fractions instead: fc1=0.02,fc2=0.05 (default: none)")
    c.add_argument("--max-drop", type=_budget, default=0.5,
                   help="accuracy budget, percentage points of validation accuracy: dns, agp and han hand over "
                        "--target only if the budget holds it, else the highest compression below it that did; "
                        "'none' holds --target whatever it costs (default %(default)s)")  # fmt: skip
    c.add_argument("--iterations", type=int, default=ITERATIONS, help="training iterations")
    c.add_argument("--lr", type=float, default=LR, help="peak learning rate of the fine-tuning")
    c.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="examples per iteration")
    c.add_argument("--objective", default="ce", choices=OBJECTIVES,
                   help="training loss: cross-entropy on the labels, or distillation from the dense model")  # fmt: skip
    c.add_argument("--crate", type=float, default=None, help=f"dns-fixed-crates only: default crate (default {CRATE})")
    c.add_argument("--crates", help="dns-fixed-crates only: per-layer crates, conv1=1,fc1=4 (default: --crate for all)")
    c.add_argument("--gamma", type=float, default=None,
                   help=f"dns-fixed-crates only: surgery probability (1+gamma*t)^-power (default {GAMMA})")  # fmt: skip
    c.add_argument("--power", type=float, default=None, help=f"dns-fixed-crates only (default {POWER})")
    c.add_argument("--iter-stop", type=int, default=None,
                   help="masks stop changing after this iteration (default: the method's)")  # fmt: skip
    c.add_argument("--include", default="*", help="Linear/Conv layer names or glob patterns to prune, "
                   "comma-separated (default: all)")  # fmt: skip
    c.add_argument("--exclude", default="",
                   help="layer names or glob patterns to leave dense, comma-separated (default: none)")  # fmt: skip
    c.add_argument(
        "--allocation", choices=ALLOCATIONS, default=ALLOCATION,
        help="how the kept weights are shared among layers: one magnitude ranking with each layer held in a "
             "band around the overall kept fraction (balanced), one threshold over all layers (global), each "
             "layer cut relative to its own spread (layer), or the same fraction everywhere (uniform) "
             "(default %(default)s)",
    )  # fmt: skip
    c.add_argument(
        "--first-last", choices=FIRST_LAST, default=FIRST_LAST_DEFAULT,
        help="the first convolution and the classifier head: kept dense, pruned, or auto: dense while they take "
             f"at most {EDGE_SHARE * 100:.0f}%% of the weights the target keeps (default %(default)s)",
    )  # fmt: skip
    c.add_argument("--seed", type=int, default=0, help="seed of the data order and the surgery's draws")
    c.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (CUDA when there is one)")
    c.add_argument("--checkpoint", help="checkpoint file: written every --checkpoint-every, resumed if present "
                   "(default: none)")  # fmt: skip
    c.add_argument("--checkpoint-every", type=int, default=1000, help="iterations between checkpoints")
    c.add_argument(
        "--codec",
        choices=CODECS,
        default=None,
        help="also write the sparse file with compressed values (accuracy effect in the report; default: none)",
    )
    c.add_argument("--clusters", type=int, default=256, help="codebook size of --codec shared (2-256)")
    c.add_argument("--out", default="out", help="output folder (model, sparse model, report.json)")
    c.set_defaults(func=cmd_compress)

    r = sub.add_parser("train-reference", help="train a converged dense reference model")
    r.add_argument("--arch", default=DEFAULT_ARCH, help="zoo architecture to train")
    r.add_argument("--data", default="fashion-mnist", help="built-in set or data file to train on")
    r.add_argument("--epochs", type=int, default=20, help="passes over the training data")
    r.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the data order")
    r.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (CUDA when there is one)")
    r.add_argument("--out", default="reference.safetensors", help="where the trained weights go")
    r.set_defaults(func=cmd_train_reference)

    k = sub.add_parser("pack", help="write pruned weights as a compact sparse file and print its size")
    k.add_argument("weights", help="pruned weights (safetensors, dense with zeros)")
    k.add_argument("--out", help="output file (default: <weights>.sparse[.<codec>].safetensors)")
    k.add_argument("--codec", choices=CODECS, default=None, help="compress the weight values (default: none)")
    k.add_argument("--clusters", type=int, default=256, help="codebook size of --codec shared (2-256)")
    k.add_argument("--data", default=None, help="built-in set whose test split measures accuracy before and after "
                   "(default: none, no accuracy)")  # fmt: skip
    k.set_defaults(func=cmd_pack)

    b = sub.add_parser("bench", help="benchmarks: the paper table, step overhead, budgets, the service's figures")
    b.add_argument(
        "which", choices=["table", "overhead", "service", "versus", "models", "allocation", "search", "promise"]
    )
    b.add_argument("--quick", action="store_true", help="table, versus, models, allocation, search, promise: a "
                   "small run (table: under 5 minutes on 2 cores; models: smaller models and budgets, under 10 "
                   "minutes)")  # fmt: skip
    b.add_argument("--models", default=None, help="table, versus, search, promise: zoo models (default "
                   "lenet-300-100,lenet-5; search and promise --quick: lenet-300-100); models, allocation: "
                   "resnet-20,vit")  # fmt: skip
    b.add_argument("--methods", default=None, help="table, models: subset of methods (default: all rows)")
    b.add_argument("--iterations", type=int, default=None,
                   help="table, versus, models, allocation, search, promise: iteration budget per run (default: the "
                   "benchmark's own, smaller with --quick)")  # fmt: skip
    b.add_argument("--allocation", choices=ALLOCATIONS, default=ALLOCATION,
                   help="models: the allocation rule of the searches (default %(default)s)")  # fmt: skip
    b.add_argument("--ramp-updates", type=_non_negative_int, default=None,
                   help="models: DNS's fewest mask updates on its ramp (0: one every 50 iterations; default: the "
                   "product's, 64)")  # fmt: skip
    b.add_argument("--dns-schedule", type=_schedule_fractions, default=None, metavar="RAMP_END,SURGERY_END",
                   help="models: where DNS's ramp reaches the target and where its splicing stops, as fractions of "
                   "each run (default: the product's, 0.3,0.5; AGP's ramp ends at 0.5)")  # fmt: skip
    b.add_argument("--start", type=_compression, default=None, metavar="COMPRESSION",
                   help="models: the first compression each search asks, taken to the nearest rung of its ladder "
                   "(default: the model's own: 5.96 for ResNet-20, 3.05 for the ViT, 3.81 with --quick)")  # fmt: skip
    b.add_argument("--steps", type=int, default=300, help="overhead: timed steps")
    b.add_argument("--first-lr", type=float, default=None, help="search, promise: the first rung's peak learning "
                   "rate relative to the run's (default: the product's)")  # fmt: skip
    b.add_argument("--rung-lr", type=float, default=None, help="search, promise: the later rungs' peak learning "
                   "rate relative to the run's (default: the product's)")  # fmt: skip
    b.add_argument("--objective", default="ce", choices=OBJECTIVES,
                   help="search, promise: every run's training loss (ce+distill adds distillation from the dense "
                   "reference; default %(default)s)")  # fmt: skip
    b.add_argument("--splice-back", action="store_true",
                   help="search, promise: after a rung misses the budget, DNS retargets down from the state it "
                   "reached, splicing weights back, instead of restoring the last state that held")  # fmt: skip
    b.add_argument("--regrow", action="store_true",
                   help="search, promise: after a rung that holds the budget, the climb's step grows back to its "
                   "square (up to its first size) instead of staying as small as the last miss left it")  # fmt: skip
    b.add_argument("--no-retry", action="store_true",
                   help="search, promise: once a compression misses the budget, later rungs stay below the lowest "
                   "miss instead of aiming at it again (judged again on the same validation images)")  # fmt: skip
    b.add_argument("--reference-per-seed", action="store_true",
                   help="search, promise: each seed's runs start from a reference trained with that seed (default: "
                   "every run from the seed-0 reference, the seed varying the run only)")  # fmt: skip
    b.add_argument("--resume", action="store_true",
                   help="search, promise, models: read back the runs that a stopped bench with the same arguments "
                   "finished (kept in <results>.runs.jsonl until the results file is written) instead of training "
                   "them again")  # fmt: skip
    b.add_argument("--agp-target", type=float, default=40.0, help="versus: AGP's compression")
    b.add_argument("--ratio", type=float, default=1.25, help="versus: DNS is asked for ratio × AGP's compression")
    b.add_argument("--seeds", type=int, default=None, help="versus, search, promise: training seeds 0..N-1 from "
                   "--first-seed (default 5; with --quick 2); allocation: the same (default 2); models: the same, "
                   "a reference per seed (default 1)")  # fmt: skip
    b.add_argument("--first-seed", type=int, default=0, help="the first training seed of --seeds (to extend a run)")
    b.add_argument("--pair", default="dns,agp", help="versus: the two methods; the first is asked for ratio × the "
                   "second's compression (e.g. dns@1/3,han with --ratio 1); search: the two methods compared "
                   "(dns, agp or han, e.g. dns@1/5,han), or one method run alone (e.g. dns)")  # fmt: skip
    b.add_argument(
        "--results",
        default=None,
        metavar="PATH",
        help="the raw results' JSON file (default: docs/results/<kind>.json, "
        "kind: table, table-quick, versus, versus-quick, models, models-quick, allocation, allocation-quick, "
        "search, search-quick, promise, promise-quick, overhead, service)",
    )
    add_numerics(b, default=_bench_numerics, default_help="portable where the CPU has AVX2 and no GPU trains, "
                 f"else native; native for the timing benchmarks ({', '.join(TIMING_BENCHES)})")  # fmt: skip
    b.set_defaults(func=cmd_bench, option_defaults={dest: b.get_default(dest) for dest in BENCH_OPTIONS})
