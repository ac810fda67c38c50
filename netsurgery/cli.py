"""``netsurgery``: compress, train-reference and bench (dns_core only; no web imports)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dns_core.sparse import PackStats

DEFAULT_ARCH = "lenet-300-100"
DEFAULT_TARGET = 40.0
DEFAULT_ITERATIONS = 25_000


class CliError(Exception):
    """An error a person can act on: printed as one line, exit status 2."""


def _pairs(text: str | None, what: str) -> dict[str, float] | None:
    """Parse ``name=value,name=value``."""
    if not text:
        return None
    out = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise CliError(f"{what}: expected name=number, got {item!r}") from None
        if not sep:
            raise CliError(f"{what}: expected name=number, got {item!r}")
    return out


def _load_data(name: str) -> tuple[Any, Any, Any]:
    from dns_core.bench import fashion_splits
    from dns_core.data import load_digits

    if name == "fashion-mnist":
        return fashion_splits()
    if name == "digits":
        train, valid = load_digits()
        return train, valid, None
    raise CliError(f"unknown data set {name!r}; built-in sets: fashion-mnist, digits")


class _Bar:
    """A rich progress bar fed by dns_core's progress callback."""

    def __init__(self, description: str, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            transient=False,
        )
        self.task = self.progress.add_task(description, total=total, status="")
        self.last_acc: float | None = None

    def __enter__(self) -> _Bar:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, p: Any) -> None:
        if p.val_acc is not None:
            self.last_acc = p.val_acc
        parts = [f"loss {p.loss:.3f}"]
        if self.last_acc is not None:
            parts.append(f"val {self.last_acc:.2f}%")
        if p.compression is not None:
            parts.append(f"{p.compression:.1f}x")
        self.progress.update(self.task, completed=p.iteration, status="  ".join(parts))


def cmd_train_reference(args: argparse.Namespace) -> int:
    from dns_core.io import save_model
    from dns_core.reference import train_reference
    from dns_core.train import Callbacks, evaluate

    train, valid, test = _load_data(args.data)
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


