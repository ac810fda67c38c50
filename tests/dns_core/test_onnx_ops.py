"""ONNX as the torch exporters write it: both exporters, several opsets, tiny real architectures.

Each model is exported to a temporary folder (TorchScript-based exporter at opsets 17 and 18, the
dynamo exporter at its default opset and at 23), accepted by ``check_onnx``, converted and compared
with onnxruntime on another batch size, pruned (half of every selected layer's weights zeroed, the
other trained tensors nudged), exported back and compared with onnxruntime again. Then external data:
the dynamo exporter's ``model.onnx.data``, and hostile locations in it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from dns_core.onnx_convert import OnnxFacts, OnnxModule, check_onnx, load_onnx
from dns_core.onnx_export import check_with_onnxruntime, export_onnx
from dns_core.onnx_validate import OnnxFormatError, validate_onnx
from dns_core.surgery import select_layers

pytest.importorskip("onnxscript")  # the dynamo exporter needs it
transformers = pytest.importorskip("transformers")

# -- the models -------------------------------------------------------------------------------------


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.norm, self.act, self.fc2 = nn.Linear(12, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.norm(self.fc1(x))))  # type: ignore[no-any-return]


class ResidualCnn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv3, self.bn3 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        r = torch.relu(self.bn2(self.conv2(h)))
        h = torch.relu(h + self.bn3(self.conv3(r)))
        return self.fc(h.mean((2, 3)))  # type: ignore[no-any-return]


class Logits(nn.Module):
    """What a user exports from a transformers classifier: the logits of its own inputs."""

    def __init__(self, model: nn.Module, text: bool) -> None:
        super().__init__()
        self.model, self.text = model, text

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        inputs = {"input_ids": args[0], "attention_mask": args[1]} if self.text else {"pixel_values": args[0]}
        return self.model(**inputs).logits  # type: ignore[no-any-return]


def hf_model(name: str) -> nn.Module:
    t = transformers
    configs: dict[str, Callable[[], Any]] = {
        "bert": lambda: t.BertForSequenceClassification(
            t.BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=32, num_labels=3)
        ),
        "distilbert": lambda: t.DistilBertForSequenceClassification(
            t.DistilBertConfig(vocab_size=100, dim=16, n_layers=1, n_heads=2, hidden_dim=32,
                               max_position_embeddings=32, num_labels=3)
        ),
        "vit": lambda: t.ViTForImageClassification(
            t.ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=3)
        ),
        "resnet": lambda: t.ResNetForImageClassification(
            t.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3)
        ),
        "convnext": lambda: t.ConvNextForImageClassification(
            t.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, patch_size=2, num_labels=3)
        ),
        "mobilenet_v2": lambda: t.MobileNetV2ForImageClassification(
            t.MobileNetV2Config(image_size=32, depth_multiplier=0.25, finegrained_output=False, num_labels=3)
        ),
        "efficientnet": lambda: t.EfficientNetForImageClassification(
            t.EfficientNetConfig(image_size=32, width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=128,
                                 num_labels=3)
        ),
    }  # fmt: skip
    model: nn.Module = configs[name]()
    for module in model.modules():  # torch's default initialisation: logits far from zero
        if isinstance(module, nn.Linear | nn.Conv2d):
            module.reset_parameters()
    return model


TEXT = ("bert", "distilbert")
MODELS = ("mlp", "cnn", "cnn_folded", "bert", "distilbert", "vit", "resnet", "convnext", "mobilenet_v2", "efficientnet")


def example(name: str, n: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(n)
    if name == "mlp":
        return (torch.randn(n, 12, generator=g),)
    if name in TEXT:
        ids = torch.randint(1, 100, (n, 10), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 7:] = 0
        return ids, mask
    side = 16 if name.startswith("cnn") else 32
    return (torch.randn(n, 3, side, side, generator=g),)


def build(name: str) -> tuple[nn.Module, list[str]]:
    torch.manual_seed(0)
    if name == "mlp":
        return Mlp().eval(), ["x"]
    if name.startswith("cnn"):
        cnn = ResidualCnn().eval()
        if name == "cnn":  # folded BatchNorm biases differ; fresh statistics fold into equal (shared) ones
            with torch.no_grad():
                for bn in (cnn.bn1, cnn.bn2, cnn.bn3):
                    assert bn.running_mean is not None and bn.running_var is not None
                    bn.running_mean.normal_(0, 0.1)
                    bn.running_var.uniform_(0.5, 1.5)
        return cnn, ["x"]
    text = name in TEXT
    return Logits(hf_model(name).eval(), text).eval(), ["input_ids", "attention_mask"] if text else ["pixel_values"]


def export(name: str, folder: Path, exporter: str, opset: int | None, external_data: bool = False) -> Path:
    model, names = build(name)
    path = folder / "model.onnx"
    args = example(name, 2)
    options: dict[str, Any] = {} if opset is None else {"opset_version": opset}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            batch = torch.export.Dim("batch")
            shapes = tuple({0: batch} for _ in names)
            torch.onnx.export(
                model, args, str(path), dynamo=True, input_names=names, output_names=["logits"],
                dynamic_shapes={"args": shapes} if isinstance(model, Logits) else shapes,
                external_data=external_data, verbose=False, **options,
            )  # fmt: skip
        else:
            axes = {n: {0: "batch"} for n in [*names, "logits"]}
            torch.onnx.export(
                model, args, str(path), dynamo=False, input_names=names, output_names=["logits"], dynamic_axes=axes,
                do_constant_folding=True, training=torch.onnx.TrainingMode.EVAL, **options,
            )  # fmt: skip
    return path


def run_ort(model: str | bytes, inputs: tuple[torch.Tensor, ...]) -> np.ndarray[Any, Any]:
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 4
    session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs, strict=True)}
    return np.asarray(session.run(None, feeds)[0])


def output(module: OnnxModule, inputs: tuple[torch.Tensor, ...]) -> np.ndarray[Any, Any]:
    with torch.no_grad():
        y = module.eval()(*inputs)
    assert isinstance(y, torch.Tensor)
    return y.numpy()


def prune_half(module: OnnxModule) -> list[str]:
    """Zero every other weight of each prunable layer, nudge every other trained tensor; the layer names."""
    layers = select_layers(module)
    with torch.no_grad():
        for _, layer in layers:
            weight = layer.weight
            assert isinstance(weight, torch.Tensor)
            weight.view(-1)[::2] = 0.0
        for p in module.params.parameters():
            p.add_(0.01)
        for m in module.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.mul_(1.1)
    return [n for n, _ in layers]


# -- the matrix -------------------------------------------------------------------------------------

EXPORTS = [("torchscript", 17), ("torchscript", 18), ("dynamo", None), ("dynamo", 23)]
CASES = [
    pytest.param(name, exporter, opset, id=f"{name}-{exporter}-{opset or 'default'}")
    for name in MODELS
    for exporter, opset in EXPORTS
    if not (name == "cnn_folded" and exporter == "dynamo")  # the dynamo exporter folds without sharing
]
KINDS = {"mlp": "features", "bert": "tokens", "distilbert": "tokens"}


@pytest.mark.parametrize(("name", "exporter", "opset"), CASES)
def test_exported_model_converts_prunes_and_round_trips(
    name: str, exporter: str, opset: int | None, tmp_path: Path
) -> None:
    path = export(name, tmp_path, exporter, opset)
    facts = check_onnx(path, max_bytes=2**28, max_memory_bytes=2**31, external_dir=tmp_path)
    assert isinstance(facts, OnnxFacts) and facts.num_parameters > 0 and facts.estimate_bytes > 0
    assert facts.model_input is not None and facts.model_input.kind == KINDS.get(name, "image")
    if name in TEXT:
        assert facts.model_input.shape == (10,) and facts.model_input.vocab_size == 100

    module = load_onnx(path, external_dir=tmp_path)
    x = example(name, 3)  # another batch size than the export's
    expected = run_ort(str(path), x)
    np.testing.assert_allclose(output(module, x), expected, atol=1e-4, rtol=0)
    assert float(np.abs(expected).max()) > 1e-3  # a real comparison, not of zeros

    layers = prune_half(module)
    assert len(layers) >= 2
    pruned = output(module, x)
    out = export_onnx(module)
    exported = onnx.ModelProto.FromString(out)
    assert not any(t.data_location == TensorProto.EXTERNAL for t in exported.graph.initializer)
    np.testing.assert_allclose(run_ort(out, x), pruned, atol=1e-4, rtol=0)
    assert check_with_onnxruntime(module, out, inputs=x) <= 1e-4
    values = {t.name: numpy_helper.to_array(t) for t in exported.graph.initializer}
    for onnx_name, binding in module.initializer_map.items():
        if binding.attr == "weight" and binding.module in layers and onnx_name in values:
            w = values[onnx_name]
            assert np.count_nonzero(w) <= (w.size + 1) // 2, onnx_name  # the zeros are in the file
    again = load_onnx(out)  # what we write, we read back
    np.testing.assert_allclose(output(again, x), pruned, atol=1e-5, rtol=0)


def test_batchnorm_folded_into_convolutions_with_a_shared_bias(tmp_path: Path) -> None:
    """The TorchScript exporter in eval mode folds BatchNorm into the convolutions and keeps one
    initializer for equal biases, read through Identity nodes: each convolution gets its own bias."""
    path = export("cnn_folded", tmp_path, "torchscript", 17)
    graph = onnx.load(str(path)).graph
    identities = [n for n in graph.node if n.op_type == "Identity"]
    assert identities and all(i.input[0] in {t.name for t in graph.initializer} for i in identities)
    module = load_onnx(path)
    convs = [n for n, m in module.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3
    shared = [b for b in module.initializer_map.values() if b.source == "shared"]
    assert shared and all(b.attr == "bias" and b.module in convs for b in shared)
    conv = module.get_submodule(shared[0].module)
    assert isinstance(conv, nn.Conv2d) and conv.bias is not None
    with torch.no_grad():
        conv.bias.add_(0.5)  # only this convolution's bias moves
    x = example("cnn_folded", 3)
    out = export_onnx(module)
    exported = onnx.ModelProto.FromString(out)
    assert not any(n.op_type == "Identity" for n in exported.graph.node)
    onnx.checker.check_model(exported)
    np.testing.assert_allclose(run_ort(out, x), output(module, x), atol=1e-4, rtol=0)
    assert not np.allclose(run_ort(str(path), x), output(module, x), atol=1e-3)


# -- external data ------------------------------------------------------------------------------------


def test_dynamo_external_data_is_read_from_the_folder(tmp_path: Path) -> None:
    path = export("cnn", tmp_path, "dynamo", None, external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    message = r"ONNX with external data is not accepted.*upload model\.onnx together with its data file"
    with pytest.raises(OnnxFormatError, match=message):
        load_onnx(path)
    with pytest.raises(OnnxFormatError, match=message):
        check_onnx(path, max_bytes=2**28, max_memory_bytes=2**31)
    facts = check_onnx(path, max_bytes=2**28, max_memory_bytes=2**31, external_dir=tmp_path)
    assert facts.model_input is not None and facts.model_input.shape == (3, 16, 16)
    assert isinstance(validate_onnx(path, external_dir=tmp_path), onnx.ModelProto)
    module = load_onnx(path, external_dir=tmp_path)
    x = example("cnn", 3)
    np.testing.assert_allclose(output(module, x), run_ort(str(path), x), atol=1e-4, rtol=0)
    prune_half(module)
    out = export_onnx(module)  # one file, every weight inside
    assert all(not t.external_data for t in onnx.ModelProto.FromString(out).graph.initializer)
    moved = tmp_path / "alone"
    moved.mkdir()
    (moved / "pruned.onnx").write_bytes(out)
    np.testing.assert_allclose(run_ort(str(moved / "pruned.onnx"), x), output(module, x), atol=1e-4, rtol=0)


def external_model(folder: Path, location: str, offset: int = 0, length: int = 16) -> Path:
    """A Gemm whose 2×2 weight lives at ``location`` (a 32-byte data file is written beside it)."""
    (folder / "weights.bin").write_bytes(np.arange(8, dtype="<f4").tobytes())
    w = numpy_helper.from_array(np.zeros((2, 2), dtype=np.float32), "W")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    nodes = [helper.make_node("Gemm", ["x", "W"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], [w],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def test_plain_external_data_file_is_accepted(tmp_path: Path) -> None:
    module = load_onnx(external_model(tmp_path, "weights.bin"), external_dir=tmp_path)
    fc = module.get_submodule("fc")
    assert isinstance(fc, nn.Linear)
    np.testing.assert_array_equal(fc.weight.detach().numpy(), [[0.0, 1.0], [2.0, 3.0]])
    module = load_onnx(external_model(tmp_path, "weights.bin", offset=16, length=16), external_dir=tmp_path)
    fc = module.get_submodule("fc")
    assert isinstance(fc, nn.Linear)
    np.testing.assert_array_equal(fc.weight.detach().numpy(), [[4.0, 5.0], [6.0, 7.0]])


@pytest.mark.parametrize(
    ("location", "offset", "length", "message"),
    [
        ("/etc/passwd", 0, 16, "not a plain file name inside the uploaded folder"),
        ("../weights.bin", 0, 16, "not a plain file name inside the uploaded folder"),
        ("sub/../weights.bin", 0, 16, "not a plain file name inside the uploaded folder"),
        ("link.bin", 0, 16, "links, devices and fifos are refused"),
        ("fifo", 0, 16, "links, devices and fifos are refused"),
        ("missing.bin", 0, 16, "is missing"),
        ("weights.bin", 24, 16, "go past the end"),
        ("weights.bin", 40, 4, "go past the end"),
        ("weights.bin", 0, 99999999999999999999, "is not a byte count"),
        ("weights.bin", 0, 8, "does not match its shape"),
    ],
)
def test_hostile_external_data_is_refused(
    location: str, offset: int, length: int, message: str, tmp_path: Path
) -> None:
    outside = tmp_path / "outside.bin"
    outside.write_bytes(np.ones(4, dtype="<f4").tobytes())
    folder = tmp_path / "upload"
    folder.mkdir()
    os.symlink(outside, folder / "link.bin")
    os.mkfifo(folder / "fifo")
    path = external_model(folder, location, offset, length)
    with pytest.raises(OnnxFormatError, match=message):
        load_onnx(path, external_dir=folder)
    with pytest.raises(OnnxFormatError, match=message):
        check_onnx(path, max_bytes=2**20, max_memory_bytes=2**30, external_dir=folder)


# -- upload-time refusals -----------------------------------------------------------------------------


def test_check_refuses_a_model_too_large_for_memory(tmp_path: Path) -> None:
    path = export("mlp", tmp_path, "torchscript", 17)
    with pytest.raises(OnnxFormatError, match=r"needs about .* MiB to train .* more than the 0\.0 MiB"):
        check_onnx(path, max_bytes=2**20, max_memory_bytes=1000)
    facts = check_onnx(path, max_bytes=2**20, max_memory_bytes=2**30)
    with pytest.raises(OnnxFormatError, match="needs about"):
        check_onnx(path, max_bytes=2**20, max_memory_bytes=facts.estimate_bytes - 1)


def test_check_names_the_node_where_the_trial_run_fails(tmp_path: Path) -> None:
    nodes = [helper.make_node("Reshape", ["x", "s"], ["y"], name="bad_reshape")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 7])],
        [numpy_helper.from_array(np.array([5, 7], dtype=np.int64), "s")],
    )  # fmt: skip
    path = tmp_path / "model.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    with pytest.raises(OnnxFormatError, match=r"fails on a trial input .* at Reshape node 'bad_reshape'.*re-export"):
        check_onnx(path, max_bytes=2**20, max_memory_bytes=2**30)


def bomb(tmp_path: Path, op: str, x_shape: list[int | str]) -> Path:
    nodes = [helper.make_node(op, ["s"] if op == "ConstantOfShape" else ["x", "s"], ["y"], name="bomb")]
    if op == "ConstantOfShape":
        nodes.append(helper.make_node("Add", ["x", "y"], ["z"], name="add"))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, ["a", "b"])],
        [numpy_helper.from_array(np.array([2**20, 2**20], dtype=np.int64), "s")],
    )  # fmt: skip
    path = tmp_path / "model.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    return path


def test_check_refuses_shape_bombs(tmp_path: Path) -> None:
    """A tensor built from a shape is bounded: at run time by the memory budget, when folded at conversion."""
    with pytest.raises(OnnxFormatError, match=r"Expand node 'bomb'.*would create a tensor"):
        check_onnx(bomb(tmp_path, "Expand", [1, 1]), max_bytes=2**20, max_memory_bytes=2**30)
    with pytest.raises(OnnxFormatError, match=r"cannot convert ConstantOfShape node 'bomb'.*would create a tensor"):
        check_onnx(bomb(tmp_path, "ConstantOfShape", [1, 1]), max_bytes=2**20, max_memory_bytes=2**40)


def test_stacked_token_input_is_split_into_ids_and_mask(tmp_path: Path) -> None:
    path = export("distilbert", tmp_path, "torchscript", 17)
    module = load_onnx(path)
    ids, mask = example("distilbert", 3)
    np.testing.assert_allclose(output(module, (torch.stack([ids, mask], 1),)), output(module, (ids, mask)))


# -- single operators against onnxruntime -------------------------------------------------------------

R = np.random.default_rng(7)


def f32(name: str, value: Any) -> TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def i64(name: str, value: Any) -> TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.int64), name)


def node(op: str, inputs: list[str], output: str = "y", **attrs: Any) -> onnx.NodeProto:
    return helper.make_node(op, inputs, [output], name=f"the_{op.lower()}", **attrs)


# name: (nodes, input shape, initializers, opset)
OP_CASES: dict[str, tuple[list[onnx.NodeProto], list[int | str], list[TensorProto], int]] = {
    "resize-nearest-scales": (
        [node("Resize", ["x", "", "sc"], mode="nearest", coordinate_transformation_mode="asymmetric",
              nearest_mode="floor")],
        ["N", 2, 3, 4], [f32("sc", [1, 1, 2, 2])], 18,
    ),
    "resize-linear-half-pixel-sizes": (
        [node("Resize", ["x", "", "", "sz"], mode="linear")], [2, 2, 4, 5], [i64("sz", [2, 2, 7, 3])], 18,
    ),
    "resize-linear-align-corners": (
        [node("Resize", ["x", "", "sc"], mode="linear", coordinate_transformation_mode="align_corners")],
        ["N", 1, 3, 3], [f32("sc", [1, 1, 2.5, 1.5])], 13,
    ),
    "resize-nearest-half-pixel": (
        [node("Resize", ["x", "", "sc"], mode="nearest")], ["N", 1, 3, 5], [f32("sc", [1, 1, 1.7, 0.6])], 17,
    ),
    "pad-constant-axes": (
        [node("Pad", ["x", "p", "v", "ax"])], ["N", 3, 4], [i64("p", [1, 2, 0, 1]), f32("v", 0.5), i64("ax", [1, -1])],
        18,
    ),
    "pad-reflect": (
        [node("Pad", ["x", "p"], mode="reflect")], ["N", 2, 5, 5], [i64("p", [0, 0, 1, 2, 0, 0, 2, 1])], 17,
    ),
    "pad-edge": ([node("Pad", ["x", "p"], mode="edge")], ["N", 2, 4], [i64("p", [0, 0, 2, 0, 1, 3])], 17),
    "pad-wrap": ([node("Pad", ["x", "p"], mode="wrap")], ["N", 2, 4], [i64("p", [0, 0, 1, 0, 0, 2])], 19),
    "hardsigmoid": ([node("HardSigmoid", ["x"], alpha=0.3, beta=0.4)], ["N", 6], [], 17),
    "hardswish": ([node("HardSwish", ["x"])], ["N", 6], [], 17),
    "gelu-tanh": ([node("Gelu", ["x"], approximate="tanh")], ["N", 6], [], 20),
    "einsum": (
        [node("Einsum", ["x", "w"], equation="bij,jk->bik")], ["N", 3, 4], [f32("w", R.normal(size=(4, 5)))], 17,
    ),
    "split-num-outputs": (
        [helper.make_node("Split", ["x"], ["a", "b", "c"], axis=1, num_outputs=3),
         node("Concat", ["c", "a"], axis=1)],
        ["N", 7], [], 18,
    ),
    "split-sizes": (
        [helper.make_node("Split", ["x", "s"], ["a", "b"], axis=-1), node("Sub", ["a", "b"])],
        ["N", 6], [i64("s", [3, 3])], 17,
    ),
    "slice-negative-step": (
        [node("Slice", ["x", "st", "en", "ax", "sp"])], ["N", 6, 5],
        [i64("st", [-1, 4]), i64("en", [-100, 0]), i64("ax", [1, 2]), i64("sp", [-2, -1])], 17,
    ),
    "pow-sqrt-reducemean": (
        [node("Pow", ["x", "two"], "p"), node("ReduceMean", ["p", "ax"], "m", keepdims=1), node("Sqrt", ["m"])],
        ["N", 3, 4], [f32("two", 2.0), i64("ax", [-1])], 18,
    ),
    "reducesum-noop": ([node("ReduceSum", ["x"], keepdims=0)], ["N", 3], [], 13),
    "reducemean-axes-attribute": ([node("ReduceMean", ["x"], axes=[1, 2], keepdims=0)], ["N", 3, 4], [], 17),
    "trilu-lower-k": ([node("Trilu", ["x", "k"], upper=0)], ["N", 4, 4], [i64("k", 1)], 17),
    "where-equal-max-min": (
        [node("Equal", ["x", "x"], "e"), node("Max", ["x", "c"], "hi"), node("Min", ["x", "c"], "lo"),
         node("Where", ["e", "hi", "lo"])],
        ["N", 4], [f32("c", 0.1)], 17,
    ),
    "gather-expand-unsqueeze": (
        [node("Gather", ["x", "idx"], "g", axis=1), node("Unsqueeze", ["g", "ax"], "u"),
         node("Expand", ["u", "sh"])],
        ["N", 5], [i64("idx", [[0, 4], [2, 2]]), i64("ax", [1]), i64("sh", [1, 3, 1, 1])], 17,
    ),
    "shape-constantofshape-range-cast": (
        [node("Shape", ["x"], "s", start=1), node("ConstantOfShape", ["s"], "ones",
                                                   value=numpy_helper.from_array(np.ones(1, np.float32))),
         node("Range", ["zero", "five", "one"], "r"), node("Cast", ["r"], "rf", to=TensorProto.FLOAT),
         node("Mul", ["ones", "rf"], "w"), node("Add", ["x", "w"])],
        ["N", 5], [i64("zero", 0), i64("five", 5), i64("one", 1)], 17,
    ),
    "squeeze-not-and-cast": (
        [node("Unsqueeze", ["x", "ax"], "u"), node("Squeeze", ["u", "ax"], "s"), node("Greater", ["s", "z"], "g"),
         node("Not", ["g"], "n"), node("Less", ["s", "one"], "l"), node("And", ["n", "l"], "a"),
         node("Cast", ["a"], "y", to=TensorProto.FLOAT)],
        ["N", 4], [i64("ax", [0]), f32("z", 0.0), f32("one", 1.0)], 17,
    ),
    "softmax-tanh-neg-erf": (
        [node("Softmax", ["x"], "s", axis=-1), node("Tanh", ["s"], "t"), node("Neg", ["t"], "n"),
         node("Erf", ["n"])],
        ["N", 3, 4], [], 17,
    ),
    "layernorm-axis-1": (
        [node("LayerNormalization", ["x", "g", "b"], axis=1, epsilon=1e-3)], ["N", 3, 4],
        [f32("g", R.normal(size=(3, 4))), f32("b", R.normal(size=(3, 4)))], 17,
    ),
    "attention-3d-gqa-causal": (
        [node("Attention", ["x", "k", "v"], is_causal=1, q_num_heads=4, kv_num_heads=2)],
        [2, 5, 8], [f32("k", R.normal(size=(2, 5, 4))), f32("v", R.normal(size=(2, 5, 4)))], 23,
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(OP_CASES))
def test_operator_matches_onnxruntime(case: str) -> None:
    nodes, shape, inits, opset = OP_CASES[case]
    graph = helper.make_graph(
        nodes, case, [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model = onnx.shape_inference.infer_shapes(model)  # the checker wants the output's type; trusted here
    raw = model.SerializeToString()
    module = load_onnx(raw)
    assert check_with_onnxruntime(module, raw, n=2, atol=1e-5) <= 1e-5
