"""ONNX in and out: conversion against onnxruntime, surgery round trips, refusals, fuzzing."""

from __future__ import annotations

import builtins
import copy
import io
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from dns_core.onnx_convert import OnnxBinding, OnnxModule, load_onnx
from dns_core.onnx_export import OnnxMismatchError, check_with_onnxruntime, export_onnx
from dns_core.onnx_validate import OnnxFormatError, validate_onnx
from dns_core.surgery import Ramp, ScheduledSurgery, Target

# -- building models ------------------------------------------------------------------------------


def f32(name: str, array: Any) -> TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def i64(name: str, values: list[int]) -> TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def tensor_info(name: str, shape: Sequence[int | str | None], elem: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def make_model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    inits: Sequence[TensorProto] = (),
    opset: int = 17,
    ir_version: int = 8,
    **kwargs: Any,
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, list(inits))
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version, producer_name="tests", **kwargs
    )


def weight(rng: np.random.Generator, *shape: int) -> np.ndarray[Any, Any]:
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    return rng.normal(0.0, 1.0 / math.sqrt(fan_in), shape)


def mlp_model() -> onnx.ModelProto:
    """Gemm (transB=1) → Relu → Gemm (transB=0, alpha/beta ≠ 1) → Relu → Gemm with a [1, N] bias."""
    r = np.random.default_rng(0)
    inits = [
        f32("W1", weight(r, 32, 20)),
        f32("B1", r.normal(0, 0.1, 32)),
        f32("W2", weight(r, 16, 32).T),  # [in, out]: transB=0
        f32("B2", r.normal(0, 0.1, 16)),
        f32("W3", weight(r, 10, 16)),
        f32("B3", r.normal(0, 0.1, (1, 10))),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "B1"], ["h1"], name="fc1", transB=1),
        helper.make_node("Relu", ["h1"], ["a1"], name="relu1"),
        helper.make_node("Gemm", ["a1", "W2", "B2"], ["h2"], name="fc2", alpha=0.5, beta=2.0),
        helper.make_node("Relu", ["h2"], ["a2"], name="relu2"),
        helper.make_node("Gemm", ["a2", "W3", "B3"], ["logits"], name="fc3", transB=1),
    ]
    return make_model(nodes, [tensor_info("x", ["batch", 20])], [tensor_info("logits", ["batch", 10])], inits)


def matmul_model() -> onnx.ModelProto:
    """MatMul + Add (one Linear with bias) on a 3-D input, Relu, MatMul without bias, Softmax."""
    r = np.random.default_rng(1)
    inits = [f32("W1", weight(r, 24, 12).T), f32("b1", r.normal(0, 0.1, 24)), f32("W2", weight(r, 6, 24).T)]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["mm1"], name="/encoder/dense/MatMul"),
        helper.make_node("Add", ["b1", "mm1"], ["h1"], name="/encoder/dense/Add"),
        helper.make_node("Relu", ["h1"], ["a1"]),
        helper.make_node("MatMul", ["a1", "W2"], ["h2"], name="/head/MatMul"),
        helper.make_node("Softmax", ["h2"], ["y"], name="softmax", axis=-1),
    ]
    return make_model(nodes, [tensor_info("x", ["N", 5, 12])], [tensor_info("y", ["N", 5, 6])], inits)


