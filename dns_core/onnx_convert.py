"""An accepted ONNX graph as a trainable ``nn.Module``.

:func:`load_onnx` validates the file (:mod:`dns_core.onnx_validate`) and converts it to an
:class:`OnnxModule`, which evaluates the graph node by node. Conv weights become real
``nn.Conv1d/2d/3d``, Gemm and MatMul weights real ``nn.Linear`` and BatchNormalization an
``nn.BatchNorm1d/2d/3d``, so that :mod:`dns_core.surgery` selects and prunes them like any other
model's layers. :attr:`OnnxModule.initializer_map` records where each initializer went, for
:func:`dns_core.onnx_export.export_onnx`. What the converter cannot take raises
:class:`~dns_core.onnx_validate.OnnxFormatError`.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import numpy as np
import torch
import torch.nn.functional as F
from onnx import AttributeProto, ModelProto, NodeProto, TensorProto
from torch import nn

from .onnx_validate import (
    DEFAULT_DOMAINS,
    DEFAULT_MAX_BYTES,
    MAX_SPATIAL,
    NUMPY_TYPES,
    OnnxFormatError,
    check_dtype,
    parse_onnx,
    short_repr,
    uses_external_data,
    validate_proto,
)

__all__ = ["OnnxBinding", "OnnxModule", "load_onnx"]

_FLOAT32_MAX = float(np.finfo(np.float32).max)
_TYPED_FIELDS: dict[int, str] = {
    TensorProto.FLOAT: "float_data",
    TensorProto.INT64: "int64_data",
    TensorProto.INT32: "int32_data",
}


@dataclass(frozen=True)
class OnnxBinding:
    """Where an ONNX initializer lives in an :class:`OnnxModule`.

    ``module``/``attr``: the submodule and its parameter or buffer (``weight``, ``bias``,
    ``running_mean``, ``running_var``). ``transform``: how the ONNX tensor becomes the torch one:
    ``"identity"``, ``"transpose"`` (2-D, e.g. a Gemm with transB=0 or a MatMul weight) or
    ``"reshape"`` (e.g. a Gemm bias stored as [1, N]). ``shape``: the shape in the ONNX file.
    ``source``: ``"initializer"``, or ``"constant"`` for the value of a Constant node.
    """

    module: str
    attr: str
    transform: str
    shape: tuple[int, ...]
    source: str = "initializer"


def load_onnx(
    data: bytes | bytearray | memoryview | str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES
) -> OnnxModule:
    """Validate ``data`` (ONNX bytes or a path) and convert it to a trainable :class:`OnnxModule`."""
    return OnnxModule(parse_onnx(data, max_bytes=max_bytes))


# -- tensors and attributes ---------------------------------------------------------------------


def _to_torch(t: TensorProto, where: str) -> torch.Tensor:
    """A float32/int64/int32 TensorProto as a tensor; never reads external data."""
    if uses_external_data(t) or t.HasField("segment"):
        raise OnnxFormatError(f"{where}: external or segmented tensor data is not accepted")
    dtype = NUMPY_TYPES.get(t.data_type)
    if dtype is None:
        check_dtype(t.data_type, where)
        raise OnnxFormatError(f"{where}: unsupported element type")  # pragma: no cover - check_dtype raised
    dims = [int(d) for d in t.dims]
    if any(d < 0 for d in dims):
        raise OnnxFormatError(f"{where}: negative dimension in shape {short_repr(dims)}")
    count = math.prod(dims)
    if t.HasField("raw_data"):
        if len(t.raw_data) != count * dtype.itemsize:
            raise OnnxFormatError(f"{where}: {len(t.raw_data)} bytes of data for shape {short_repr(dims)}")
        array = np.frombuffer(t.raw_data, dtype=dtype)
    else:
        values = getattr(t, _TYPED_FIELDS[t.data_type])
        if len(values) != count:
            raise OnnxFormatError(f"{where}: {len(values)} values for shape {short_repr(dims)}")
        array = np.asarray(values, dtype=dtype)
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True).reshape(dims))


class _Attrs:
    """Typed access to a node's attributes with clear errors."""

    def __init__(self, node: NodeProto, label: str) -> None:
        self.label = label
        self.values = {a.name: a for a in node.attribute}

    def _get(self, name: str, kind: int) -> AttributeProto | None:
        a = self.values.get(name)
        if a is not None and a.type != kind:
            raise OnnxFormatError(f"{self.label}: attribute {name!r} has the wrong type")
        return a

    def get_int(self, name: str, default: int) -> int:
        a = self._get(name, AttributeProto.INT)
        return default if a is None else int(a.i)

    def get_ints(self, name: str, default: list[int] | None) -> list[int] | None:
        a = self._get(name, AttributeProto.INTS)
        return default if a is None else [int(v) for v in a.ints]

    def get_float(self, name: str, default: float) -> float:
        a = self._get(name, AttributeProto.FLOAT)
        value = default if a is None else float(a.f)
        if not math.isfinite(value):
            raise OnnxFormatError(f"{self.label}: attribute {name!r} is not finite")
        return value

    def get_str(self, name: str, default: str) -> str:
        a = self._get(name, AttributeProto.STRING)
        return default if a is None else a.s.decode("utf-8", "replace")


