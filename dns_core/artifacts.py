"""Models in (judged by content) and artifacts out (dense, sparse, report).

Models come as an ONNX graph (with its external data, as a folder or archive), safetensors weights
of a built-in or torchvision/timm architecture, or a Hugging Face folder (a folder or archive).

The command line and the service worker both go through :func:`load_model_file` and
:func:`write_artifacts`, so a job's downloads are the same files ``netsurgery compress`` writes:

- ``model.onnx`` or ``model.safetensors``: the pruned model, dense with zeros, in the upload's format
  (a Hugging Face folder comes back as ``config.json``, ``model.safetensors`` and its side files, a
  folder that ``AutoModelFor….from_pretrained`` loads);
- ``model.sparse.safetensors``: only the kept values and a compact index (docs/sparse-format.md);
- ``model.sparse.<codec>.safetensors``: the same with compressed values, when a codec is asked for;
- ``report.html``: the report for people, one self-contained page (inline CSS, SVG charts), and
  ``compression.png``, ``accuracy.png``, ``layers.png``: its charts as images;
- ``report.json``: per-layer kept/total, accuracy before/after (and after the codec), compression in
  parameters and bytes, iterations, settings, seed, package versions, and the sha256 of every input
  and every other output.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import models, uploads
from .bundles import HF_CONFIG, HF_SIDE_FILES, HF_WEIGHTS, ModelFolder, classify_folder, open_bundle
from .inputs import ModelInput
from .io import load_model, save_model
from .report_html import render_chart_pngs, render_report_html
from .sparse import PackStats, load_sparse, save_sparse

if TYPE_CHECKING:
    from .compress import Candidate

DENSE_SAFETENSORS = "model.safetensors"
DENSE_ONNX = "model.onnx"
SPARSE = "model.sparse.safetensors"
REPORT = "report.json"
#: what a report consists of: the JSON, the page and its charts
REPORT_FILES = ("report.json", "report.html", "compression.png", "accuracy.png", "layers.png")
REPORT_HTML = "report.html"
#: Parameters and activations a model may need (estimated) before it is refused (the service sets its own).
MAX_MODEL_MEMORY = 48 * 2**30
_PACKAGES = ("netsurgery", "torch", "numpy", "safetensors", "onnx", "onnxruntime", "transformers")


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Bytes and sha256 of a file; of a folder (a model of several files), its files' and a digest of them."""
    p = Path(path)
    if not p.is_dir():
        return {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    files = {f.relative_to(p).as_posix(): file_record(f) for f in sorted(p.rglob("*")) if f.is_file()}
    digest = hashlib.sha256("".join(f"{name}\0{r['sha256']}\n" for name, r in files.items()).encode())
    return {"bytes": sum(r["bytes"] for r in files.values()), "sha256": digest.hexdigest(), "files": files}


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


@dataclass
class LoadedModel:
    """A user's model, ready for surgery, and what is needed to write it back in its own format."""

    module: nn.Module
    format: str  # "onnx", "safetensors" or "hf"
    arch: str | None = None  # built-in or torchvision/timm architecture (safetensors), HF class (hf)
    config: dict[str, Any] = field(default_factory=dict)
    model_input: ModelInput | None = None  # what one example looks like, when the model says
    side_files: dict[str, bytes] = field(default_factory=dict)  # HF preprocessing/tokeniser files, copied out


def load_model_file(
    path: str | os.PathLike[str],
    arch: str | None = None,
    config: dict[str, Any] | None = None,
    *,
    max_bytes: int = uploads.MAX_FILE_BYTES,
    max_memory_bytes: int = MAX_MODEL_MEMORY,
) -> LoadedModel:
    """Load a model, judged by content: an ONNX graph, safetensors weights of ``arch``, or a folder
    or archive holding a Hugging Face folder or an ONNX graph with external data; refuse the rest."""
    p = Path(path)
    if p.is_dir():
        return _load_folder(classify_folder(p), max_bytes, max_memory_bytes)
    kind = uploads.sniff(p, max_bytes=max_bytes).kind
    if kind == "onnx":
        from .onnx_convert import check_onnx

        facts = check_onnx(p, max_bytes=max_bytes, max_memory_bytes=max_memory_bytes)
        return LoadedModel(facts.module, "onnx", model_input=facts.model_input)
    if kind == "safetensors":
        module, name = load_model(p, arch, config, max_bytes=max_bytes)
        cfg = dict(config) if config is not None else _header_config(p)
        return LoadedModel(module, "safetensors", arch=name, config=cfg, model_input=models.model_input(name, cfg))
    if kind in ("zip", "tar"):
        with tempfile.TemporaryDirectory(prefix="netsurgery-model-") as tmp:
            return _load_folder(open_bundle(p, Path(tmp), max_expanded=max_bytes), max_bytes, max_memory_bytes)
    raise uploads.RefusedFormat(f"{p.name}: {kind} data is not a model; upload ONNX or safetensors weights")


def _load_folder(folder: ModelFolder, max_bytes: int, max_memory_bytes: int) -> LoadedModel:
    """A recognised model folder, loaded; everything it needs is read before the folder may go."""
    if folder.kind == "hf":
        from .hf import inspect_hf_folder, load_hf_folder

        hf = inspect_hf_folder(folder.root, max_bytes=max_memory_bytes)
        wrapped = load_hf_folder(folder.root)
        side = {n: (folder.root / n).read_bytes() for n in folder.files if n in HF_SIDE_FILES}
        return LoadedModel(wrapped, "hf", arch=hf.architecture, model_input=wrapped.model_input, side_files=side)
    from .onnx_convert import check_onnx

    facts = check_onnx(folder.main, max_bytes=max_bytes, max_memory_bytes=max_memory_bytes, external_dir=folder.root)
    return LoadedModel(facts.module, "onnx", model_input=facts.model_input)


def _header_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The config in the file's header (load_model checked it); reads the header only, no tensors."""
    meta = uploads.validate_safetensors(path).metadata
    value = json.loads(meta.get("netsurgery.config", "{}"))
    return value if isinstance(value, dict) else {}


def save_dense(loaded: LoadedModel, module: nn.Module, out_dir: str | os.PathLike[str]) -> Path:
    """Write ``module`` (squashed: W ⊙ T) dense-with-zeros in the format the model came in."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if loaded.format == "onnx":
        from .onnx_export import export_onnx

        path = out / DENSE_ONNX
        path.write_bytes(export_onnx(module))  # type: ignore[arg-type]
        return path
    if loaded.format == "hf":
        from .hf import save_hf_folder

        save_hf_folder(module, out)  # type: ignore[arg-type]
        for name, raw in loaded.side_files.items():
            (out / name).write_bytes(raw)
        return out / HF_WEIGHTS
    path = out / DENSE_SAFETENSORS
    save_model(path, module, loaded.arch or "unknown", loaded.config)
    return path


@dataclass
class Artifacts:
    report: dict[str, Any]
    files: dict[str, Path]  # name -> path, report.html, the PNG charts and report.json included
    packed: PackStats


def write_artifacts(
    out_dir: str | os.PathLike[str],
    loaded: LoadedModel,
    module: nn.Module,
    report: dict[str, Any],
    *,
    inputs: Mapping[str, str | os.PathLike[str] | dict[str, Any]] | None = None,
    codec: str | None = None,
    clusters: int = 256,
    evaluate: Callable[[nn.Module], dict[str, float | None]] | None = None,
    candidates: Sequence[Candidate] = (),
) -> Artifacts:
    """Write every artifact of a finished compression into ``out_dir`` and return the full report.

    ``module`` is the squashed model; ``report`` what :func:`dns_core.compress.compress` returned;
    ``inputs`` the files the job read (name -> path, or a :func:`file_record` made earlier), hashed
    into the report. With ``codec``, the
    codec's file is written too and ``evaluate`` (module -> {"val_acc", "test_acc"}) measures the
    model rebuilt from it, so the report shows the codec's accuracy effect. A budget search's other
    ``candidates`` go beside the model as ``candidate-2.sparse.safetensors``, ``candidate-3…`` (the
    compact format), listed in the report's frontier.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    dense = save_dense(loaded, module, out)
    files[dense.name] = dense
    if loaded.format == "hf":  # the rest of the folder that from_pretrained reads
        for name in (HF_CONFIG, *sorted(loaded.side_files)):
            files[name] = out / name
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    meta = {"netsurgery.format": loaded.format}
    if loaded.arch:
        meta |= {"netsurgery.arch": loaded.arch, "netsurgery.config": json.dumps(loaded.config)}
    packed = save_sparse(out / SPARSE, state, meta)
    files[SPARSE] = out / SPARSE
    dense_bytes = sum(t.numel() * t.element_size() for t in state.values())
    full = dict(report)
    full["format"] = loaded.format
    if loaded.arch:
        full["arch"], full["config"] = loaded.arch, loaded.config
    full["bytes"] = {
        "dense_parameters": dense_bytes,
        "sparse_file": packed.file_bytes,
        "kept_values": packed.value_bytes,
        "dense_remainder": packed.dense_bytes,
        "index_overhead": round(packed.overhead, 4),
        "compression": round(dense_bytes / packed.file_bytes, 3),
    }
    if codec is not None:
        name = f"model.sparse.{codec}.safetensors"
        pruned = _pruned_weights(full, state)
        coded = save_sparse(out / name, state, meta | {"netsurgery.codec": codec}, codec=codec,
                            codec_tensors=pruned or None, clusters=clusters)  # fmt: skip
        files[name] = out / name
        entry: dict[str, Any] = {"codec": codec, "file": name, "bytes": coded.file_bytes,
                                 "compression": round(dense_bytes / coded.file_bytes, 3)}  # fmt: skip
        if codec == "shared":
            entry["clusters"] = clusters
        if evaluate is not None:
            import copy

            rebuilt = copy.deepcopy(module)
            rebuilt.load_state_dict(load_sparse(out / name))
            entry |= evaluate(rebuilt)
        full["value_codec"] = entry
    if candidates and "frontier" in full:
        listed = [dict(entry) for entry in full["frontier"].get("candidates", [])]
        for rank, candidate in enumerate(candidates, start=2):
            name = f"candidate-{rank}.sparse.safetensors"
            kept = {k: v.detach().cpu() for k, v in candidate.model.state_dict().items()}
            made = save_sparse(out / name, kept, meta | {"netsurgery.candidate": str(rank)})
            files[name] = out / name
            if rank - 1 < len(listed):
                listed[rank - 1] |= {"file": name, "bytes": made.file_bytes}
        if listed:
            listed[0] |= {"file": SPARSE, "bytes": packed.file_bytes}
        full["frontier"] = dict(full["frontier"]) | {"candidates": listed}
    full["inputs"] = {k: v if isinstance(v, dict) else file_record(v) for k, v in (inputs or {}).items()}
    full["versions"] = package_versions()
    # the readable report: the charts first, then the page, whose files table lists everything before it
    for name, png in render_chart_pngs(_jsonable(full)).items():
        (out / name).write_bytes(png)
        files[name] = out / name
    full["outputs"] = {k: file_record(v) for k, v in files.items()}
    (out / REPORT_HTML).write_text(render_report_html(_jsonable(full)), encoding="utf-8")
    files[REPORT_HTML] = out / REPORT_HTML
    full["outputs"] = {k: file_record(v) for k, v in files.items()}
    (out / REPORT).write_text(json.dumps(_jsonable(full), indent=2))
    files[REPORT] = out / REPORT
    return Artifacts(full, files, packed)


def job_result(report: Mapping[str, Any]) -> dict[str, Any]:
    """The verdict of a finished compression, from its full report (:func:`write_artifacts`'s).

    Compression by parameters and by bytes, validation and test accuracy before and after with
    their drops, the budget and whether it held, the sizes of the dense and the compact file, and
    a budget search's one-sentence verdict.
    """

    def drop(split: str) -> float | None:
        ref, acc = report.get(f"reference_{split}_acc"), report.get(f"{split}_acc")
        return None if ref is None or acc is None else ref - acc

    target = report.get("target") or {}
    sizes = report.get("bytes") or {}
    outputs = report.get("outputs") or {}
    dense = next((rec["bytes"] for name, rec in outputs.items() if name in (DENSE_SAFETENSORS, DENSE_ONNX)), None)
    return {
        "compression": report.get("compression"),
        "compression_bytes": sizes.get("compression"),
        "reference_val_acc": report.get("reference_val_acc"),
        "val_acc": report.get("val_acc"),
        "val_drop": drop("val"),
        "reference_test_acc": report.get("reference_test_acc"),
        "test_acc": report.get("test_acc"),
        "test_drop": drop("test"),
        "max_accuracy_drop": target.get("max_accuracy_drop"),
        "budget_met": report.get("budget_met"),
        "dense_file_bytes": dense,
        "sparse_file_bytes": sizes.get("sparse_file"),
        "verdict": report.get("verdict"),
    }


def _pruned_weights(report: dict[str, Any], state: dict[str, torch.Tensor]) -> set[str]:
    """The weight tensors of the pruned layers (``weight``, an attention block's ``in_proj_weight`` …);
    not those of the layers left dense on purpose."""
    dense = set(report.get("left_dense") or ())
    layers = {str(layer["name"]) for layer in report.get("layers", [])} - dense
    out = set()
    for key in state:
        owner, _, tensor = key.rpartition(".")
        if owner in layers and tensor.endswith("weight"):
            out.add(key)
    return out


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return obj