def cnn_model(c: int = 8, classes: int = 10, size: int = 12) -> onnx.ModelProto:
    """Conv-BN-Relu-MaxPool, grouped Conv, AveragePool, a residual block, GlobalAveragePool, Flatten, Gemm."""
    r = np.random.default_rng(2)
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def conv(name: str, x: str, y: str, cin: int, cout: int, group: int = 1, bias: bool = True) -> None:
        inits.append(f32(f"{name}.weight", weight(r, cout, cin // group, 3, 3)))
        ins = [x, f"{name}.weight"]
        if bias:
            inits.append(f32(f"{name}.bias", r.normal(0, 0.1, cout)))
            ins.append(f"{name}.bias")
        nodes.append(helper.make_node("Conv", ins, [y], name=f"{name}/Conv", pads=[1, 1, 1, 1], group=group))

    def bn(name: str, x: str, y: str, ch: int) -> None:
        parts = {
            "scale": r.uniform(0.5, 1.5, ch),
            "B": r.normal(0, 0.1, ch),
            "mean": r.normal(0, 0.1, ch),
            "var": r.uniform(0.5, 1.5, ch),
        }
        inits.extend(f32(f"{name}.{k}", v) for k, v in parts.items())
        nodes.append(
            helper.make_node(
                "BatchNormalization", [x, *(f"{name}.{k}" for k in parts)], [y], name=name, epsilon=1e-5, momentum=0.9
            )
        )

    conv("conv1", "x", "c1", 3, c)
    bn("bn1", "c1", "b1", c)
    nodes.append(helper.make_node("Relu", ["b1"], ["r1"], name="relu1"))
    nodes.append(helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]))
    conv("conv2", "p1", "c2", c, 2 * c, group=2, bias=False)
    nodes.append(
        helper.make_node(
            "AveragePool", ["c2"], ["p2"], name="pool2", kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=0
        )
    )
    conv("/layer1/conv_a", "p2", "ra", 2 * c, 2 * c)
    bn("/layer1/bn_a", "ra", "rb", 2 * c)
    nodes.append(helper.make_node("Relu", ["rb"], ["rc"], name="/layer1/relu"))
    conv("/layer1/conv_b", "rc", "rd", 2 * c, 2 * c, bias=False)
    bn("/layer1/bn_b", "rd", "re", 2 * c)
    nodes.append(helper.make_node("Add", ["re", "p2"], ["rs"], name="/layer1/add"))
    nodes.append(helper.make_node("Relu", ["rs"], ["rr"], name="/layer1/relu_out"))
    nodes.append(helper.make_node("GlobalAveragePool", ["rr"], ["gp"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gp"], ["flat"], name="flatten", axis=1))
    inits += [f32("fc.weight", weight(r, classes, 2 * c)), f32("fc.bias", r.normal(0, 0.1, classes))]
    nodes.append(helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1))
    return make_model(
        nodes, [tensor_info("x", ["N", 3, size, size])], [tensor_info("logits", ["N", classes])], inits, opset=15
    )


def train_with_surgery(module: OnnxModule, shape: tuple[int, ...], classes: int, steps: int = 8) -> ScheduledSurgery:
    """A few SGD steps of target-driven DNS (cubic ramp to 3× compression), as the engine runs it."""
    torch.manual_seed(0)
    s = ScheduledSurgery(module, Target(compression=3.0), ramp=Ramp(0, 3, "cubic"), interval=1, iter_stop=5)
    opt = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9)
    module.train()
    for t in range(steps):
        s.step(t)
        x = torch.randn(8, *shape)
        y = module(x)
        assert isinstance(y, torch.Tensor)
        target = torch.randint(0, classes, (8, *y.shape[1:-1]))
        loss = nn.functional.cross_entropy(y.reshape(-1, classes), target.reshape(-1))
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
    module.eval()
    return s


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray[Any, Any]]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


# -- conversion and round trips -------------------------------------------------------------------


def test_mlp_converts_to_linear_layers_and_matches_onnxruntime() -> None:
    raw = mlp_model().SerializeToString()
    m = load_onnx(raw)
    assert [n for n, mod in m.named_modules() if isinstance(mod, nn.Linear)] == ["fc1", "fc2", "fc3"]
    assert m.input_names == ["x"] and m.output_names == ["logits"] and m.input_shapes == [(None, 20)]
    assert m.initializer_map["W1"] == OnnxBinding("fc1", "weight", "identity", (32, 20))
    assert m.initializer_map["W2"] == OnnxBinding("fc2", "weight", "transpose", (32, 16))
    assert m.initializer_map["B3"] == OnnxBinding("fc3", "bias", "reshape", (1, 10))
    fc2 = m.get_submodule("fc2")
    assert isinstance(fc2, nn.Linear) and tuple(fc2.weight.shape) == (16, 32)
    assert check_with_onnxruntime(m, raw) <= 1e-4
    # an untouched module exports the very same bytes
    assert export_onnx(m) == raw


def test_matmul_add_becomes_one_linear_with_bias() -> None:
    raw = matmul_model().SerializeToString()
    m = load_onnx(raw)
    layers = dict(m.named_modules())
    dense, head = layers["encoder_dense_MatMul"], layers["head_MatMul"]
    assert isinstance(dense, nn.Linear) and dense.bias is not None
    assert isinstance(head, nn.Linear) and head.bias is None
    assert m.initializer_map["b1"] == OnnxBinding("encoder_dense_MatMul", "bias", "identity", (24,))
    assert m.initializer_map["W2"].transform == "transpose"
    assert check_with_onnxruntime(m, raw, n=3) <= 1e-4


def check_pruned_round_trip(
    model: onnx.ModelProto, shape: tuple[int, ...], classes: int, tmp_path: Path
) -> tuple[OnnxModule, bytes]:
    """Load, compare, train with DNS, export, compare again; the pruned module and its export."""
    raw = model.SerializeToString()
    m = load_onnx(raw)
    assert check_with_onnxruntime(m, raw) <= 1e-4
    s = train_with_surgery(m, shape, classes)
    assert s.compression() == pytest.approx(3.0, rel=0.05)
    out = export_onnx(m, tmp_path / "pruned.onnx")
    assert (tmp_path / "pruned.onnx").read_bytes() == out
    exported = onnx.ModelProto.FromString(out)
    onnx.checker.check_model(exported)
    values = initializers(exported)
    for layer in s.layers:
        names = [n for n, b in m.initializer_map.items() if b.module == layer.name and b.attr == "weight"]
        assert len(names) == 1
        w = values[names[0]]
        assert 0 < np.count_nonzero(w) < w.size, layer.name  # really pruned, not emptied
        np.testing.assert_array_equal(w, m.exported_tensor(names[0]))
    # same graph: inputs, outputs, nodes and opsets untouched; only initializer values changed
    assert exported.graph.input == model.graph.input and exported.graph.output == model.graph.output
    assert exported.graph.node == model.graph.node and exported.opset_import == model.opset_import
    assert [t.name for t in exported.graph.initializer] == [t.name for t in model.graph.initializer]
    assert check_with_onnxruntime(m, out, n=5) <= 1e-4
    again = load_onnx(out)
    x = torch.randn(3, *shape)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), m(x), atol=1e-5, rtol=0)
    return m, out