def _sanitize(name: str, fallback: str) -> str:
    s = re.sub(r"_+", "_", re.sub(r"\W", "_", name, flags=re.ASCII)).strip("_")[:64].strip("_")
    if not s:
        return fallback
    return f"{fallback}_{s}" if s[0].isdigit() else s


def _fpad(begins: Sequence[int], ends: Sequence[int]) -> list[int]:
    """ONNX pads (begin…, end… over spatial dims) in F.pad order (last dim first)."""
    out: list[int] = []
    for b, e in zip(reversed(begins), reversed(ends), strict=True):
        out += [b, e]
    return out


def _same_fpad(sizes: Sequence[int], a: dict[str, Any]) -> list[int]:
    begins, ends = [], []
    for n, k, s, d in zip(sizes, a["kernel"], a["strides"], a["dilations"], strict=True):
        total = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
        small = total // 2
        upper = a["pad_mode"] == "SAME_UPPER"
        begins.append(small if upper else total - small)
        ends.append(total - small if upper else small)
    return _fpad(begins, ends)


def _pad(x: torch.Tensor, a: dict[str, Any], value: float) -> torch.Tensor:
    if a["pad_mode"] == "symmetric":
        return x
    pads = a["fpad"] if a["pad_mode"] == "explicit" else _same_fpad(x.shape[2:], a)
    return F.pad(x, pads, value=value)


# -- the module -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Step:
    """One node to run: names of its (present) inputs and outputs, its submodule, its settings."""

    op: str
    label: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    module: str | None = None
    attrs: dict[str, Any] = field(default_factory=dict)


_M = TypeVar("_M", bound=nn.Module)


def _uninitialised(cls: type[_M], *args: Any, **kwargs: Any) -> _M:
    """A module with uninitialised parameters (they are overwritten from the file right away)."""
    return cls(*args, device="meta", **kwargs).to_empty(device="cpu")


