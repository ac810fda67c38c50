"""The model suite through every door of the real service: upload, a short job, download, load.

Each model of :data:`dns_core.suite.SUITE` (transformers' ResNet, ConvNeXt, MobileNetV2,
EfficientNet and ViT image classifiers, BERT and DistilBERT sequence classifiers; tiny configs,
random weights, no download) goes in as a Hugging Face folder and as ONNX from both exporters
(TorchScript-based and dynamo, the dynamo one with its weights in ``model.onnx.data`` beside it).
Each job runs on the API, Postgres, Redis and a worker process. Then:

- the downloaded model loads with its ecosystem's own loader (``AutoModelFor….from_pretrained``,
  onnxruntime) and agrees to 1e-4 with the engine's pruned model, rebuilt from the sparse artifact
  on the uploaded model;
- the overall compression lands within 5% of the asked value, and every weight tensor the layer
  selection names is pruned (the default ``balanced`` allocation leaves no selected layer whole).
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from dns_core import suite
from dns_core.hf import load_hf_folder
from dns_core.onnx_convert import load_onnx
from dns_core.sparse import load_sparse
from tests.dns_core.test_onnx_ops import Logits
from tests.e2e.conftest import Service
from tests.e2e.test_service import download_all, wait_for_state

pytestmark = pytest.mark.slow

ASKED = 2.0
#: Where the default allocation (one magnitude ranking over all layers) leaves some small layers of large
#: weights (squeeze-excite 1x1 convolutions, the depthwise convolution of MobileNetV2's stem) unpruned at 2x;
#: ``allocation: layer`` cuts them
#: (test_the_layer_allocation_leaves_no_layer_dense).
DOORS = ("hf-files", "hf-zip", "onnx-torchscript", "onnx-dynamo")


def _is_text(name: str) -> bool:
    return name in ("bert", "distilbert")


def _example(name: str, n: int = 2) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    if _is_text(name):
        ids = torch.randint(1, 100, (n, 16), generator=g)
        return ids, torch.ones_like(ids)
    return (torch.randn(n, 3, 32, 32, generator=g),)


def _export(name: str, model: nn.Module, folder: Path, dynamo: bool) -> list[Path]:
    """``torch.onnx.export`` as a user runs it; the dynamo exporter's weights go to model.onnx.data."""
    folder.mkdir()
    wrapper = Logits(model.eval(), _is_text(name))
    names = ["input_ids", "attention_mask"] if _is_text(name) else ["pixel_values"]
    path = folder / "model.onnx"
    if dynamo:
        batch = torch.export.Dim("batch")
        shapes = {n: {0: batch} for n in names}
        torch.onnx.export(wrapper, _example(name), str(path), dynamo=True, input_names=names,
                          output_names=["logits"], dynamic_shapes={"args": tuple(shapes.values())},
                          external_data=True)  # fmt: skip
    else:
        axes = {n: {0: "batch"} for n in [*names, "logits"]}
        torch.onnx.export(wrapper, _example(name), str(path), dynamo=False, input_names=names,
                          output_names=["logits"], dynamic_axes=axes, opset_version=17)  # fmt: skip
    return sorted(p for p in folder.iterdir() if p.is_file())


def _data(name: str, path: Path) -> Path:
    """A small labelled data set of the model's input (random images, or random token sequences)."""
    g = np.random.default_rng(0)
    if _is_text(name):
        ids = g.integers(1, 100, size=(160, 16))
        np.savez(path, input_ids=ids, attention_mask=np.ones_like(ids), labels=(ids[:, 0] % 2).astype(np.int64))
    else:
        x = g.random((160, 3, 32, 32), dtype=np.float32)
        np.savez(path, inputs=x, targets=(x[:, 0].mean((1, 2)) > 0.5).astype(np.int64))
    return path


def _post_files(c: Any, files: list[Path]) -> dict[str, Any]:
    handles = [open(p, "rb") for p in files]  # noqa: SIM115 - closed below
    try:
        parts = [("file", (p.name, h)) for p, h in zip(files, handles, strict=True)]
        r = c.post("/v1/models", files=parts, params={"duplicate": "new"})
    finally:
        for h in handles:
            h.close()
    assert r.status_code == 201, r.text
    return dict(r.json())


def _compress(
    service: Service, files: list[Path], data: Path, out: Path, **settings: Any
) -> tuple[dict[str, Any], dict[str, Path]]:
    """Upload the model's files and the data, run a short DNS job to :data:`ASKED` (``settings`` added to
    the job's), download into ``out``."""
    with service.client() as c:
        uploaded = _post_files(c, files)
        dataset = _post_files_data(c, data)
        body = {"model_id": uploaded["id"], "dataset_id": dataset["id"], "method": "dns",
                "target": {"compression": ASKED, "max_accuracy_drop": 100},
                "settings": {"iterations": 24, "batch_size": 16, "seed": 0} | settings}  # fmt: skip
        r = c.post("/v1/jobs", json=body)
        assert r.status_code == 202, r.text
        job = wait_for_state(c, r.json()["id"], {"succeeded", "failed", "cancelled"}, timeout=300)
        assert job["state"] == "succeeded", job
        out.mkdir()
        return uploaded, download_all(c, job["id"], out)