def test_mlp_pruned_with_dns_exports_zeros_and_matches_onnxruntime(tmp_path: Path) -> None:
    check_pruned_round_trip(mlp_model(), (20,), 10, tmp_path)


def test_matmul_variant_pruned_round_trip(tmp_path: Path) -> None:
    check_pruned_round_trip(matmul_model(), (5, 12), 6, tmp_path)


def test_cnn_converts_prunes_and_exports(tmp_path: Path) -> None:
    model = cnn_model()
    m = load_onnx(model.SerializeToString())
    convs = [n for n, mod in m.named_modules() if isinstance(mod, nn.Conv2d)]
    assert convs == ["conv1_Conv", "conv2_Conv", "layer1_conv_a_Conv", "layer1_conv_b_Conv"]
    conv2 = m.get_submodule("conv2_Conv")
    assert isinstance(conv2, nn.Conv2d) and conv2.groups == 2
    bn = m.get_submodule("bn1")
    assert isinstance(bn, nn.BatchNorm2d) and bn.momentum == pytest.approx(0.1)
    assert m.initializer_map["bn1.var"] == OnnxBinding("bn1", "running_var", "identity", (8,))
    pruned, out = check_pruned_round_trip(model, (3, 12, 12), 10, tmp_path)
    before, after = initializers(model), initializers(onnx.ModelProto.FromString(out))
    # BatchNorm statistics moved in training and were written back
    assert not np.allclose(after["bn1.mean"], before["bn1.mean"])
    trained_bn, last_bn = pruned.get_submodule("bn1"), pruned.get_submodule("layer1_bn_b")
    assert isinstance(trained_bn, nn.BatchNorm2d) and isinstance(last_bn, nn.BatchNorm2d)
    assert trained_bn.running_mean is not None and last_bn.running_var is not None
    np.testing.assert_array_equal(after["bn1.mean"], trained_bn.running_mean.numpy())
    np.testing.assert_array_equal(after["/layer1/bn_b.var"], last_bn.running_var.numpy())


def test_deepcopy_runs_its_own_layers() -> None:
    m = load_onnx(mlp_model().SerializeToString()).eval()
    twin = copy.deepcopy(m)
    fc1 = twin.get_submodule("fc1")
    assert isinstance(fc1, nn.Linear)
    with torch.no_grad():
        fc1.weight.zero_()
    x = torch.randn(2, 20)
    assert not torch.allclose(twin(x), m(x))