class _BatchNormAnyRank(nn.modules.batchnorm._BatchNorm):
    """BatchNorm for inputs whose rank is not known when converting (any rank ≥ 2)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (got {input.dim()}-D)")


class OnnxModule(nn.Module):
    """An ONNX graph as a trainable module; see :func:`load_onnx` (which validates first).

    - ``input_names``, ``output_names``: the graph's; ``input_shapes``: static shape per input,
      ``None`` for a symbolic or unknown dimension (and for an input with no shape at all).
    - ``initializer_map``: ONNX initializer name → :class:`OnnxBinding` for every tensor that became a
      layer parameter or buffer; :func:`export_onnx` writes these back.
    - ``opset``: the default-domain opset of the file.

    ``forward(*inputs)`` returns the single output, or a tuple if the graph has several.
    """

    input_names: list[str]
    output_names: list[str]
    input_shapes: list[tuple[int | None, ...] | None]
    initializer_map: dict[str, OnnxBinding]
    opset: int
    constants: nn.Module
    _steps: list[_Step]
    _const_names: dict[str, str]
    _template: bytes

    def __init__(self, model: ModelProto) -> None:
        super().__init__()
        opset = validate_proto(model)
        _Converter(self, model, opset).run()

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.input_names):
            raise TypeError(f"the model takes {len(self.input_names)} input(s) {self.input_names}, got {len(inputs)}")
        buffers = dict(self.constants.named_buffers())
        env = {onnx_name: buffers[buf] for onnx_name, buf in self._const_names.items()}
        env.update(zip(self.input_names, inputs, strict=True))
        for step in self._steps:
            outs = _RUNNERS[step.op](self, step, [env[n] for n in step.inputs])
            for name, value in zip(step.outputs, outs, strict=False):
                if name:
                    env[name] = value
        results = tuple(env[n] for n in self.output_names)
        return results[0] if len(results) == 1 else results

    def exported_tensor(self, onnx_name: str) -> np.ndarray[Any, Any]:
        """The current value of a bound initializer, in its ONNX layout and shape (float32)."""
        b = self.initializer_map[onnx_name]
        value = getattr(self.get_submodule(b.module), b.attr)  # parametrized weights read as W ⊙ T
        array = value.detach().to("cpu", torch.float32).numpy()
        if b.transform == "transpose":
            array = array.T
        elif b.transform == "reshape":
            array = array.reshape(b.shape)
        if tuple(array.shape) != b.shape:
            raise OnnxFormatError(
                f"{b.module}.{b.attr} now has shape {tuple(array.shape)}, but {onnx_name!r} in the file is {b.shape}"
            )
        return np.ascontiguousarray(array, dtype="<f4")

    def extra_repr(self) -> str:
        return f"opset={self.opset}, inputs={self.input_names}, outputs={self.output_names}"


class _Converter:
    """Builds an :class:`OnnxModule` from a validated model."""

    def __init__(self, module: OnnxModule, model: ModelProto, opset: int) -> None:
        self.m = module
        self.model = model
        self.graph = model.graph
        self.opset = opset
        self.consts: dict[str, torch.Tensor] = {}
        self.sources: dict[str, str] = {}  # "initializer", "constant" (Constant.value) or "literal"
        self.ranks: dict[str, int | None] = {}
        self.steps: list[_Step] = []
        self.bindings: dict[str, OnnxBinding] = {}
        self.names: set[str] = set(OnnxModule.__annotations__)  # attributes set in finish()
        self.absorbed: set[int] = set()
        self.uses: Counter[str] = Counter(n for node in self.graph.node for n in node.input if n)
        self.uses.update(o.name for o in self.graph.output)
        self.consumers: dict[str, list[int]] = {}
        for i, node in enumerate(self.graph.node):
            for n in set(node.input):
                self.consumers.setdefault(n, []).append(i)
        self.graph_outputs = {o.name for o in self.graph.output}

    # -- helpers --------------------------------------------------------------------------------
    def label(self, node: NodeProto, index: int) -> str:
        return f"{node.op_type} node {short_repr(node.name or f'#{index}', 80)}"

    def bindable(self, name: str) -> bool:
        """A float32 constant used exactly once, so it can become a layer's own parameter."""
        return (
            self.sources.get(name) in ("initializer", "constant")
            and self.uses[name] == 1
            and name not in self.bindings
            and self.consts[name].dtype == torch.float32
        )

    def bind(self, onnx_name: str, module: str, attr: str, transform: str = "identity") -> None:
        shape = tuple(int(s) for s in self.consts[onnx_name].shape)
        self.bindings[onnx_name] = OnnxBinding(module, attr, transform, shape, self.sources[onnx_name])

    def add_module(self, node: NodeProto, index: int, module: nn.Module) -> str:
        base = _sanitize(node.name, f"{node.op_type.lower()}{index}")
        name, k = base, 2
        while name in self.names or hasattr(self.m, name):
            name, k = f"{base}_{k}", k + 1
        self.names.add(name)
        self.m.add_module(name, module)
        return name

    def constant(self, name: str, label: str, what: str) -> torch.Tensor:
        if name not in self.consts:
            raise OnnxFormatError(f"{label}: the {what} must be a constant (an initializer or a Constant node)")
        return self.consts[name]

    def step(self, node: NodeProto, index: int, inputs: Sequence[str], module: str | None = None, **attrs: Any) -> None:
        self.steps.append(
            _Step(node.op_type, self.label(node, index), tuple(inputs), tuple(node.output), module, dict(attrs))
        )

    # -- driver ---------------------------------------------------------------------------------
    def run(self) -> None:
        g = self.graph
        for t in g.initializer:
            self.consts[t.name] = _to_torch(t, f"initializer {t.name!r}")
            self.sources[t.name] = "initializer"
            self.ranks[t.name] = self.consts[t.name].dim()
        inputs = [v for v in g.input if v.name not in self.consts]
        shapes: list[tuple[int | None, ...] | None] = []
        for v in inputs:
            tt = v.type.tensor_type
            shape = (
                tuple(int(d.dim_value) if d.HasField("dim_value") and d.dim_value >= 0 else None for d in tt.shape.dim)
                if tt.HasField("shape")
                else None
            )
            shapes.append(shape)
            self.ranks[v.name] = None if shape is None else len(shape)
        known = set(self.consts) | {v.name for v in inputs}
        for i, node in enumerate(g.node):
            label = self.label(node, i)
            for n in node.input:
                if n and n not in known:
                    raise OnnxFormatError(f"{label} uses {short_repr(n, 80)} before it is produced")
            try:
                if i not in self.absorbed:
                    self.convert(node, i, _Attrs(node, label))
            except OnnxFormatError:
                raise
            except Exception as e:  # a malformed node the checker let through
                raise OnnxFormatError(f"cannot convert {label}: {short_repr(str(e), 300)}") from None
            known.update(o for o in node.output if o)
        for o in g.output:
            if o.name not in known:
                raise OnnxFormatError(f"graph output {short_repr(o.name, 80)} is never produced")
        self.finish([v.name for v in inputs], shapes)

    def finish(self, input_names: list[str], shapes: list[tuple[int | None, ...] | None]) -> None:
        m = self.m
        needed = [n for n in self.consts if n not in self.bindings]
        used = {n for s in self.steps for n in s.inputs} | self.graph_outputs
        holder = nn.Module()
        const_names: dict[str, str] = {}
        taken: set[str] = set()
        for n in needed:
            if n not in used:
                continue
            base = _sanitize(n, "const")
            buf, k = base, 2
            while buf in taken or hasattr(holder, buf):
                buf, k = f"{base}_{k}", k + 1
            taken.add(buf)
            holder.register_buffer(buf, self.consts[n])
            const_names[n] = buf
        m.add_module("constants", holder)
        m.input_names = input_names
        m.output_names = [o.name for o in self.graph.output]
        m.input_shapes = shapes
        m.initializer_map = dict(self.bindings)
        m.opset = self.opset
        m._steps = self.steps
        m._const_names = const_names
        # the graph to export into, without the data that the module now holds
        template = ModelProto()
        template.CopyFrom(self.model)
        for t in template.graph.initializer:
            if t.name in self.bindings:
                t.ClearField("raw_data")
                t.ClearField("float_data")
        for node in template.graph.node:
            if node.op_type == "Constant" and node.output and node.output[0] in self.bindings:
                for a in node.attribute:
                    if a.name == "value":
                        a.t.ClearField("raw_data")
                        a.t.ClearField("float_data")
        m._template = template.SerializeToString()

    def convert(self, node: NodeProto, i: int, a: _Attrs) -> None:
        op = node.op_type
        outputs = [o for o in node.output if o]
        rank_in = [self.ranks.get(n) for n in node.input if n]
        first = rank_in[0] if rank_in else None
        out_rank: int | None = first
        if op == "Constant":
            self.convert_constant(node, a)
            return
        if op == "Conv":
            self.convert_conv(node, i, a)
        elif op == "Gemm":
            self.convert_gemm(node, i, a)
            out_rank = 2
        elif op == "MatMul":
            out_rank = self.convert_matmul(node, i)
            outputs = [o for o in self.steps[-1].outputs if o]
        elif op == "BatchNormalization":
            self.convert_batchnorm(node, i, a, first)
        elif op in ("MaxPool", "AveragePool"):
            self.convert_pool(node, i, a)
        elif op in ("Add", "Sub", "Mul", "Div"):
            self.step(node, i, node.input)
            out_rank = None if None in rank_in else max(cast(list[int], rank_in))
        elif op in ("Relu", "Sigmoid", "Tanh", "Identity", "GlobalAveragePool", "GlobalMaxPool"):
            self.step(node, i, node.input[:1])
        elif op == "LeakyRelu":
            self.step(node, i, node.input[:1], alpha=a.get_float("alpha", 0.01))
        elif op == "Dropout":
            self.step(node, i, node.input[:1])
        elif op == "Clip":
            self.convert_clip(node, i, a)
        elif op in ("Softmax", "LogSoftmax"):
            legacy = self.opset < 13
            self.step(node, i, node.input[:1], axis=a.get_int("axis", 1 if legacy else -1), legacy=legacy)
        elif op == "Flatten":
            self.step(node, i, node.input[:1], axis=a.get_int("axis", 1))
            out_rank = 2
        elif op == "Reshape":
            out_rank = self.convert_reshape(node, i, a)
        elif op == "Transpose":
            perm = a.get_ints("perm", None)
            if perm is not None and sorted(perm) != list(range(len(perm))):
                raise OnnxFormatError(f"{a.label}: perm {short_repr(perm)} is not a permutation")
            self.step(node, i, node.input[:1], perm=perm)
        elif op == "Concat":
            if "axis" not in a.values:
                raise OnnxFormatError(f"{a.label}: the axis attribute is required")
            self.step(node, i, [n for n in node.input if n], axis=a.get_int("axis", 0))
        else:  # pragma: no cover - the validator refused it
            raise OnnxFormatError(f"{a.label}: unsupported operator")
        for o in outputs:
            self.ranks[o] = out_rank

    # -- operators with weights -----------------------------------------------------------------
    def convert_constant(self, node: NodeProto, a: _Attrs) -> None:
        if len(a.values) != 1 or len(node.output) != 1:
            raise OnnxFormatError(f"{a.label}: a Constant needs exactly one value attribute and one output")
        (name, attr), out = next(iter(a.values.items())), node.output[0]
        source = "literal"
        if name == "value" and attr.type == AttributeProto.TENSOR:
            value, source = _to_torch(attr.t, a.label), "constant"
        elif name == "value_float" and attr.type == AttributeProto.FLOAT:
            value = torch.tensor(attr.f, dtype=torch.float32)
        elif name == "value_floats" and attr.type == AttributeProto.FLOATS:
            value = torch.tensor(list(attr.floats), dtype=torch.float32)
        elif name == "value_int" and attr.type == AttributeProto.INT:
            value = torch.tensor(attr.i, dtype=torch.int64)
        elif name == "value_ints" and attr.type == AttributeProto.INTS:
            value = torch.tensor(list(attr.ints), dtype=torch.int64)
        else:
            raise OnnxFormatError(f"{a.label}: Constant {name!r} values are not supported (numeric tensors only)")
        self.consts[out] = value
        self.sources[out] = source
        self.ranks[out] = value.dim()

    def spatial(self, a: _Attrs, nd: int, dilations: bool = True) -> tuple[list[int], list[int], list[int]]:
        strides = a.get_ints("strides", [1] * nd) or []
        dil = (a.get_ints("dilations", [1] * nd) or []) if dilations else [1] * nd
        pads = a.get_ints("pads", [0] * 2 * nd) or []
        for what, values, n, lo in (("strides", strides, nd, 1), ("dilations", dil, nd, 1), ("pads", pads, 2 * nd, 0)):
            if len(values) != n:
                raise OnnxFormatError(f"{a.label}: {what} has {len(values)} values, expected {n}")
            if any(not lo <= v <= MAX_SPATIAL for v in values):
                raise OnnxFormatError(f"{a.label}: {what} {short_repr(values)} out of range ({lo}..{MAX_SPATIAL})")
        return strides, dil, pads

    def padding(self, a: _Attrs, pads: list[int], nd: int, limit: list[int] | None) -> dict[str, Any]:
        """Padding plan: symmetric (given to torch), explicit (F.pad first), or SAME_* (computed per input)."""
        auto = a.get_str("auto_pad", "NOTSET")
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            return {"pad_mode": auto, "padding": [0] * nd, "fpad": []}
        if auto == "VALID":
            pads = [0] * 2 * nd
        elif auto != "NOTSET":
            raise OnnxFormatError(f"{a.label}: auto_pad {short_repr(auto)} is not supported")
        begins, ends = pads[:nd], pads[nd:]
        if begins == ends and (limit is None or all(b <= lim for b, lim in zip(begins, limit, strict=True))):
            return {"pad_mode": "symmetric", "padding": begins, "fpad": []}
        return {"pad_mode": "explicit", "padding": [0] * nd, "fpad": _fpad(begins, ends)}

    def convert_conv(self, node: NodeProto, i: int, a: _Attrs) -> None:
        x, w_name = node.input[0], node.input[1]
        b_name = node.input[2] if len(node.input) > 2 else ""
        w = self.constant(w_name, a.label, "weight")
        nd = w.dim() - 2
        if nd not in (1, 2, 3) or w.dtype != torch.float32:
            raise OnnxFormatError(f"{a.label}: the weight must be a float32 tensor of rank 3 to 5, got {w.shape}")
        kernel = [int(k) for k in w.shape[2:]]
        if a.get_ints("kernel_shape", kernel) != kernel:
            raise OnnxFormatError(f"{a.label}: kernel_shape does not match the weight shape {tuple(w.shape)}")
        strides, dil, pads = self.spatial(a, nd)
        group = a.get_int("group", 1)
        out_ch = int(w.shape[0])
        if group < 1 or out_ch % group or min(w.shape) == 0:
            raise OnnxFormatError(f"{a.label}: group={group} does not fit a weight of shape {tuple(w.shape)}")
        plan = self.padding(a, pads, nd, None)
        settings = dict(plan, nd=nd, kernel=kernel, strides=strides, dilations=dil, group=group)
        if b_name and tuple(self.constant(b_name, a.label, "bias").shape) != (out_ch,):
            raise OnnxFormatError(f"{a.label}: the bias must have shape ({out_ch},)")
        if not self.bindable(w_name):
            self.step(node, i, [n for n in (x, w_name, b_name) if n], **settings)
            return
        bind_bias = bool(b_name) and self.bindable(b_name)
        cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[nd - 1]
        conv = _uninitialised(
            cls, int(w.shape[1]) * group, out_ch, kernel, stride=strides, padding=plan["padding"], dilation=dil,
            groups=group, bias=bind_bias,
        )  # fmt: skip
        with torch.no_grad():
            conv.weight.copy_(w)
            if bind_bias and conv.bias is not None:
                conv.bias.copy_(self.consts[b_name])
        name = self.add_module(node, i, conv)
        self.bind(w_name, name, "weight")
        if bind_bias:
            self.bind(b_name, name, "bias")
        extra = [b_name] if b_name and not bind_bias else []
        self.step(node, i, [x, *extra], name, **settings)

    def convert_gemm(self, node: NodeProto, i: int, a: _Attrs) -> None:
        a_name, b_name = node.input[0], node.input[1]
        c_name = node.input[2] if len(node.input) > 2 else ""
        alpha, beta = a.get_float("alpha", 1.0), a.get_float("beta", 1.0)
        trans_a, trans_b = a.get_int("transA", 0), a.get_int("transB", 0)
        settings: dict[str, Any] = {"alpha": alpha, "beta": beta, "transA": bool(trans_a), "transB": bool(trans_b)}
        b = self.consts.get(b_name)
        if b is None or b.dim() != 2 or not self.bindable(b_name):
            self.step(node, i, [n for n in (a_name, b_name, c_name) if n], **settings)
            return
        weight = b if trans_b else b.t()  # nn.Linear stores [out, in]
        n_out, n_in = int(weight.shape[0]), int(weight.shape[1])
        c = self.consts.get(c_name) if c_name else None
        bind_c = c is not None and tuple(c.shape) in ((n_out,), (1, n_out)) and self.bindable(c_name)
        linear = _uninitialised(nn.Linear, n_in, n_out, bias=bind_c)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bind_c and c is not None:
                linear.bias.copy_(c.reshape(n_out))
        name = self.add_module(node, i, linear)
        self.bind(b_name, name, "weight", "identity" if trans_b else "transpose")
        if bind_c and c is not None:
            self.bind(c_name, name, "bias", "identity" if c.dim() == 1 else "reshape")
        extra = [c_name] if c_name and not bind_c else []
        self.step(node, i, [a_name, *extra], name, **settings)

    def convert_matmul(self, node: NodeProto, i: int) -> int | None:
        a_name, b_name = node.input[0], node.input[1]
        ra, rb = self.ranks.get(a_name), self.ranks.get(b_name)
        rank = None if ra is None or rb is None else (ra - 1 if rb == 1 else rb - 1 if ra == 1 else max(ra, rb))
        b = self.consts.get(b_name)
        if b is None or b.dim() != 2 or not self.bindable(b_name) or min(b.shape) == 0:
            self.step(node, i, [a_name, b_name])
            return rank
        n_in, n_out = int(b.shape[0]), int(b.shape[1])
        # MatMul followed by Add(constant [N]) is a Linear with bias, as exporters write it for >2-D inputs
        out = node.output[0]
        bias_name, outputs = "", tuple(node.output)
        nxt = self.consumers.get(out, [])
        if len(nxt) == 1 and self.uses[out] == 1 and out not in self.graph_outputs:
            add = self.graph.node[nxt[0]]
            if add.op_type == "Add" and add.domain in DEFAULT_DOMAINS and len(add.input) == 2:
                other = add.input[1] if add.input[0] == out else add.input[0]
                c = self.consts.get(other)
                if c is not None and tuple(c.shape) == (n_out,) and self.bindable(other):
                    bias_name, outputs = other, tuple(add.output)
                    self.absorbed.add(nxt[0])
        linear = _uninitialised(nn.Linear, n_in, n_out, bias=bool(bias_name))
        with torch.no_grad():
            linear.weight.copy_(b.t())
            if bias_name:
                linear.bias.copy_(self.consts[bias_name])
        name = self.add_module(node, i, linear)
        self.bind(b_name, name, "weight", "transpose")
        if bias_name:
            self.bind(bias_name, name, "bias")
        self.steps.append(_Step("MatMul", self.label(node, i), (a_name,), outputs, name))
        return rank

    def convert_batchnorm(self, node: NodeProto, i: int, a: _Attrs, rank: int | None) -> None:
        if len(node.input) != 5 or not all(node.input):
            raise OnnxFormatError(f"{a.label}: expected 5 inputs (X, scale, B, mean, var)")
        if any(node.output[1:]) or a.get_int("training_mode", 0):
            raise OnnxFormatError(
                f"{a.label}: BatchNormalization in training mode is not accepted; export the model in eval mode "
                "(model.eval() before torch.onnx.export)"
            )
        if a.get_int("spatial", 1) != 1:
            raise OnnxFormatError(f"{a.label}: spatial=0 is not supported")
        eps, momentum = a.get_float("epsilon", 1e-5), a.get_float("momentum", 0.9)
        x, *params = node.input
        values = [self.consts.get(n) for n in params]
        shapes = {None if v is None else tuple(v.shape) for v in values}
        if len(shapes) != 1 or None in shapes or len(next(iter(shapes)) or ()) != 1:
            self.step(node, i, node.input, eps=eps)
            return
        if not all(self.bindable(n) for n in params):
            self.step(node, i, node.input, eps=eps)
            return
        channels = int(cast(torch.Tensor, values[0]).shape[0])
        cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(
            rank if rank is not None else -1, _BatchNormAnyRank
        )
        # ONNX: running = running·m + batch·(1 − m); torch: running = running·(1 − m') + batch·m'
        bn = cls(channels, eps=eps, momentum=1.0 - momentum)
        name = self.add_module(node, i, bn)
        with torch.no_grad():
            for onnx_name, attr in zip(params, ("weight", "bias", "running_mean", "running_var"), strict=True):
                getattr(bn, attr).copy_(self.consts[onnx_name])
                self.bind(onnx_name, name, attr)
        self.step(node, i, [x], name)

    # -- other operators ------------------------------------------------------------------------
    def convert_pool(self, node: NodeProto, i: int, a: _Attrs) -> None:
        if any(node.output[1:]):
            raise OnnxFormatError(f"{a.label}: the Indices output of MaxPool is not supported")
        kernel = a.get_ints("kernel_shape", None)
        if kernel is None or len(kernel) not in (1, 2, 3) or any(not 1 <= k <= MAX_SPATIAL for k in kernel):
            raise OnnxFormatError(f"{a.label}: kernel_shape must have 1 to 3 values in 1..{MAX_SPATIAL}")
        nd = len(kernel)
        is_max = node.op_type == "MaxPool"
        strides, dil, pads = self.spatial(a, nd)
        if not is_max and any(d != 1 for d in dil):
            raise OnnxFormatError(f"{a.label}: AveragePool with dilations is not supported")
        # torch pools pad symmetrically by at most half the (effective) kernel
        limit = (
            [((k - 1) * d + 1) // 2 for k, d in zip(kernel, dil, strict=True)] if is_max else [k // 2 for k in kernel]
        )
        plan = self.padding(a, pads, nd, limit)
        ceil = bool(a.get_int("ceil_mode", 0))
        if ceil and plan["pad_mode"] != "symmetric":
            raise OnnxFormatError(
                f"{a.label}: ceil_mode=1 together with asymmetric or SAME padding is not supported; "
                "export with symmetric pads"
            )
        settings = dict(plan, nd=nd, kernel=kernel, strides=strides, dilations=dil, ceil=ceil)
        if not is_max:
            settings["count_include_pad"] = bool(a.get_int("count_include_pad", 0))
        self.step(node, i, node.input[:1], **settings)

    def convert_clip(self, node: NodeProto, i: int, a: _Attrs) -> None:
        lo: float | None
        hi: float | None
        if self.opset < 11:
            lo, hi = a.get_float("min", -_FLOAT32_MAX), a.get_float("max", _FLOAT32_MAX)
        else:
            bounds: list[float | None] = []
            for k in (1, 2):
                name = node.input[k] if len(node.input) > k else ""
                if not name:
                    bounds.append(None)
                    continue
                value = self.constant(name, a.label, "min/max")
                if value.numel() != 1:
                    raise OnnxFormatError(f"{a.label}: min/max must be scalars")
                bounds.append(float(value.reshape(()).item()))
            lo, hi = bounds[0], bounds[1]
        self.step(node, i, node.input[:1], min=lo, max=hi)

    def convert_reshape(self, node: NodeProto, i: int, a: _Attrs) -> int:
        shape_t = self.constant(node.input[1], a.label, "shape")
        if shape_t.dim() != 1 or shape_t.dtype != torch.int64:
            raise OnnxFormatError(f"{a.label}: the shape must be a 1-D int64 constant")
        shape = [int(v) for v in shape_t.tolist()]
        allowzero = bool(a.get_int("allowzero", 0))
        if sum(v == -1 for v in shape) > 1 or any(v < -1 for v in shape) or (allowzero and 0 in shape and -1 in shape):
            raise OnnxFormatError(f"{a.label}: invalid shape {short_repr(shape)}")
        self.step(node, i, node.input[:1], shape=shape, allowzero=allowzero)
        return len(shape)


# -- running the steps ----------------------------------------------------------------------------

_Runner = Callable[[OnnxModule, _Step, list[torch.Tensor]], list[torch.Tensor]]
_CONV: dict[int, Callable[..., torch.Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_MAXPOOL: dict[int, Callable[..., torch.Tensor]] = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVGPOOL: dict[int, Callable[..., torch.Tensor]] = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _axis(axis: int, rank: int, last: int) -> int:
    """``axis`` in 0..last, counting negative values from ``rank``."""
    if not -rank <= axis <= last:
        raise ValueError(f"axis {axis} is out of range for a {rank}-D input")
    return axis + rank if axis < 0 else axis


def _run_conv(m: OnnxModule, s: _Step, args: list[torch.Tensor]) -> list[torch.Tensor]:
    a = s.attrs
    x = _pad(args[0], a, 0.0)
    if s.module is None:
        bias = args[2] if len(args) > 2 else None
        return [_CONV[a["nd"]](x, args[1], bias, a["strides"], a["padding"], a["dilations"], a["group"])]
    y = m.get_submodule(s.module)(x)
    if len(args) > 1:  # a bias shared with another node stays a constant
        y = y + args[1].reshape(1, -1, *([1] * a["nd"]))
    return [y]


def _run_gemm(m: OnnxModule, s: _Step, args: list[torch.Tensor]) -> list[torch.Tensor]:
    a = s.attrs
    x = args[0].t() if a["transA"] else args[0]
    alpha, beta = a["alpha"], a["beta"]
    if s.module is not None:
        linear = cast(nn.Linear, m.get_submodule(s.module))
        if alpha == 1.0 and beta == 1.0:
            y = linear(x)
        else:
            y = alpha * F.linear(x, linear.weight)
            if linear.bias is not None:
                y = y + beta * linear.bias
        rest = args[1:]
    else:
        w = args[1].t() if a["transB"] else args[1]
        y = alpha * (x @ w)
        rest = args[2:]
    if rest:
        y = y + beta * rest[0]
    return [y]


def _run_matmul(m: OnnxModule, s: _Step, args: list[torch.Tensor]) -> list[torch.Tensor]:
    if s.module is not None:
        return [m.get_submodule(s.module)(args[0])]
    return [torch.matmul(args[0], args[1])]


def _run_batchnorm(m: OnnxModule, s: _Step, args: list[torch.Tensor]) -> list[torch.Tensor]:
    if s.module is not None:
        return [m.get_submodule(s.module)(args[0])]
    x, scale, bias, mean, var = args
    return [F.batch_norm(x, mean, var, scale, bias, False, 0.0, s.attrs["eps"])]


def _run_maxpool(m: OnnxModule, s: _Step, args: list[torch.Tensor]) -> list[torch.Tensor]:
    a = s.attrs
    x = _pad(args[0], a, -math.inf)
    return [_MAXPOOL[a["nd"]](x, a["kernel"], a["strides"], a["padding"], a["dilations"], ceil_mode=a["ceil"])]


def _run_avgpool(m: OnnxModule, s: _Step, args: list[torch.Tensor]) -> list[torch.Tensor]:
    a = s.attrs
    x, pool = args[0], _AVGPOOL[a["nd"]]
    if a["pad_mode"] == "symmetric":
        return [
            pool(
                x,
                a["kernel"],
                a["strides"],
                a["padding"],
                ceil_mode=a["ceil"],
                count_include_pad=a["count_include_pad"],
            )
        ]
    pads = a["fpad"] if a["pad_mode"] == "explicit" else _same_fpad(x.shape[2:], a)
    total = pool(F.pad(x, pads), a["kernel"], a["strides"], 0, ceil_mode=False, count_include_pad=True)
    if a["count_include_pad"]:
        return [total]
    ones = F.pad(torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device), pads)
    return [total / pool(ones, a["kernel"], a["strides"], 0, ceil_mode=False, count_include_pad=True)]


def _run_softmax(m: OnnxModule, s: _Step, args: list[torch.Tensor]) -> list[torch.Tensor]:
    x, axis = args[0], s.attrs["axis"]
    fn = F.softmax if s.op == "Softmax" else F.log_softmax
    if not s.attrs["legacy"]:
        return [fn(x, dim=axis)]
    axis = _axis(axis, x.dim(), x.dim() - 1)  # opset < 13: softmax over the flattened tail
    flat = x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))
    return [fn(flat, dim=1).reshape(x.shape)]