def cmd_compress(args: argparse.Namespace) -> int:
    from dns_core.compress import compress
    from dns_core.io import load_model, save_model
    from dns_core.methods import MethodSettings
    from dns_core.reference import cached_reference
    from dns_core.sparse import save_sparse
    from dns_core.surgery import SurgeryError, Target
    from dns_core.train import Callbacks, TrainConfig

    train, valid, test = _load_data(args.data)
    if args.weights:
        try:
            model, arch = load_model(args.weights, args.arch)
        except (OSError, ValueError) as e:
            raise CliError(f"cannot load weights from {args.weights}: {e}") from None
    else:
        arch = args.arch or DEFAULT_ARCH
        print(f"no --weights given: using a converged {arch} reference trained on {args.data} (cached)")
        with _Bar(f"reference {arch}", 20 * (len(train) // 64)) as bar:
            model, _ = cached_reference(arch, train, tag=f"{args.data}-cli", callbacks=Callbacks(on_progress=bar))
    layer_kept = _pairs(args.layer_kept, "--layer-kept")
    try:
        target = None
        if args.method != "dns-fixed-crates":
            target = Target(
                compression=None if layer_kept else args.target, layer_kept=layer_kept, max_accuracy_drop=args.max_drop
            )
        settings = MethodSettings(
            crate=args.crate,
            crates=_pairs(args.crates, "--crates"),
            gamma=args.gamma,
            power=args.power,
            iter_stop=args.iter_stop,
            include=args.include.split(","),
            exclude=args.exclude.split(",") if args.exclude else (),
        )
        cfg = TrainConfig(
            iterations=args.iterations,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            objective=args.objective,
            device=args.device,
            eval_every=max(args.iterations // 25, 1),
            checkpoint_every=args.checkpoint_every,
        )
        with _Bar(f"{args.method} {arch}", args.iterations) as bar:
            result = compress(
                model,
                train,
                valid,
                method=args.method,
                target=target,
                config=cfg,
                settings=settings,
                test=test,
                callbacks=Callbacks(on_progress=bar),
                checkpoint=args.checkpoint,
            )
    except (SurgeryError, ValueError) as e:
        raise CliError(str(e)) from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_model(out / "model.safetensors", result.model, arch)
    packed = save_sparse(out / "model.sparse.safetensors", result.model.state_dict(),
                         {"netsurgery.arch": arch})  # fmt: skip
    report = result.report | {"arch": arch, "data": args.data, "sparse_file": _pack_summary(packed)}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    _print_report(report)
    _print_pack(packed, (out / "model.safetensors").stat().st_size)
    print(f"wrote {out / 'model.safetensors'}, {out / 'model.sparse.safetensors'} and {out / 'report.json'}")
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
    from dns_core.io import load_model
    from dns_core.sparse import save_sparse

    try:
        model, arch = load_model(args.weights)
    except (OSError, ValueError) as e:
        raise CliError(f"cannot load weights from {args.weights}: {e}") from None
    out = Path(args.out or str(args.weights).replace(".safetensors", "") + ".sparse.safetensors")
    packed = save_sparse(out, model.state_dict(), {"netsurgery.arch": arch})
    _print_pack(packed, Path(args.weights).stat().st_size)
    print(json.dumps({"file": str(out)} | _pack_summary(packed)))
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


def cmd_bench(args: argparse.Namespace) -> int:
    from dns_core import bench

    if args.which == "overhead":
        print(json.dumps(bench.overhead(steps=args.steps)))
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
    print(json.dumps({"rows": [{k: v for k, v in r.items() if k not in ("layers", "backoffs")} for r in rows]}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="netsurgery", description="Dynamic Network Surgery: compress neural networks.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="prune and splice a model toward a target (local, no service)")
    c.add_argument("--arch", default=None, help=f"zoo architecture (default {DEFAULT_ARCH})")
    c.add_argument("--weights", help="dense weights (safetensors); default: a cached converged reference")
    c.add_argument("--data", default="fashion-mnist", help="built-in data set: fashion-mnist or digits")
    c.add_argument("--method", default="dns", choices=["dns", "dns-fixed-crates", "han", "one-shot", "agp"])
    c.add_argument("--target", type=float, default=DEFAULT_TARGET, help="overall compression (x)")
    c.add_argument("--layer-kept", help="per-layer kept fractions instead: fc1=0.02,fc2=0.05")
    c.add_argument("--max-drop", type=float, default=0.5, help="accuracy budget in percentage points")
    c.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS)
    c.add_argument("--lr", type=float, default=0.01)
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--objective", default="ce", choices=["ce", "distill", "ce+distill"])
    c.add_argument("--crate", type=float, default=1.0, help="dns-fixed-crates: default crate")
    c.add_argument("--crates", help="dns-fixed-crates: per-layer crates, conv1=1,fc1=4")
    c.add_argument("--gamma", type=float, default=1e-4)
    c.add_argument("--power", type=float, default=1.0)
    c.add_argument("--iter-stop", type=int, default=None)
    c.add_argument("--include", default="*", help="layer name patterns to prune (comma-separated)")
    c.add_argument("--exclude", default="", help="layer name patterns to leave dense")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--device", default="auto")
    c.add_argument("--checkpoint", help="checkpoint file: written every --checkpoint-every, resumed if present")
    c.add_argument("--checkpoint-every", type=int, default=1000)
    c.add_argument("--out", default="out", help="output folder (model.safetensors, report.json)")
    c.set_defaults(func=cmd_compress)

    r = sub.add_parser("train-reference", help="train a converged dense reference model")
    r.add_argument("--arch", default=DEFAULT_ARCH)
    r.add_argument("--data", default="fashion-mnist")
    r.add_argument("--epochs", type=int, default=20)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", default="auto")
    r.add_argument("--out", default="reference.safetensors")
    r.set_defaults(func=cmd_train_reference)

    k = sub.add_parser("pack", help="write pruned weights as a compact sparse file and print its size")
    k.add_argument("weights", help="pruned weights (safetensors, dense with zeros)")
    k.add_argument("--out", help="output file (default: <weights>.sparse.safetensors)")
    k.set_defaults(func=cmd_pack)

    b = sub.add_parser("bench", help="benchmarks: the paper table, surgery step overhead")
    b.add_argument("which", choices=["table", "overhead"])
    b.add_argument("--quick", action="store_true", help="a small run (under 5 minutes on 2 cores)")
    b.add_argument("--models", default="lenet-300-100,lenet-5")
    b.add_argument("--methods", default=None, help="subset of methods (default: all rows)")
    b.add_argument("--iterations", type=int, default=None, help="iteration budget per method")
    b.add_argument("--steps", type=int, default=300, help="overhead: timed steps")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except CliError as e:
        print(f"netsurgery: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("netsurgery: interrupted", file=sys.stderr)
        return 130
