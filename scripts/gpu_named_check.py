"""The torchvision/timm door end to end: a model by name, compressed, loaded back by its own library.

Run by ``scripts/gpu-check.sh`` on a GPU machine with torchvision and timm installed (it installs
and downloads nothing; ``PYTHONPATH=.`` imports netsurgery from the checkout)::

    PYTHONPATH=. python3 scripts/gpu_named_check.py [--out rows.jsonl] [--device cuda]

For each model of :data:`MODELS` (random weights, small configs):

1. the config is checked (:func:`dns_core.named.check_named_config`) and the model built
   (:func:`dns_core.named.build_named`);
2. its state dict is written as safetensors (:func:`dns_core.io.save_model`), and the file goes
   through the door's checks: :func:`dns_core.uploads.validate_safetensors`, the state against the
   model built on the meta device (:func:`dns_core.named.check_named_state`), and
   :func:`dns_core.io.load_model` rebuilding it from the file's header;
3. DNS compresses it (5x, a few iterations, batch 8) on synthetic images of the shape and
   normalisation :func:`dns_core.named.named_input` gives;
4. the result is written as safetensors and loaded, with ``load_state_dict`` (strict), into the
   model the library's own constructor builds (``torchvision.models.get_model(name, weights=None,
   **config)`` / ``timm.create_model(name, pretrained=False, **config)``); its outputs must agree
   with the engine's model to 1e-4 (fp32, TF32 off).

One JSON line per model (seconds, compression, max abs diff) is printed and appended to ``--out``.
The exit status is non-zero if any model fails; models of a library that does not import are
skipped with a message (exit 0 when nothing failed).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from gpu_check import emit  # the sibling script (its folder is first on sys.path when run as a script)

#: (architecture, config): small, so that the whole run takes about a minute on one GPU.
MODELS: list[tuple[str, dict[str, Any]]] = [
    ("torchvision:resnet18", {"num_classes": 10}),
    ("torchvision:mobilenet_v3_small", {"num_classes": 10}),
    ("torchvision:efficientnet_b0", {"num_classes": 10}),
    ("timm:convnext_atto", {"num_classes": 10, "in_chans": 1}),
    ("timm:vit_tiny_patch16_224", {"num_classes": 10, "img_size": 96}),
    ("timm:resnet18", {"num_classes": 10, "drop_rate": 0.1}),
]
TARGET = 5.0
TOLERANCE = 1e-4


def synthetic(shape: tuple[int, ...], mean: Any, std: Any, classes: int, n: int, seed: int = 0) -> Any:
    """``n`` random images in [0, 1] of ``shape``, normalised like the model's inputs, with random labels."""
    from dns_core.data import Dataset

    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *shape, generator=g)
    if mean is not None and std is not None:
        x = (x - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
    y = torch.randint(0, classes, (n,), generator=g)
    return Dataset(x, y)


def their_model(arch: str, config: dict[str, Any]) -> torch.nn.Module:
    """The library's own constructor, as a user of the compressed file would call it."""
    library, name = arch.split(":", 1)
    if library == "torchvision":
        import torchvision

        model: torch.nn.Module = torchvision.models.get_model(name, weights=None, **config)
    else:
        import timm

        model = timm.create_model(name, pretrained=False, **config)
    return model


def check_one(arch: str, raw: dict[str, Any], device: str, iterations: int, tmp: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    from dns_core import named
    from dns_core.io import load_model, save_model
    from dns_core.spec import CompressSpec
    from dns_core.uploads import validate_safetensors

    t0 = time.perf_counter()
    config = named.check_named_config(arch, raw)
    mi = named.named_input(arch, config)
    torch.manual_seed(0)
    model = named.build_named(arch, **config)

    # the door: a safetensors state dict, checked from its header, rebuilt from the file
    dense = tmp / "dense.safetensors"
    save_model(dense, model, arch, config)
    n_params = named.check_named_state(arch, config, validate_safetensors(dense))
    loaded, loaded_arch = load_model(dense)
    assert loaded_arch == arch, (loaded_arch, arch)

    data = synthetic(mi.shape, mi.mean, mi.std, int(config.get("num_classes", 1000)), 96)
    train, valid = data.subset(torch.arange(80)), data.subset(torch.arange(80, 96))
    spec = CompressSpec(method="dns", compression=TARGET, iterations=iterations, batch_size=8, device=device)
    result = spec.compress(loaded.to(device), train, valid)
    compression = float(result.report["compression"])

    # out: a plain state dict that the library's own constructor loads (strict)
    compressed = tmp / "compressed.safetensors"
    save_model(compressed, result.model, arch, config)
    validate_safetensors(compressed)
    state = load_file(str(compressed))
    theirs = their_model(arch, config)
    theirs.load_state_dict(state, strict=True)
    again, _ = load_model(compressed)  # and the engine reads its own output back

    engine = result.model.to(device).eval()
    theirs = theirs.to(device).eval()
    again = again.to(device).eval()
    sample = valid.inputs[:8].to(device)
    with torch.no_grad():
        want = engine(sample)
        diff = float((want - theirs(sample)).abs().max())
        diff_engine = float((want - again(sample)).abs().max())
    zeros = sum(int((v == 0).sum()) for k, v in state.items() if k.endswith("weight") and v.dim() > 1)
    weights = sum(v.numel() for k, v in state.items() if k.endswith("weight") and v.dim() > 1)
    ok = diff <= TOLERANCE and diff_engine <= TOLERANCE and abs(compression - TARGET) <= 0.1 * TARGET
    return {
        "section": "named",
        "model": arch,
        "config": config,
        "input": list(mi.shape),
        "device": device,
        "ok": ok,
        "parameters": n_params,
        "compression": round(compression, 3),
        "zero_weight_fraction": round(zeros / max(weights, 1), 4),
        "max_abs_diff": diff,
        "max_abs_diff_reloaded": diff_engine,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=None, help="append the JSON rows to this file")
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--models", default=None, help="comma-separated architectures (default: all of MODELS)")
    args = p.parse_args()

    from dns_core import named
    from dns_core.errors import ModelError

    # compare in true fp32: TF32 would make both sides round differently from run to run
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    chosen = MODELS
    if args.models:
        wanted = [m.strip() for m in args.models.split(",") if m.strip()]
        chosen = [(a, {"num_classes": 10}) for a in wanted]
        chosen = [next((m for m in MODELS if m[0] == a), (a, c)) for a, c in chosen]

    missing: dict[str, str] = {}
    for lib in sorted({a.split(":", 1)[0] for a, _ in chosen}):
        try:
            named.library(lib)
        except ModelError as e:
            missing[lib] = str(e)
    if missing:
        for lib, why in missing.items():
            print(f"gpu_named_check: {lib} models skipped: {why}", file=sys.stderr)
    failed = 0
    ran = 0
    for arch, raw in chosen:
        lib = arch.split(":", 1)[0]
        if lib in missing:
            emit({"section": "named", "model": arch, "skipped": missing[lib]}, args.out)
            continue
        ran += 1
        with tempfile.TemporaryDirectory() as tmp:
            try:
                row = check_one(arch, raw, args.device, args.iterations, Path(tmp))
            except Exception as e:
                traceback.print_exc()
                row = {"section": "named", "model": arch, "device": args.device, "ok": False,
                       "error": f"{type(e).__name__}: {e}"}  # fmt: skip
        failed += not row["ok"]
        emit(row, args.out)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if ran == 0:
        print("gpu_named_check: nothing to run (torchvision/timm not installed); skipped", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