def _zip(folder: Path, out: Path) -> Path:
    with zipfile.ZipFile(out, "w") as zf:
        for p in sorted(folder.iterdir()):
            zf.write(p, f"{folder.name}/{p.name}")  # wrapped in one top-level folder, as zips of a folder are
    return out


@pytest.mark.parametrize("door", DOORS)
@pytest.mark.parametrize("name", sorted(suite.SUITE))
def test_suite_model_through_every_door(service: Service, tmp_path: Path, name: str, door: str) -> None:
    model: nn.Module = suite.SUITE[name]()
    model.eval()
    hf_dir = suite.write_suite_folder(name, tmp_path / name)
    if door == "hf-files":
        files = sorted(p for p in hf_dir.iterdir() if p.is_file())
    elif door == "hf-zip":
        files = [_zip(hf_dir, tmp_path / f"{name}.zip")]
    else:
        files = _export(name, model, tmp_path / "onnx", dynamo=door == "onnx-dynamo")
        if door == "onnx-dynamo":
            assert {p.name for p in files} == {"model.onnx", "model.onnx.data"}  # the exporter's default layout
    uploaded, got = _compress(service, files, _data(name, tmp_path / "data.npz"), tmp_path / "out")
    assert uploaded["format"] == ("hf" if door.startswith("hf") else "onnx")
    out = tmp_path / "out"
    report = json.loads(got["report.json"].read_text())
    assert abs(report["compression"] - ASKED) <= 0.05 * ASKED, report["compression"]
    assert report["layers"] and sum(layer["kept"] for layer in report["layers"]) < sum(
        layer["total"] for layer in report["layers"]
    )
    sparse = load_sparse(got["model.sparse.safetensors"])
    x = _example(name, 4)
    if door.startswith("hf"):
        engine: nn.Module = load_hf_folder(hf_dir)
        engine.load_state_dict(sparse)
        from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

        auto = AutoModelForSequenceClassification if _is_text(name) else AutoModelForImageClassification
        theirs = auto.from_pretrained(str(out))
        theirs.eval()
        with torch.no_grad():
            want = engine.eval()(torch.stack(x, 1) if _is_text(name) else x[0])
            have = Logits(theirs, _is_text(name))(*x)
        for layer in report["layers"]:  # the zeros are in the file transformers loaded
            module = theirs.get_submodule(layer["name"].removeprefix("model."))
            tensors = [module.weight] + ([module.bias] if module.bias is not None else [])  # DNS prunes biases too
            assert sum(int((t != 0).sum()) for t in tensors) == layer["kept"], layer
    else:
        engine = load_onnx(files[0], external_dir=files[0].parent) if len(files) > 1 else load_onnx(files[0])
        engine.load_state_dict(sparse)
        with torch.no_grad():
            want = engine.eval()(*x)
        session = ort.InferenceSession(got["model.onnx"].read_bytes(), providers=["CPUExecutionProvider"])
        feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), x, strict=True)}
        have = torch.from_numpy(session.run(None, feeds)[0])
    assert want.shape == have.shape
    assert float((want - have).abs().max()) <= 1e-4
    dense = _dense(report)
    assert not dense, f"layers left dense: {dense}"


def _dense(report: dict[str, Any]) -> list[str]:
    """The selected layers that came out unpruned (the first convolution and the head, when the selection
    leaves them dense on purpose, are listed in ``left_dense`` and reported whole)."""
    on_purpose = set(report["left_dense"])
    assert all(layer["kept"] == layer["total"] for layer in report["layers"] if layer["name"] in on_purpose)
    return [r["name"] for r in report["layers"] if r["kept"] == r["total"] and r["name"] not in on_purpose]