def _run_clip(m: OnnxModule, s: _Step, args: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.clamp(args[0], min=s.attrs["min"], max=s.attrs["max"])]


def _run_flatten(m: OnnxModule, s: _Step, args: list[torch.Tensor]) -> list[torch.Tensor]:
    x = args[0]
    axis = _axis(s.attrs["axis"], x.dim(), x.dim())
    return [x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))]


def _run_reshape(m: OnnxModule, s: _Step, args: list[torch.Tensor]) -> list[torch.Tensor]:
    x, shape = args[0], list(s.attrs["shape"])
    if not s.attrs["allowzero"]:
        shape = [x.shape[k] if v == 0 else v for k, v in enumerate(shape)]
    return [x.reshape(shape)]


def _run_transpose(m: OnnxModule, s: _Step, args: list[torch.Tensor]) -> list[torch.Tensor]:
    perm = s.attrs["perm"]
    x = args[0]
    return [x.permute(perm if perm is not None else list(reversed(range(x.dim()))))]


def _run_div(m: OnnxModule, s: _Step, args: list[torch.Tensor]) -> list[torch.Tensor]:
    x, y = args
    if x.is_floating_point():
        return [x / y]
    return [torch.div(x, y, rounding_mode="trunc")]


def _run_dropout(m: OnnxModule, s: _Step, args: list[torch.Tensor]) -> list[torch.Tensor]:
    # inference: the identity, and an all-true mask if the graph names one
    mask = len(s.outputs) > 1 and bool(s.outputs[1])
    return [args[0], torch.ones_like(args[0], dtype=torch.bool)] if mask else [args[0]]