def test_shared_and_constant_node_weights() -> None:
    """A weight used twice stays a constant (not prunable); a Constant node's weight becomes a layer."""
    r = np.random.default_rng(3)
    w = weight(r, 8, 8)
    nodes = [
        helper.make_node("Constant", [], ["Wc"], name="wconst", value=f32("Wc", weight(r, 8, 8))),
        helper.make_node("Gemm", ["x", "Wc"], ["h0"], name="fc0", transB=1),
        helper.make_node("Gemm", ["h0", "W"], ["h1"], name="tied_a", transB=1),
        helper.make_node("Tanh", ["h1"], ["a1"]),
        helper.make_node("Gemm", ["a1", "W"], ["y"], name="tied_b", transB=1),
    ]
    model = make_model(nodes, [tensor_info("x", ["N", 8])], [tensor_info("y", ["N", 8])], [f32("W", w)])
    raw = model.SerializeToString()
    m = load_onnx(raw)
    assert [n for n, mod in m.named_modules() if isinstance(mod, nn.Linear)] == ["fc0"]
    assert m.initializer_map == {"Wc": OnnxBinding("fc0", "weight", "identity", (8, 8), "constant")}
    assert check_with_onnxruntime(m, raw) <= 1e-4
    fc0 = m.get_submodule("fc0")
    assert isinstance(fc0, nn.Linear)
    with torch.no_grad():
        fc0.weight[:, :4] = 0.0
    out = export_onnx(m)
    value = numpy_helper.to_array(onnx.ModelProto.FromString(out).graph.node[0].attribute[0].t)
    assert np.count_nonzero(value[:, :4]) == 0 and np.count_nonzero(value[:, 4:]) == 32
    assert check_with_onnxruntime(m, out) <= 1e-4


def test_layer_names_are_sanitised_and_unique() -> None:
    names = ["forward", "input_names", "a.b", "a/b", "", "9lives", "constants"]
    nodes, inits = [], []
    for k, name in enumerate(names):
        inits.append(f32(f"W{k}", np.eye(3)))
        nodes.append(helper.make_node("Gemm", [f"h{k}", f"W{k}"], [f"h{k + 1}"], name=name, transB=1))
    model = make_model(nodes, [tensor_info("h0", [2, 3])], [tensor_info(f"h{len(names)}", [2, 3])], inits)
    m = load_onnx(model.SerializeToString())
    layers = [n for n, mod in m.named_modules() if isinstance(mod, nn.Linear)]
    assert layers == ["forward_2", "input_names_2", "a_b", "a_b_2", "gemm4", "gemm5_9lives", "constants_2"]
    assert m.input_names == ["h0"] and callable(m.forward)
    x = torch.randn(2, 3)
    torch.testing.assert_close(m(x), x)


# -- operators against onnxruntime ----------------------------------------------------------------

Case = tuple[list[onnx.NodeProto], list[onnx.ValueInfoProto], list[TensorProto], int]


def one(op: str, inputs: list[str], *, opset: int = 17, **attrs: Any) -> Callable[..., Case]:
    def build(
        x_shape: list[int | str], inits: Sequence[TensorProto] = (), extra: Sequence[onnx.NodeProto] = ()
    ) -> Case:
        node = helper.make_node(op, inputs, ["y"], name=f"the_{op.lower()}", **attrs)
        return [*extra, node], [tensor_info("x", x_shape)], list(inits), opset

    return build