def _post_files_data(c: Any, path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        r = c.post("/v1/datasets", files={"file": (path.name, io.BufferedReader(f))}, params={"duplicate": "new"})
    assert r.status_code == 201, r.text
    return dict(r.json())


@pytest.mark.parametrize(
    ("case", "exporter"),
    [("mlp", "dynamo"), ("cnn", "dynamo"), ("cnn_folded", "torchscript")],
    ids=["layernorm-gelu-mlp", "batchnorm-mean-pooled-cnn", "folded-batchnorm-shared-bias"],
)
def test_the_three_models_users_were_refused(service: Service, tmp_path: Path, case: str, exporter: str) -> None:
    """An MLP with LayerNorm and GELU (LayerNormalization, Gelu/Erf), a residual CNN with BatchNorm and
    ``x.mean((2, 3))`` (ReduceMean), and the same CNN with BatchNorm folded into the convolutions and one
    bias shared through Identity nodes: accepted at upload, compressed by a job, given back as ONNX."""
    from tests.dns_core.test_onnx_ops import example, export

    (tmp_path / "onnx").mkdir()
    path = export(case, tmp_path / "onnx", exporter, 17 if exporter == "torchscript" else None)
    files = sorted(p for p in path.parent.iterdir() if p.is_file())
    x = example(case, 160)[0].numpy()
    target = (x.reshape(len(x), -1)[:, 0] > 0).astype(np.int64)
    np.savez(tmp_path / "data.npz", inputs=x, targets=target)
    _, got = _compress(service, files, tmp_path / "data.npz", tmp_path / "out")
    report = json.loads(got["report.json"].read_text())
    assert abs(report["compression"] - ASKED) <= 0.05 * ASKED
    assert not _dense(report)
    engine = load_onnx(path, external_dir=path.parent)
    engine.load_state_dict(load_sparse(got["model.sparse.safetensors"]))
    sample = example(case, 4)
    with torch.no_grad():
        want = engine.eval()(*sample)
    session = ort.InferenceSession(got["model.onnx"].read_bytes(), providers=["CPUExecutionProvider"])
    have = session.run(None, {session.get_inputs()[0].name: sample[0].numpy()})[0]
    assert float(np.abs(want.numpy() - have).max()) <= 1e-4


@pytest.mark.parametrize("name", sorted(suite.SUITE))
def test_suite_model_on_a_builtin_set_made_to_fit(service: Service, tmp_path: Path, name: str) -> None:
    """A built-in set (scikit-learn's digits: 8x8 grey images) is adapted by the worker to each model's
    input: resized to 3x32x32 and normalised with the model's mean and std for the image models, turned
    into token sequences for the text models. No download, no data file from the user."""
    folder = suite.write_suite_folder(name, tmp_path / name)
    with service.client() as c:
        uploaded = _post_files(c, sorted(p for p in folder.iterdir() if p.is_file()))
        data = c.post("/v1/datasets", json={"builtin": "digits"})
        assert data.status_code == 201, data.text
        body = {"model_id": uploaded["id"], "dataset_id": data.json()["id"], "method": "dns",
                "target": {"compression": ASKED, "max_accuracy_drop": 100},
                "settings": {"iterations": 24, "batch_size": 16, "seed": 0}}  # fmt: skip
        r = c.post("/v1/jobs", json=body)
        assert r.status_code == 202, r.text
        job = wait_for_state(c, r.json()["id"], {"succeeded", "failed", "cancelled"}, timeout=300)
        assert job["state"] == "succeeded", job
        report = c.get(f"/v1/jobs/{job['id']}/artifacts/report.json").json()
    assert abs(report["compression"] - ASKED) <= 0.05 * ASKED
    assert report["reference_val_acc"] is not None and report["val_acc"] is not None
    assert report["inputs"]["model"]["bytes"] == uploaded["size_bytes"]


#: cases where the paper's single global ranking keeps small layers of large weights whole:
#: EfficientNet's squeeze-excite 1x1 convolutions and MobileNetV2's stem depthwise 3x3
GLOBAL_LEAVES_DENSE = (("efficientnet", "onnx-torchscript"), ("mobilenet_v2", "hf-files"))


@pytest.mark.parametrize(("name", "door"), GLOBAL_LEAVES_DENSE)
def test_the_allocation_setting_reaches_the_engine(service: Service, tmp_path: Path, name: str, door: str) -> None:
    """The job setting ``allocation: global`` (one magnitude threshold, no band) through the API: small
    layers of large weights come back whole or nearly (95% kept or more), at 2x, where the same job with
    the default ``balanced`` allocation prunes each of them (under 90% kept).

    "Nearly": whether one weight of such a layer falls under the global threshold after training differs
    with the CPU's floating-point kernels (MobileNetV2's stem depthwise 3x3 keeps 72 of 72 on some
    machines and 71 of 72 on others); the comparison with the default is what shows the setting at work.
    """
    if door.startswith("hf"):
        files = sorted(p for p in suite.write_suite_folder(name, tmp_path / name).iterdir() if p.is_file())
    else:
        files = _export(name, suite.SUITE[name](), tmp_path / "onnx", dynamo=door == "onnx-dynamo")
    data = _data(name, tmp_path / "data.npz")
    _, got = _compress(service, files, data, tmp_path / "out", allocation="global")
    report = json.loads(got["report.json"].read_text())
    assert report["settings"]["allocation"] == "global"
    assert abs(report["compression"] - ASKED) <= 0.05 * ASKED
    _dense(report)  # the layers left dense on purpose are reported whole
    kept = [r for r in report["layers"] if r["name"] not in report["left_dense"] and r["kept"] >= 0.95 * r["total"]]
    assert kept, "the single global ranking pruned every layer here"
    _, default = _compress(service, files, data, tmp_path / "out-default")
    balanced = {r["name"]: r for r in json.loads(default["report.json"].read_text())["layers"]}
    assert all(balanced[r["name"]]["kept"] < 0.9 * r["total"] for r in kept), [
        (r["name"], r["kept"], balanced[r["name"]]["kept"], r["total"]) for r in kept
    ]