def _unary(fn: Callable[[torch.Tensor], torch.Tensor]) -> _Runner:
    return lambda m, s, args: [fn(args[0])]


_RUNNERS: dict[str, _Runner] = {
    "Conv": _run_conv,
    "Gemm": _run_gemm,
    "MatMul": _run_matmul,
    "BatchNormalization": _run_batchnorm,
    "MaxPool": _run_maxpool,
    "AveragePool": _run_avgpool,
    "Softmax": _run_softmax,
    "LogSoftmax": _run_softmax,
    "Clip": _run_clip,
    "Flatten": _run_flatten,
    "Reshape": _run_reshape,
    "Transpose": _run_transpose,
    "Concat": lambda m, s, args: [torch.cat(args, dim=s.attrs["axis"])],
    "Add": lambda m, s, args: [args[0] + args[1]],
    "Sub": lambda m, s, args: [args[0] - args[1]],
    "Mul": lambda m, s, args: [args[0] * args[1]],
    "Div": _run_div,
    "Relu": _unary(torch.relu),
    "Sigmoid": _unary(torch.sigmoid),
    "Tanh": _unary(torch.tanh),
    "Identity": _unary(lambda x: x),
    "Dropout": _run_dropout,
    "GlobalAveragePool": _unary(lambda x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True)),
    "GlobalMaxPool": _unary(lambda x: x.amax(dim=tuple(range(2, x.dim())), keepdim=True)),
    "LeakyRelu": lambda m, s, args: [F.leaky_relu(args[0], s.attrs["alpha"])],
}