R = np.random.default_rng(4)
OP_CASES: dict[str, Case] = {
    "conv1d": one("Conv", ["x", "w", "b"], pads=[1, 2], strides=[2])(
        ["N", 3, 10], [f32("w", R.normal(size=(4, 3, 3))), f32("b", R.normal(size=4))]
    ),
    "conv-asymmetric-dilated": one("Conv", ["x", "w"], pads=[0, 1, 2, 1], dilations=[2, 1])(
        ["N", 2, 9, 8], [f32("w", R.normal(size=(4, 2, 3, 3)))]
    ),
    "conv-same-upper-stride2": one("Conv", ["x", "w"], auto_pad="SAME_UPPER", strides=[2, 2])(
        ["N", 2, 7, 8], [f32("w", R.normal(size=(4, 2, 3, 3)))]
    ),
    "conv-same-lower-grouped": one("Conv", ["x", "w"], auto_pad="SAME_LOWER", strides=[2, 2], group=2)(
        ["N", 2, 8, 7], [f32("w", R.normal(size=(4, 1, 4, 4)))]
    ),
    "conv-valid-3d": one("Conv", ["x", "w"], auto_pad="VALID")(
        ["N", 2, 5, 5, 5], [f32("w", R.normal(size=(3, 2, 2, 2, 2)))]
    ),
    "maxpool-ceil": one("MaxPool", ["x"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)(
        ["N", 2, 8, 8]
    ),
    "maxpool-asymmetric": one("MaxPool", ["x"], kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 1, 1])(["N", 2, 7, 7]),
    "maxpool-same": one("MaxPool", ["x"], kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER")(["N", 2, 7, 8]),
    "maxpool-dilated-1d": one("MaxPool", ["x"], kernel_shape=[2], dilations=[2], pads=[1, 1])(["N", 2, 9]),
    "avgpool-include-pad": one(
        "AveragePool", ["x"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1
    )(["N", 2, 7, 7]),
    "avgpool-asymmetric": one("AveragePool", ["x"], kernel_shape=[3, 3], pads=[1, 0, 0, 1])(["N", 2, 6, 6]),
    "avgpool-asymmetric-include": one(
        "AveragePool", ["x"], kernel_shape=[3, 2], pads=[2, 0, 0, 1], count_include_pad=1
    )(["N", 2, 6, 6]),
    "avgpool-ceil": one("AveragePool", ["x"], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)(["N", 2, 8, 8]),
    "avgpool-same-lower": one("AveragePool", ["x"], kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_LOWER")(
        ["N", 2, 8, 7]
    ),
    "softmax-opset11-coerced": one("Softmax", ["x"], opset=11, axis=1)(["N", 3, 4]),
    "softmax-opset13-axis": one("Softmax", ["x"], opset=13, axis=1)(["N", 3, 4]),
    "logsoftmax": one("LogSoftmax", ["x"])(["N", 5]),
    "clip-attributes-opset7": one("Clip", ["x"], opset=7, min=-0.5, max=0.25)(["N", 6]),
    "clip-opset13-min-only": one("Clip", ["x", "lo"], opset=13)(["N", 6], [f32("lo", -0.3)]),
    "leakyrelu": one("LeakyRelu", ["x"], alpha=0.2)(["N", 6]),
    "sigmoid": one("Sigmoid", ["x"])(["N", 6]),
    "tanh": one("Tanh", ["x"])(["N", 6]),
    "reshape-0-and-minus1": one("Reshape", ["x", "s"])(["N", 3, 4, 2], [i64("s", [0, -1, 2])]),
    "transpose": one("Transpose", ["x"], perm=[0, 2, 1])(["N", 3, 4]),
    "transpose-default": one("Transpose", ["x"])([2, 3, 4]),
    "concat": one("Concat", ["x", "c"], axis=1)(["N", 3], [f32("c", R.normal(size=(2, 2)))]),
    "sub-broadcast": one("Sub", ["c", "x"])(["N", 3, 4], [f32("c", R.normal(size=(3, 1)))]),
    "div": one("Div", ["x", "c"])(["N", 4], [f32("c", R.uniform(1, 2, size=4))]),
    "mul-scalar": one("Mul", ["x", "c"])(["N", 4], [f32("c", 1.5)]),
    "global-max-pool": one("GlobalMaxPool", ["x"])(["N", 3, 4, 5]),
    "flatten-axis2": one("Flatten", ["x"], axis=2)(["N", 3, 4, 5]),
    "identity": one("Identity", ["x"])(["N", 3]),
    "dropout-with-mask": one("Relu", ["d"])(
        ["N", 3], extra=[helper.make_node("Dropout", ["x"], ["d", "mask"], name="drop")]
    ),
    "constant-floats": one("Add", ["x", "k"])(
        ["N", 3], extra=[helper.make_node("Constant", [], ["k"], value_floats=[1.0, 2.0, 3.0])]
    ),
    "matmul-dynamic": one("MatMul", ["x", "t"])(
        ["N", 3, 4], extra=[helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1])]
    ),
    "gemm-transA": one("Gemm", ["x", "w", "c"], transA=1, beta=0.5)(
        [5, 3], [f32("w", R.normal(size=(5, 2))), f32("c", R.normal(size=(3, 1)))]
    ),
    "batchnorm-1d": one("BatchNormalization", ["x", "s", "b", "m", "v"], epsilon=1e-3)(
        ["N", 4],
        [
            f32("s", R.uniform(0.5, 1, 4)),
            f32("b", R.normal(size=4)),
            f32("m", R.normal(size=4)),
            f32("v", R.uniform(1, 2, 4)),
        ],
    ),
}


@pytest.mark.parametrize("case", sorted(OP_CASES))
def test_operator_matches_onnxruntime(case: str) -> None:
    nodes, inputs, inits, opset = OP_CASES[case]
    ir = 3 if opset < 8 else 8
    graph_inputs = inputs + ([tensor_info(t.name, list(t.dims)) for t in inits] if ir < 4 else [])
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    model = make_model(nodes, graph_inputs, [output], inits, opset=opset, ir_version=ir)
    model = onnx.shape_inference.infer_shapes(model)  # the checker wants the output's shape; trusted here
    raw = model.SerializeToString()
    m = load_onnx(raw)
    assert check_with_onnxruntime(m, raw, n=2, atol=1e-5) <= 1e-5


