"""The engine on a CUDA GPU: the model suite through the engine's doors, and the surgery step's cost.

Run by ``scripts/gpu-check.sh`` on a GPU machine that has torch, transformers (and, for the
torchvision/timm door, ``scripts/gpu_named_check.py``) installed; it imports netsurgery from the
checkout (``PYTHONPATH=.``), installs nothing and downloads nothing. Each section prints one JSON
line per row and appends it to ``--out``; the exit status is non-zero if any check fails.

- ``suite``: each model of :data:`dns_core.suite.SUITE` written as a Hugging Face folder, loaded by
  :func:`dns_core.artifacts.load_model_file`, compressed on CUDA (DNS, 2x, a short run), written back
  by :func:`dns_core.artifacts.write_artifacts`; the folder must load with
  ``AutoModelFor….from_pretrained`` and agree with the engine's model to 1e-4 (fp32, on the GPU).
- ``large``: BERT-base and ViT-base (transformers' default configs, random weights) through the same
  door, a short DNS run on CUDA: iterations per second and peak memory.
- ``step``: a training step of torchvision's ResNet-50 at batch 256 under bf16 autocast and
  channels_last, dense against surgery (DNS masks on every convolution and linear layer, the
  masks updated every step: the expensive end of the schedule); medians of CUDA-event times, one
  after the other in one process, and the peak memory of each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def emit(row: dict[str, Any], out: Path | None) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if out is not None:
        with open(out, "a") as f:
            f.write(line + "\n")


def suite_rows(device: str, out: Path | None) -> bool:
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    from dns_core import suite
    from dns_core.artifacts import load_model_file, write_artifacts
    from dns_core.data import Dataset
    from dns_core.spec import CompressSpec

    torch.backends.cuda.matmul.allow_tf32 = False  # the 1e-4 comparison is of fp32 results
    torch.backends.cudnn.allow_tf32 = False
    ok = True
    for name in sorted(suite.SUITE):
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            folder = suite.write_suite_folder(name, Path(tmp) / name)
            loaded = load_model_file(folder)
            mi = loaded.model_input
            assert mi is not None
            g = torch.Generator().manual_seed(0)
            if mi.kind == "tokens":
                ids = torch.randint(1, min(mi.vocab_size or 100, 100), (256, mi.shape[0]), generator=g)
                x = torch.stack([ids, torch.ones_like(ids)], 1)
                y = ids[:, 0] % 2
            else:
                x = torch.rand(256, *mi.shape, generator=g)
                y = (x[:, 0].mean((1, 2)) > 0.5).long()
            train, valid = Dataset(x[:224], y[:224]), Dataset(x[224:], y[224:])
            spec = CompressSpec(method="dns", compression=2.0, max_accuracy_drop=100, iterations=60, batch_size=32,
                                device=device)  # fmt: skip
            result = spec.compress(loaded.module.to(device), train, valid)
            made = write_artifacts(Path(tmp) / "out", loaded, result.model.cpu(), result.report)
            auto = AutoModelForSequenceClassification if mi.kind == "tokens" else AutoModelForImageClassification
            theirs = auto.from_pretrained(str(Path(tmp) / "out")).to(device).eval()
            engine = result.model.to(device).eval()
            sample = valid.inputs[:8].to(device)
            with torch.no_grad():
                want = engine(sample)
                if mi.kind == "tokens":
                    have = theirs(input_ids=sample[:, 0], attention_mask=sample[:, 1]).logits
                else:
                    have = theirs(pixel_values=sample).logits
            diff = float((want - have).abs().max())
            compression = float(made.report["compression"])
            good = diff <= 1e-4 and abs(compression - 2.0) <= 0.1
            ok &= good
            emit({"section": "suite", "model": name, "door": "hf", "device": device, "ok": good,
                  "compression": round(compression, 3), "max_abs_diff": diff,
                  "seconds": round(time.perf_counter() - t0, 2)}, out)  # fmt: skip
    return ok


def large_rows(device: str, out: Path | None, iterations: int) -> bool:
    """BERT-base and ViT-base (transformers' default configs, random weights) through the HF door on CUDA:
    a short DNS run at batch 32, its iterations per second and peak memory."""
    from transformers import BertConfig, BertForSequenceClassification, ViTConfig, ViTForImageClassification

    from dns_core.artifacts import load_model_file
    from dns_core.data import Dataset
    from dns_core.spec import CompressSpec

    ok = True
    bert, vit = BertConfig(), ViTConfig()
    bert.num_labels, vit.num_labels = 2, 10
    builds: dict[str, Any] = {
        "bert-base": (BertForSequenceClassification, bert),
        "vit-base": (ViTForImageClassification, vit),
    }
    for name, (cls, config) in builds.items():
        with tempfile.TemporaryDirectory() as tmp:
            torch.manual_seed(0)
            cls(config).save_pretrained(Path(tmp) / name)
            loaded = load_model_file(Path(tmp) / name)
            mi = loaded.model_input
            assert mi is not None
            n = 32 * 8
            if mi.kind == "tokens":
                ids = torch.randint(1, 1000, (n, mi.shape[0]))
                x, y = torch.stack([ids, torch.ones_like(ids)], 1), ids[:, 0] % 2
            else:
                x = torch.rand(n, *mi.shape)
                y = (x[:, 0].mean((1, 2)) > 0.5).long() * 3
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            spec = CompressSpec(method="dns", compression=3.0, max_accuracy_drop=100, iterations=iterations,
                                batch_size=32, device=device)  # fmt: skip
            result = spec.compress(loaded.module.to(device), Dataset(x[:224], y[:224]), Dataset(x[224:], y[224:]))
            seconds = time.perf_counter() - t0
            compression = float(result.report["compression"])
            good = abs(compression - 3.0) <= 0.15
            ok &= good
            peak = torch.cuda.max_memory_allocated() / 2**30
            emit({"section": "large", "model": name, "device": device, "ok": good,
                  "parameters": int(result.report["total_parameters"]), "input": list(mi.shape),
                  "compression": round(compression, 3), "iterations": iterations,
                  "it_per_s": round(iterations / seconds, 2), "peak_gib": round(peak, 2),
                  "seconds": round(seconds, 2)}, out)  # fmt: skip
    return ok


def step_rows(device: str, out: Path | None, steps: int, batch: int) -> bool:
    import torchvision

    from dns_core.methods import make_surgery
    from dns_core.spec import CompressSpec

    torch.manual_seed(0)
    x = torch.randn(batch, 3, 224, 224, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)
    results: dict[str, Any] = {}
    for side in ("dense", "surgery"):
        model = torchvision.models.resnet50(weights=None).to(device).to(memory_format=torch.channels_last)
        surgery = None
        if side == "surgery":
            spec = CompressSpec(method="dns-fixed-crates", crate=0.5, iter_stop=10**9, iterations=10**6)
            surgery = make_surgery(spec.method, model, spec.iterations, spec.target(), spec.method_settings())
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(steps + 10):
            start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            start.record()
            if surgery is not None:
                surgery.step(i)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            end.record()
            end.synchronize()
            if i >= 10:
                times.append(start.elapsed_time(end))
        results[side] = (statistics.median(times), torch.cuda.max_memory_allocated() / 2**30)
        del model, opt, surgery
        torch.cuda.empty_cache()
    ratio = results["surgery"][0] / results["dense"][0]
    emit({"section": "step", "model": "torchvision:resnet50", "batch": batch, "dtype": "bf16", "steps": steps,
          "dense_step_ms": round(results["dense"][0], 2), "surgery_step_ms": round(results["surgery"][0], 2),
          "ratio": round(ratio, 3), "dense_peak_gib": round(results["dense"][1], 2),
          "surgery_peak_gib": round(results["surgery"][1], 2), "ok": ratio <= 1.05}, out)  # fmt: skip
    return bool(ratio <= 1.05)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("section", choices=["suite", "large", "step"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=None, help="append the JSON rows to this file")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--iterations", type=int, default=100, help="large: DNS iterations")
    args = p.parse_args()
    if args.section == "suite":
        return 0 if suite_rows(args.device, args.out) else 1
    if not torch.cuda.is_available():
        print(f"{args.section}: needs CUDA; skipped", file=sys.stderr)
        return 0
    if args.section == "large":
        return 0 if large_rows(args.device, args.out, args.iterations) else 1
    return 0 if step_rows(args.device, args.out, args.steps, args.batch) else 1


if __name__ == "__main__":
    sys.exit(main())