def test_shape_computed_at_run_time_keeps_the_batch_dynamic() -> None:
    """A Reshape whose shape comes from Shape(x) follows the input: another batch size works."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Reshape", ["r", "s"], ["y"], name="rs"),
    ]
    raw = make_model(nodes, [tensor_info("x", ["N", 4])], [tensor_info("y", ["N", 4])]).SerializeToString()
    m = load_onnx(raw)
    assert check_with_onnxruntime(m, raw, n=3) == 0.0
    assert check_with_onnxruntime(m, raw, n=7) == 0.0


def test_batchnorm_momentum_and_rank() -> None:
    nodes, inputs, inits, _ = OP_CASES["batchnorm-1d"]
    nodes = [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], name="bn", momentum=0.75)]
    m = load_onnx(make_model(nodes, inputs, [tensor_info("y", ["N", 4])], inits).SerializeToString())
    bn = m.get_submodule("bn")
    assert isinstance(bn, nn.BatchNorm1d) and bn.momentum == pytest.approx(0.25)
    assert bn.running_mean is not None
    mean_before = bn.running_mean.clone()
    x = torch.randn(16, 4) + 3.0
    m.train()(x)
    torch.testing.assert_close(bn.running_mean, 0.75 * mean_before + 0.25 * x.mean(0))


def test_mismatch_is_reported() -> None:
    raw = mlp_model().SerializeToString()
    m = load_onnx(raw)
    fc1 = m.get_submodule("fc1")
    assert isinstance(fc1, nn.Linear)
    with torch.no_grad():
        fc1.weight.add_(1.0)
    with pytest.raises(OnnxMismatchError, match="differ by up to"):
        check_with_onnxruntime(m, raw)
    assert m.training  # the check restores the mode


# -- refusals -------------------------------------------------------------------------------------


def relu_model(**kwargs: Any) -> onnx.ModelProto:
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu")]
    return make_model(nodes, [tensor_info("x", ["N", 4])], [tensor_info("y", ["N", 4])], **kwargs)


def test_unknown_operator_is_named() -> None:
    r = np.random.default_rng(5)
    inits = [f32("W", r.normal(size=(1, 32, 4))), f32("R", r.normal(size=(1, 32, 8)))]
    nodes = [
        helper.make_node("LSTM", ["x", "W", "R"], ["y"], name="encoder_lstm", hidden_size=8),
        helper.make_node("Relu", ["y"], ["z"]),
    ]
    model = make_model(nodes, [tensor_info("x", [5, 2, 4])], [tensor_info("z", [5, 1, 2, 8])], inits)
    with pytest.raises(OnnxFormatError, match=r"unsupported ONNX operator\(s\): LSTM \(node 'encoder_lstm'\)"):
        load_onnx(model.SerializeToString())


def test_custom_domain_operator_is_named() -> None:
    nodes = [helper.make_node("FancyGelu", ["x"], ["y"], name="act", domain="com.example")]
    model = make_model(nodes, [tensor_info("x", ["N", 4])], [tensor_info("y", ["N", 4])])
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(OnnxFormatError, match=r"custom domains.*com\.example::FancyGelu \(node 'act'\)"):
        load_onnx(model.SerializeToString())


def external(t: TensorProto, location: str = "../../etc/passwd") -> TensorProto:
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


@contextmanager
def no_file_access(allowed: str | None = None) -> Iterator[None]:
    """Fail the test if anything opens a file other than ``allowed`` (Python-level opens)."""
    real_open = builtins.open

    def guarded(file: Any, *args: Any, **kwargs: Any) -> Any:
        if allowed is not None and os.fspath(file) == allowed:
            return real_open(file, *args, **kwargs)
        raise AssertionError(f"unexpected file access: {file!r}")

    def guarded_os(path: Any, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"unexpected file access: {path!r}")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(builtins, "open", guarded)
        patch.setattr(io, "open", guarded)
        patch.setattr(os, "open", guarded_os)
        yield


def ext_initializer() -> onnx.ModelProto:
    nodes = [helper.make_node("Gemm", ["x", "W"], ["y"], name="fc", transB=1)]
    return make_model(
        nodes, [tensor_info("x", ["N", 2])], [tensor_info("y", ["N", 2])], [external(f32("W", np.ones((2, 2))))]
    )


def ext_constant() -> onnx.ModelProto:
    k = external(f32("k", np.ones(4)), "/etc/shadow")
    nodes = [helper.make_node("Constant", [], ["k"], value=k), helper.make_node("Add", ["x", "k"], ["y"])]
    return make_model(nodes, [tensor_info("x", ["N", 4])], [tensor_info("y", ["N", 4])])


def ext_sparse() -> onnx.ModelProto:
    model = relu_model()
    values = external(f32("s", np.ones(2)))
    model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, i64("s_idx", [0, 3]), [4]))
    return model


@pytest.mark.parametrize("build", [ext_initializer, ext_constant, ext_sparse])
def test_external_data_is_refused_without_touching_the_filesystem(
    build: Callable[[], onnx.ModelProto], tmp_path: Path
) -> None:
    raw = build().SerializeToString()
    message = r"ONNX with external data is not accepted.*onnx\.save\(model, path, save_as_external_data=False\)"
    with no_file_access(), pytest.raises(OnnxFormatError, match=message):
        load_onnx(raw)
    path = tmp_path / "model.onnx"
    path.write_bytes(raw)
    with no_file_access(allowed=str(path)), pytest.raises(OnnxFormatError, match=message):
        load_onnx(path)


def test_checker_failure() -> None:
    model = relu_model()
    model.graph.node[0].input[0] = "nowhere"
    with pytest.raises(OnnxFormatError, match=r"the ONNX checker rejected the model: .*nowhere"):
        load_onnx(model.SerializeToString())


@pytest.mark.parametrize("opset", [6, 24])
def test_opset_out_of_range(opset: int) -> None:
    raw = relu_model(opset=opset, ir_version=3 if opset < 8 else 10).SerializeToString()
    with pytest.raises(OnnxFormatError, match=rf"ONNX opset {opset} is not supported \(accepted: 7 to 23\)"):
        load_onnx(raw)


def test_oversize_is_refused_before_parsing(tmp_path: Path) -> None:
    raw = mlp_model().SerializeToString()
    with pytest.raises(OnnxFormatError, match="larger than the 1000 byte limit"):
        load_onnx(raw, max_bytes=1000)
    path = tmp_path / "big.onnx"
    path.write_bytes(raw)
    with pytest.raises(OnnxFormatError, match="larger than the 1000 byte limit"):
        load_onnx(path, max_bytes=1000)
    assert isinstance(load_onnx(path), OnnxModule)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"\xff" * 64, "not an ONNX model: the bytes do not parse"),
        (b"hello world, this is text", "not an ONNX model"),
        (b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94.", "not an ONNX model: it looks like a Python pickle"),
        (b"PK\x03\x04\x14\x00\x00\x00\x08\x00archive/data.pkl", "not an ONNX model: it looks like a zip archive"),
        (b"\x89HDF\r\n\x1a\n\x00\x00", "not an ONNX model: it looks like an HDF5 file"),
        (b'\x0b\x00\x00\x00\x00\x00\x00\x00{"a": "b"} ', "not an ONNX model: it looks like a safetensors"),
    ],
)
def test_not_onnx_at_all(data: bytes, message: str) -> None:
    with pytest.raises(OnnxFormatError, match=message):
        load_onnx(data)


def test_other_refusals() -> None:
    def refused(model: onnx.ModelProto, message: str) -> None:
        with pytest.raises(OnnxFormatError, match=message):
            load_onnx(model.SerializeToString())

    half = numpy_helper.from_array(np.ones((4, 4), dtype=np.float16), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    refused(
        make_model(nodes, [tensor_info("x", ["N", 4])], [tensor_info("y", ["N", 4])], [half]),
        "only float32 models are accepted: initializer 'W' is FLOAT16",
    )
    refused(
        make_model(
            [helper.make_node("Relu", ["x"], ["y"])],
            [tensor_info("x", ["N", 4], TensorProto.DOUBLE)],
            [tensor_info("y", ["N", 4], TensorProto.DOUBLE)],
        ),
        "graph input 'x' is DOUBLE; only float32",
    )
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Reshape", ["x", "s"], ["y"], name="rs")]
    dyn = make_model(
        [helper.make_node("NonZero", ["x"], ["s"], name="nz"), *nodes],
        [tensor_info("x", ["N", 4])],
        [tensor_info("y", ["N", 4]), tensor_info("r", ["N", 4])],
    )
    refused(dyn, r"unsupported ONNX operator\(s\): NonZero \(node 'nz'\)")
    pool = [helper.make_node("MaxPool", ["x"], ["y"], name="p", kernel_shape=[2], pads=[0, 1], ceil_mode=1)]
    refused(
        make_model(pool, [tensor_info("x", ["N", 2, 7])], [tensor_info("y", ["N", 2, 4])]),
        "MaxPool node 'p': ceil_mode=1 together with asymmetric",
    )
    model = relu_model()
    model.functions.append(
        helper.make_function("local", "MyAct", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])], [])
    )
    model.opset_import.append(helper.make_opsetid("local", 1))
    refused(model, r"model-local functions are not accepted \(MyAct\).*inline_local_functions")
    bn = [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y", "rm", "rv"], training_mode=1)]
    params = [f32(k, np.ones(4)) for k in "sbmv"]
    refused(
        make_model(bn, [tensor_info("x", ["N", 4])], [tensor_info("y", ["N", 4])], params, opset=15),
        "BatchNormalization in training mode is not accepted",
    )
    refused(make_model([], [tensor_info("x", [1])], [tensor_info("x", [1])]), "the ONNX graph has no nodes")


def test_validate_returns_the_checked_proto() -> None:
    model = validate_onnx(mlp_model().SerializeToString())
    assert isinstance(model, onnx.ModelProto) and len(model.graph.node) == 5


# -- fuzzing --------------------------------------------------------------------------------------

VALID = cnn_model(c=2, classes=3, size=6).SerializeToString()


def load_or_refuse(data: bytes) -> None:
    with suppress(OnnxFormatError):
        load_onnx(data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_random_bytes_raise_only_format_errors(data: bytes) -> None:
    load_or_refuse(data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_corrupted_models_raise_only_format_errors(data: st.DataObject) -> None:
    raw = bytearray(VALID)
    for _ in range(data.draw(st.integers(1, 6))):
        pos = data.draw(st.integers(0, max(len(raw) - 1, 0)))
        kind = data.draw(st.sampled_from(["flip", "byte", "cut", "insert", "delete"]))
        if kind == "flip" and raw:
            raw[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "byte" and raw:
            raw[pos] = data.draw(st.integers(0, 255))
        elif kind == "cut":
            del raw[pos:]
        elif kind == "insert":
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif raw:
            del raw[pos : pos + data.draw(st.integers(1, 8))]
    load_or_refuse(bytes(raw))


MUTATION_BASES = [cnn_model(c=2, classes=3, size=6), mlp_model(), matmul_model()]
ODD_INTS = st.one_of(st.integers(-3, 6), st.sampled_from([2**31, 2**62, -(2**62), 5000]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_structurally_mutated_models_raise_only_format_errors(data: st.DataObject) -> None:
    """Mutations of attributes, operators, inputs and tensors that still parse: refused cleanly, or
    converted into a module whose untouched export is the same file."""
    model = onnx.ModelProto()
    model.CopyFrom(data.draw(st.sampled_from(MUTATION_BASES)))
    graph = model.graph
    for _ in range(data.draw(st.integers(1, 3))):
        node = data.draw(st.sampled_from(list(graph.node)))
        kind = data.draw(st.sampled_from(["int", "ints", "drop", "add", "op", "input", "dims", "dtype"]))
        attrs = list(node.attribute)
        if kind == "int" and attrs:
            attr = data.draw(st.sampled_from(attrs))
            attr.i = data.draw(ODD_INTS)
        elif kind == "ints" and attrs:
            attr = data.draw(st.sampled_from(attrs))
            del attr.ints[:]
            attr.ints.extend(data.draw(st.lists(ODD_INTS, max_size=6)))
        elif kind == "drop" and attrs:
            node.attribute.remove(data.draw(st.sampled_from(attrs)))
        elif kind == "add":
            name = data.draw(st.sampled_from(["pads", "strides", "dilations", "kernel_shape", "perm", "axis", "group"]))
            value = data.draw(st.lists(ODD_INTS, min_size=1, max_size=6) if name[-1] == "s" else ODD_INTS)
            node.attribute.append(helper.make_attribute(name, value))
        elif kind == "op":
            node.op_type = data.draw(st.sampled_from(sorted({n.op_type for n in graph.node} | {"Concat", "Softmax"})))
        elif kind == "input" and node.input:
            names = [""] + [t.name for t in graph.initializer] + [n for other in graph.node for n in other.output]
            node.input[data.draw(st.integers(0, len(node.input) - 1))] = data.draw(st.sampled_from(names))
        elif kind in ("dims", "dtype"):
            tensor = data.draw(st.sampled_from(list(graph.initializer)))
            if kind == "dims":
                del tensor.dims[:]
                tensor.dims.extend(data.draw(st.lists(ODD_INTS, max_size=4)))
            else:
                tensor.data_type = data.draw(st.sampled_from([0, 6, 7, 10, 11]))
    raw = model.SerializeToString()
    try:
        module = load_onnx(raw)
    except OnnxFormatError:
        return
    event("converted")
    assert export_onnx(module) == raw
