"""An accepted ONNX graph as a trainable ``nn.Module``.

:func:`load_onnx` validates the file (:mod:`dns_core.onnx_validate`), reads external data from the
folder it is given (if any) and converts the graph to an :class:`OnnxModule`, which evaluates it node
by node with torch operations. Conv weights become real ``nn.Conv1d/2d/3d``, Gemm and MatMul weights
real ``nn.Linear`` (also where the weight reaches the node through Identity, Transpose, Reshape or
Cast nodes), BatchNormalization an ``nn.BatchNorm1d/2d/3d`` and LayerNormalization an
``nn.LayerNorm``, so that :mod:`dns_core.surgery` selects and prunes the layers like any other
model's. Other float initializers (embeddings, positional embeddings, class tokens, scales) become
parameters of the ``params`` submodule: they train but are not pruned. Shape computations
(Shape, Gather, Concat, Range, …) run as plain tensor operations at every call, so dynamic
dimensions (batch, sequence) stay dynamic; nodes whose inputs are all constants are computed once.
:attr:`OnnxModule.initializer_map` records where each trainable tensor went, for
:func:`dns_core.onnx_export.export_onnx`. :func:`check_onnx` does at upload what a job does at its
start (convert, estimate memory, a trial forward). What cannot be taken raises
:class:`~dns_core.onnx_validate.OnnxFormatError`, naming the node and how to re-export.
"""

from __future__ import annotations

import functools
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
from torch.utils.flop_counter import FlopCounterMode

from .defaults import BATCH_SIZE
from .inputs import ModelInput
from .onnx_validate import (
    DEFAULT_DOMAINS,
    DEFAULT_MAX_BYTES,
    MAX_SPATIAL,
    NUMPY_TYPES,
    OnnxFormatError,
    check_dtype,
    parse_onnx,
    resolve_external_data,
    short_repr,
    uses_external_data,
    validate_proto,
)

__all__ = ["MAX_ELEMENTS", "REEXPORT_HINT", "OnnxBinding", "OnnxFacts", "OnnxModule", "check_onnx", "load_onnx"]

MAX_ELEMENTS = 2**28
"""Most elements an operator that builds a tensor from a shape (Expand, ConstantOfShape, Range, Tile,
Pad, Resize) may create; :func:`check_onnx` lowers it to the memory budget for its trial run."""
REEXPORT_HINT = (
    "re-export the model in eval mode with torch.onnx.export(model.eval(), args, 'model.onnx', opset_version=18) "
    "(dynamo=False, the TorchScript-based exporter, or dynamo=True), with float32 weights and standard operators"
)
_FOLD_ELEMENTS = 2**24  # most elements of a tensor computed once from constants when converting
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_TYPED_FIELDS: dict[int, str] = {
    TensorProto.FLOAT: "float_data",
    TensorProto.INT64: "int64_data",
    TensorProto.INT32: "int32_data",
    TensorProto.BOOL: "int32_data",
}
_TORCH_TYPES: dict[int, torch.dtype] = {
    TensorProto.FLOAT: torch.float32,
    TensorProto.INT64: torch.int64,
    TensorProto.INT32: torch.int32,
    TensorProto.BOOL: torch.bool,
}
# nodes that only move a constant's values around: a weight behind them is still the file's tensor
_VIEW_OPS = frozenset({"Identity", "Transpose", "Reshape", "Flatten", "Unsqueeze", "Squeeze", "Cast"})
# inputs that are a layer's weights: a constant there that cannot become the layer's own stays frozen
_WEIGHT_SLOTS: dict[str, tuple[int, ...]] = {
    "Conv": (1, 2),
    "Gemm": (1, 2),
    "MatMul": (1,),
    "BatchNormalization": (1, 2, 3, 4),
}

ViewOp = tuple[str, tuple[int, ...]]


@dataclass(frozen=True)
class OnnxBinding:
    """Where an ONNX tensor lives in an :class:`OnnxModule`.

    ``module``/``attr``: the submodule and its parameter or buffer (``weight``, ``bias``,
    ``running_mean``, ``running_var``, or a name in ``params``). ``transform``: how the ONNX tensor
    becomes the torch one: ``"identity"``, ``"transpose"`` (2-D, e.g. a Gemm with transB=0 or a
    MatMul weight) or ``"reshape"`` (e.g. a Gemm bias stored as [1, N]). ``shape``: the shape in the
    file. ``source``: ``"initializer"``, ``"constant"`` (the value of a Constant node), or
    ``"shared"``: the output of Identity nodes off an initializer that several layers shared, which
    the export writes as an initializer of its own. ``view``: the operations ("permute", perm) or
    ("reshape", shape) that turn the layer's tensor back into the file's, when the file's tensor
    reached the layer through Transpose/Reshape nodes.
    """

    module: str
    attr: str
    transform: str
    shape: tuple[int, ...]
    source: str = "initializer"
    view: tuple[ViewOp, ...] = ()


@dataclass(frozen=True)
class OnnxFacts:
    """What :func:`check_onnx` found: trainable parameters, what one example looks like, memory need,
    and the converted module itself (unchanged by the trial run), so that a job need not convert twice.

    ``flops_per_example``: the forward pass of one example, counted during the trial run
    (:mod:`dns_core.cost`); None when it could not be counted."""

    num_parameters: int
    model_input: ModelInput | None
    estimate_bytes: int
    module: OnnxModule = field(repr=False, compare=False)
    flops_per_example: int | None = None


def load_onnx(
    data: bytes | bytearray | memoryview | str | os.PathLike[str],
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    external_dir: str | os.PathLike[str] | None = None,
) -> OnnxModule:
    """Validate ``data`` (ONNX bytes or a path) and convert it to a trainable :class:`OnnxModule`.

    External data is read from ``external_dir`` only (every location a plain file inside it); without
    it, a model with external data is refused.
    """
    model = parse_onnx(data, max_bytes=max_bytes)
    if external_dir is not None:
        resolve_external_data(model, external_dir, max_bytes=max_bytes)
    return OnnxModule(model)


# -- tensors and attributes ---------------------------------------------------------------------


def _to_torch(t: TensorProto, where: str) -> torch.Tensor:
    """A float32/int64/int32/bool TensorProto as a tensor; never reads external data."""
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

    def get_tensor(self, name: str) -> torch.Tensor | None:
        a = self._get(name, AttributeProto.TENSOR)
        return None if a is None else _to_torch(a.t, f"{self.label}: attribute {name!r}")


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


def _ints(t: torch.Tensor | None, what: str) -> list[int]:
    """A 0-D or 1-D integer tensor (a shape, axes, pads) as Python ints."""
    if t is None:
        raise ValueError(f"the {what} is missing")
    if t.dtype not in (torch.int64, torch.int32) or t.dim() > 1:
        raise ValueError(f"the {what} must be a 1-D integer tensor, got {t.dtype} of shape {tuple(t.shape)}")
    return [int(v) for v in t.reshape(-1).tolist()]


def _scalar(t: torch.Tensor, what: str) -> float | int | bool:
    if t.numel() != 1:
        raise ValueError(f"the {what} must hold one value, got shape {tuple(t.shape)}")
    value: float | int | bool = t.reshape(()).item()
    return value


def _limit(m: OnnxModule, shape: Sequence[int], label: str) -> None:
    """Refuse to create a tensor of more than ``m.max_elements`` elements."""
    if any(d < 0 for d in shape):
        raise ValueError(f"negative dimension in the shape {list(shape)}")
    count = math.prod(shape)
    if count > m.max_elements:
        raise ValueError(
            f"{label} would create a tensor of shape {list(shape)} ({count} elements, more than {m.max_elements})"
        )


# -- the module -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Step:
    """One node to run: names of its inputs ("" for an absent optional one) and outputs, its
    submodule, its settings, and the values no later step needs (dropped after it runs)."""

    op: str
    label: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    module: str | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    release: tuple[str, ...] = ()


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
      ``None`` for a symbolic or unknown dimension (and for an input with no shape at all);
      ``input_dtypes``: the torch element type of each input.
    - ``initializer_map``: ONNX tensor name → :class:`OnnxBinding` for every tensor that became a
      layer parameter or buffer, or a parameter in ``params``; :func:`export_onnx` writes these back.
    - ``opset``: the default-domain opset of the file.

    ``forward(*inputs)`` returns the single output, or a tuple if the graph has several. A graph with
    several inputs also takes them stacked in one tensor along dimension 1 (token data: input_ids
    and attention_mask as one int64 tensor of shape (N, 2, L)).
    """

    input_names: list[str]
    output_names: list[str]
    input_shapes: list[tuple[int | None, ...] | None]
    input_dtypes: list[torch.dtype]
    initializer_map: dict[str, OnnxBinding]
    opset: int
    max_elements: int
    constants: nn.Module
    params: nn.Module
    _steps: list[_Step]
    _const_slots: list[tuple[str, str, str]]
    _template: bytes

    def __init__(self, model: ModelProto) -> None:
        super().__init__()
        opset = validate_proto(model)
        self.max_elements = MAX_ELEMENTS
        _Converter(self, model, opset).run()

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        return self.run(inputs)

    def _inputs(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        n = len(self.input_names)
        if len(inputs) == 1 and n > 1 and inputs[0].dim() >= 2 and inputs[0].shape[1] == n:
            inputs = list(inputs[0].unbind(1))
        if len(inputs) != n:
            raise TypeError(f"the model takes {n} input(s) {self.input_names}, got {len(inputs)}")
        out = []
        for x, dtype in zip(inputs, self.input_dtypes, strict=True):
            if x.dtype != dtype and not (x.is_floating_point() and dtype.is_floating_point):
                x = x.to(dtype)
            out.append(x)
        return out

    def run(
        self,
        inputs: Sequence[torch.Tensor],
        *,
        observe: Callable[[_Step, list[torch.Tensor | None]], None] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Evaluate the graph on ``inputs``; ``observe(step, outputs)`` sees every step's results."""
        env: dict[str, torch.Tensor | None] = {"": None}
        for onnx_name, holder, attr in self._const_slots:
            env[onnx_name] = getattr(self.params if holder == "params" else self.constants, attr)
        env.update(zip(self.input_names, self._inputs(inputs), strict=True))
        for step in self._steps:
            outs = _RUNNERS[step.op](self, step, [env[n] for n in step.inputs])
            if observe is not None:
                observe(step, outs)
            for name, value in zip(step.outputs, outs, strict=False):
                if name:
                    env[name] = value
            for name in step.release:
                del env[name]
        results = tuple(cast(torch.Tensor, env[n]) for n in self.output_names)
        return results[0] if len(results) == 1 else results

    def exported_tensor(self, onnx_name: str) -> np.ndarray[Any, Any]:
        """The current value of a bound tensor, in its ONNX layout and shape (float32)."""
        b = self.initializer_map[onnx_name]
        value = getattr(self.get_submodule(b.module), b.attr)  # parametrized weights read as W ⊙ T
        array = value.detach().to("cpu", torch.float32).numpy()
        if b.transform == "transpose":
            array = array.T
        elif b.transform == "reshape":
            array = array.reshape(b.shape)
        for kind, arg in b.view:
            array = np.transpose(array, arg) if kind == "permute" else array.reshape(arg)
        if tuple(array.shape) != b.shape:
            raise OnnxFormatError(
                f"{b.module}.{b.attr} now has shape {tuple(array.shape)}, but {onnx_name!r} in the file is {b.shape}"
            )
        return np.ascontiguousarray(array, dtype="<f4")

    def extra_repr(self) -> str:
        return f"opset={self.opset}, inputs={self.input_names}, outputs={self.output_names}"


@dataclass
class _Origin:
    """How a constant came from a tensor of the file through view nodes (Identity, Transpose, …)."""

    root: str
    chain: list[str]  # the names from the root (included) to the value (excluded)
    inverse: list[ViewOp]  # value layout -> root layout
    identity_only: bool


class _Converter:
    """Builds an :class:`OnnxModule` from a validated model."""

    def __init__(self, module: OnnxModule, model: ModelProto, opset: int) -> None:
        self.m = module
        self.model = model
        self.graph = model.graph
        self.opset = opset
        self.consts: dict[str, torch.Tensor] = {}
        self.sources: dict[str, str] = {}  # "initializer", "constant", "literal", "view" or "folded"
        self.origins: dict[str, _Origin] = {}
        self.ranks: dict[str, int | None] = {}
        self.steps: list[_Step] = []
        self.bindings: dict[str, OnnxBinding] = {}
        self.names: set[str] = set(OnnxModule.__annotations__)  # attributes set in finish()
        self.absorbed: set[int] = set()
        self.folded_inputs: set[str] = set()
        self.uses: Counter[str] = Counter(n for node in self.graph.node for n in node.input if n)
        self.uses.update(o.name for o in self.graph.output)
        self.consumers: dict[str, list[int]] = {}
        for i, node in enumerate(self.graph.node):
            for n in set(node.input):
                self.consumers.setdefault(n, []).append(i)
        self.graph_outputs = {o.name for o in self.graph.output}
        for v in self.graph.value_info:
            tt = v.type.tensor_type
            if v.type.HasField("tensor_type") and tt.HasField("shape"):
                self.ranks[v.name] = len(tt.shape.dim)

    # -- helpers --------------------------------------------------------------------------------
    def label(self, node: NodeProto, index: int) -> str:
        return f"{node.op_type} node {short_repr(node.name or f'#{index}', 80)}"

    def view_kind(self, name: str) -> str | None:
        """How a view constant can be bound: "through" to its root, "shared" under its own name, or not."""
        o = self.origins.get(name)
        if o is None or self.sources.get(o.root) not in ("initializer", "constant") or o.root in self.bindings:
            return None
        if all(self.uses[n] == 1 and n not in self.graph_outputs for n in o.chain):
            return "through"
        return "shared" if o.identity_only and name not in self.bindings else None

    def bindable(self, name: str) -> bool:
        """A float32 constant of the file used exactly once, so it can become a layer's own parameter."""
        if name in self.bindings or self.uses[name] != 1 or name in self.graph_outputs:
            return False
        if self.consts.get(name) is None or self.consts[name].dtype != torch.float32:
            return False
        source = self.sources.get(name)
        if source == "view":
            return self.view_kind(name) is not None
        return source in ("initializer", "constant")

    def bind(self, onnx_name: str, module: str, attr: str, transform: str = "identity") -> None:
        shape = tuple(int(s) for s in self.consts[onnx_name].shape)
        if self.sources.get(onnx_name) != "view":
            self.bindings[onnx_name] = OnnxBinding(module, attr, transform, shape, self.sources[onnx_name])
            return
        o = self.origins[onnx_name]
        if self.view_kind(onnx_name) == "through":
            root_shape = tuple(int(s) for s in self.consts[o.root].shape)
            self.bindings[o.root] = OnnxBinding(
                module, attr, transform, root_shape, self.sources[o.root], tuple(o.inverse)
            )
        else:
            self.bindings[onnx_name] = OnnxBinding(module, attr, transform, shape, "shared")

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
            raise OnnxFormatError(
                f"{label}: the {what} must be a constant (an initializer or a Constant node), but it is computed "
                f"while the model runs; {REEXPORT_HINT}"
            )
        return self.consts[name]

    def optional_constant(self, node: NodeProto, k: int, label: str, what: str) -> torch.Tensor | None:
        name = node.input[k] if len(node.input) > k else ""
        return self.constant(name, label, what) if name else None

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
        dtypes: list[torch.dtype] = []
        for v in inputs:
            tt = v.type.tensor_type
            shape = (
                tuple(int(d.dim_value) if d.HasField("dim_value") and d.dim_value >= 0 else None for d in tt.shape.dim)
                if tt.HasField("shape")
                else None
            )
            shapes.append(shape)
            dtypes.append(_TORCH_TYPES.get(tt.elem_type, torch.float32))
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
                raise OnnxFormatError(f"cannot convert {label}: {short_repr(str(e), 300)}; {REEXPORT_HINT}") from None
            known.update(o for o in node.output if o)
        for o in g.output:
            if o.name not in known:
                raise OnnxFormatError(f"graph output {short_repr(o.name, 80)} is never produced")
        self.finish([v.name for v in inputs], shapes, dtypes)

    def finish(
        self, input_names: list[str], shapes: list[tuple[int | None, ...] | None], dtypes: list[torch.dtype]
    ) -> None:
        m = self.m
        weight_slot = {n for s in self.steps if s.op in _WEIGHT_SLOTS for n in s.inputs[1:] if n}
        used = [n for s in self.steps for n in s.inputs if n in self.consts] + [
            o for o in self.graph_outputs if o in self.consts
        ]
        constants, params = nn.Module(), nn.Module()
        slots: list[tuple[str, str, str]] = []
        taken: set[str] = set()
        for n in dict.fromkeys(used):
            if n in self.bindings:
                continue
            t = self.consts[n]
            source = self.sources.get(n)
            trainable = (
                t.dtype == torch.float32
                and t.numel() > 1
                and n not in weight_slot
                and n not in self.folded_inputs
                and n not in self.graph_outputs
                and (source == "initializer" or (source == "view" and self.view_kind(n) is not None))
                and bool(torch.isfinite(t).all())
            )
            base = _sanitize(n, "const" if not trainable else "param")
            attr, k = base, 2
            while attr in taken or hasattr(params, attr) or hasattr(constants, attr):
                attr, k = f"{base}_{k}", k + 1
            taken.add(attr)
            if trainable:
                params.register_parameter(attr, nn.Parameter(t.clone()))
                self.bind(n, "params", attr)
                slots.append((n, "params", attr))
            else:
                constants.register_buffer(attr, t)
                slots.append((n, "constants", attr))
        m.add_module("constants", constants)
        m.add_module("params", params)
        # drop each value after the last step that reads it
        last: dict[str, int] = {}
        for k, s in enumerate(self.steps):
            for n in s.inputs:
                last[n] = k
        keep = self.graph_outputs | {""}
        release: dict[int, list[str]] = {}
        for n, k in last.items():
            if n not in keep:
                release.setdefault(k, []).append(n)
        steps = [
            _Step(s.op, s.label, s.inputs, s.outputs, s.module, s.attrs, tuple(release.get(k, ())))
            for k, s in enumerate(self.steps)
        ]
        m.input_names = input_names
        m.output_names = [o.name for o in self.graph.output]
        m.input_shapes = shapes
        m.input_dtypes = dtypes
        m.initializer_map = dict(self.bindings)
        m.opset = self.opset
        m._steps = steps
        m._const_slots = slots
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

    def set_rank(self, names: Sequence[str], rank: int | None) -> None:
        for n in names:
            if n and (rank is not None or n not in self.ranks):
                self.ranks[n] = rank

    def convert(self, node: NodeProto, i: int, a: _Attrs) -> None:
        op = node.op_type
        if op == "Constant":
            self.convert_constant(node, a)
            return
        present = [n for n in node.input if n]
        if present and all(n in self.consts for n in present):
            self.fold(node, i, a)
            return
        rank_in = [self.ranks.get(n) for n in present]
        first = rank_in[0] if rank_in else None
        outputs: Sequence[str] = node.output
        out_rank: int | None = None
        if op == "Conv":
            self.convert_conv(node, i, a)
            out_rank = first
        elif op == "Gemm":
            self.convert_gemm(node, i, a)
            out_rank = 2
        elif op == "MatMul":
            out_rank = self.convert_matmul(node, i)
            outputs = self.steps[-1].outputs
        elif op == "BatchNormalization":
            self.convert_batchnorm(node, i, a, first)
            out_rank = first
        elif op == "LayerNormalization":
            self.convert_layernorm(node, i, a, first)
            out_rank = first
        else:
            prepare = _PREPARE.get(op)
            if prepare is None:  # pragma: no cover - the validator refused it
                raise OnnxFormatError(f"{a.label}: unsupported operator; {REEXPORT_HINT}")
            self.step(node, i, node.input, **prepare(self, node, a))
            if op in _SAME_RANK:
                out_rank = first
            elif op in _ELEMENTWISE:
                out_rank = None if None in rank_in else max(cast(list[int], rank_in), default=None)
            elif op == "Flatten":
                out_rank = 2
        self.set_rank(outputs, out_rank)

    def fold(self, node: NodeProto, i: int, a: _Attrs) -> None:
        """Compute a node whose inputs are all constants once, now."""
        op = node.op_type
        prepare = _PREPARE.get(op) or _PREPARE_WEIGHTED[op]
        step = _Step(op, a.label, tuple(node.input), tuple(node.output), None, prepare(self, node, a))
        args: list[torch.Tensor | None] = [self.consts[n] if n else None for n in node.input]
        limit, self.m.max_elements = self.m.max_elements, min(self.m.max_elements, _FOLD_ELEMENTS)
        try:
            with torch.no_grad():
                outs = _RUNNERS[op](self.m, step, args)
        finally:
            self.m.max_elements = limit
        x = args[0]
        src = node.input[0] if node.input else ""
        view = (
            op in _VIEW_OPS
            and x is not None
            and x.dtype == torch.float32
            and self.sources.get(src) in ("initializer", "constant", "view")
        )
        for n in node.input:
            if n:
                self.folded_inputs.add(n)
        for name, value in zip(node.output, outs, strict=False):
            if not name or value is None:
                continue
            self.consts[name] = value
            self.ranks[name] = value.dim()
            self.sources[name] = "view" if view and value.dtype == torch.float32 else "folded"
            if self.sources[name] == "view" and x is not None:
                inverse: list[ViewOp] = []
                if op == "Transpose":
                    perm = step.attrs["perm"] or list(reversed(range(x.dim())))
                    inverse = [("permute", tuple(int(v) for v in np.argsort(perm)))]
                elif op not in ("Identity", "Cast"):
                    inverse = [("reshape", tuple(int(s) for s in x.shape))]
                before = self.origins.get(src)
                if before is None:
                    self.origins[name] = _Origin(src, [src], inverse, op == "Identity")
                else:
                    self.origins[name] = _Origin(
                        before.root,
                        [*before.chain, src],
                        inverse + before.inverse,
                        before.identity_only and op == "Identity",
                    )

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

    def conv_settings(self, node: NodeProto, a: _Attrs) -> dict[str, Any]:
        w = self.constant(node.input[1], a.label, "weight")
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
        b_name = node.input[2] if len(node.input) > 2 else ""
        if b_name in self.consts and tuple(self.consts[b_name].shape) != (out_ch,):
            raise OnnxFormatError(f"{a.label}: the bias must have shape ({out_ch},)")
        plan = self.padding(a, pads, nd, None)
        return dict(plan, nd=nd, kernel=kernel, strides=strides, dilations=dil, group=group)

    def convert_conv(self, node: NodeProto, i: int, a: _Attrs) -> None:
        x, w_name = node.input[0], node.input[1]
        b_name = node.input[2] if len(node.input) > 2 else ""
        settings = self.conv_settings(node, a)
        w = self.consts[w_name]
        if not self.bindable(w_name):
            self.step(node, i, node.input, **settings)
            return
        bind_bias = bool(b_name) and self.bindable(b_name)
        cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[settings["nd"] - 1]
        group = settings["group"]
        conv = _uninitialised(
            cls, int(w.shape[1]) * group, int(w.shape[0]), settings["kernel"], stride=settings["strides"],
            padding=settings["padding"], dilation=settings["dilations"], groups=group, bias=bind_bias,
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

    def gemm_settings(self, node: NodeProto, a: _Attrs) -> dict[str, Any]:
        return {
            "alpha": a.get_float("alpha", 1.0),
            "beta": a.get_float("beta", 1.0),
            "transA": bool(a.get_int("transA", 0)),
            "transB": bool(a.get_int("transB", 0)),
        }

    def convert_gemm(self, node: NodeProto, i: int, a: _Attrs) -> None:
        a_name, b_name = node.input[0], node.input[1]
        c_name = node.input[2] if len(node.input) > 2 else ""
        settings = self.gemm_settings(node, a)
        b = self.consts.get(b_name)
        if b is None or b.dim() != 2 or not self.bindable(b_name):
            self.step(node, i, node.input, **settings)
            return
        weight = b if settings["transB"] else b.t()  # nn.Linear stores [out, in]
        n_out, n_in = int(weight.shape[0]), int(weight.shape[1])
        c = self.consts.get(c_name) if c_name else None
        bind_c = c is not None and tuple(c.shape) in ((n_out,), (1, n_out)) and self.bindable(c_name)
        linear = _uninitialised(nn.Linear, n_in, n_out, bias=bind_c)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bind_c and c is not None:
                linear.bias.copy_(c.reshape(n_out))
        name = self.add_module(node, i, linear)
        self.bind(b_name, name, "weight", "identity" if settings["transB"] else "transpose")
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

    def batchnorm_settings(self, node: NodeProto, a: _Attrs) -> dict[str, Any]:
        if len(node.input) != 5 or not all(node.input):
            raise OnnxFormatError(f"{a.label}: expected 5 inputs (X, scale, B, mean, var)")
        if any(node.output[1:]) or a.get_int("training_mode", 0):
            raise OnnxFormatError(
                f"{a.label}: BatchNormalization in training mode is not accepted; export the model in eval mode "
                "(model.eval() before torch.onnx.export)"
            )
        if a.get_int("spatial", 1) != 1:
            raise OnnxFormatError(f"{a.label}: spatial=0 is not supported")
        return {"eps": a.get_float("epsilon", 1e-5), "momentum": a.get_float("momentum", 0.9)}

    def convert_batchnorm(self, node: NodeProto, i: int, a: _Attrs, rank: int | None) -> None:
        settings = self.batchnorm_settings(node, a)
        x, *params = node.input
        values = [self.consts.get(n) for n in params]
        shapes = {None if v is None else tuple(v.shape) for v in values}
        if len(shapes) != 1 or None in shapes or len(next(iter(shapes)) or ()) != 1:
            self.step(node, i, node.input, eps=settings["eps"])
            return
        if not all(self.bindable(n) for n in params):
            self.step(node, i, node.input, eps=settings["eps"])
            return
        channels = int(cast(torch.Tensor, values[0]).shape[0])
        cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(
            rank if rank is not None else -1, _BatchNormAnyRank
        )
        # ONNX: running = running·m + batch·(1 − m); torch: running = running·(1 − m') + batch·m'
        bn = cls(channels, eps=settings["eps"], momentum=1.0 - settings["momentum"])
        name = self.add_module(node, i, bn)
        with torch.no_grad():
            for onnx_name, attr in zip(params, ("weight", "bias", "running_mean", "running_var"), strict=True):
                getattr(bn, attr).copy_(self.consts[onnx_name])
                self.bind(onnx_name, name, attr)
        self.step(node, i, [x], name)

    def layernorm_settings(self, node: NodeProto, a: _Attrs) -> dict[str, Any]:
        if any(node.output[1:]):
            raise OnnxFormatError(
                f"{a.label}: the Mean and InvStdDev outputs of LayerNormalization are not supported; {REEXPORT_HINT}"
            )
        return {"axis": a.get_int("axis", -1), "eps": a.get_float("epsilon", 1e-5)}

    def convert_layernorm(self, node: NodeProto, i: int, a: _Attrs, rank: int | None) -> None:
        settings = self.layernorm_settings(node, a)
        x, s_name = node.input[0], node.input[1]
        b_name = node.input[2] if len(node.input) > 2 else ""
        axis = settings["axis"]
        scale = self.consts.get(s_name)
        n_dims = -axis if axis < 0 else (None if rank is None else rank - axis)
        bias = self.consts.get(b_name) if b_name else None
        fits = (
            scale is not None
            and n_dims is not None
            and scale.dim() == n_dims
            and self.bindable(s_name)
            and (not b_name or (bias is not None and bias.shape == scale.shape and self.bindable(b_name)))
        )
        if not fits or scale is None:
            self.step(node, i, node.input, **settings)
            return
        ln = _uninitialised(nn.LayerNorm, tuple(scale.shape), eps=settings["eps"], bias=bool(b_name))
        with torch.no_grad():
            ln.weight.copy_(scale)
            if bias is not None and ln.bias is not None:
                ln.bias.copy_(bias)
        name = self.add_module(node, i, ln)
        self.bind(s_name, name, "weight")
        if b_name:
            self.bind(b_name, name, "bias")
        self.step(node, i, [x], name, **settings)


# -- settings of the other operators (checked once, when converting) -----------------------------

_Prepare = Callable[[_Converter, NodeProto, _Attrs], dict[str, Any]]


def _no_settings(c: _Converter, node: NodeProto, a: _Attrs) -> dict[str, Any]:
    return {}


def _prep_pool(c: _Converter, node: NodeProto, a: _Attrs) -> dict[str, Any]:
    if any(node.output[1:]):
        raise OnnxFormatError(f"{a.label}: the Indices output of MaxPool is not supported")
    kernel = a.get_ints("kernel_shape", None)
    if kernel is None or len(kernel) not in (1, 2, 3) or any(not 1 <= k <= MAX_SPATIAL for k in kernel):
        raise OnnxFormatError(f"{a.label}: kernel_shape must have 1 to 3 values in 1..{MAX_SPATIAL}")
    nd = len(kernel)
    is_max = node.op_type == "MaxPool"
    strides, dil, pads = c.spatial(a, nd)
    if not is_max and any(d != 1 for d in dil):
        raise OnnxFormatError(f"{a.label}: AveragePool with dilations is not supported")
    # torch pools pad symmetrically by at most half the (effective) kernel
    limit = [((k - 1) * d + 1) // 2 for k, d in zip(kernel, dil, strict=True)] if is_max else [k // 2 for k in kernel]
    plan = c.padding(a, pads, nd, limit)
    ceil = bool(a.get_int("ceil_mode", 0))
    if ceil and plan["pad_mode"] != "symmetric":
        raise OnnxFormatError(
            f"{a.label}: ceil_mode=1 together with asymmetric or SAME padding is not supported; "
            "export with symmetric pads"
        )
    settings = dict(plan, nd=nd, kernel=kernel, strides=strides, dilations=dil, ceil=ceil)
    if not is_max:
        settings["count_include_pad"] = bool(a.get_int("count_include_pad", 0))
    return settings


def _prep_clip(c: _Converter, node: NodeProto, a: _Attrs) -> dict[str, Any]:
    if c.opset < 11:
        return {"min": a.get_float("min", -_FLOAT32_MAX), "max": a.get_float("max", _FLOAT32_MAX)}
    return {"min": None, "max": None}


def _prep_softmax(c: _Converter, node: NodeProto, a: _Attrs) -> dict[str, Any]:
    legacy = c.opset < 13
    return {"axis": a.get_int("axis", 1 if legacy else -1), "legacy": legacy}


def _prep_transpose(c: _Converter, node: NodeProto, a: _Attrs) -> dict[str, Any]:
    perm = a.get_ints("perm", None)
    if perm is not None and sorted(perm) != list(range(len(perm))):
        raise OnnxFormatError(f"{a.label}: perm {short_repr(perm)} is not a permutation")
    return {"perm": perm}


def _prep_concat(c: _Converter, node: NodeProto, a: _Attrs) -> dict[str, Any]:
    if "axis" not in a.values:
        raise OnnxFormatError(f"{a.label}: the axis attribute is required")
    return {"axis": a.get_int("axis", 0)}


def _prep_cast(c: _Converter, node: NodeProto, a: _Attrs) -> dict[str, Any]:
    to = a.get_int("to", 0)
    if to not in _TORCH_TYPES:
        try:
            name = TensorProto.DataType.Name(to)
        except ValueError:
            name = f"type {to}"
        raise OnnxFormatError(
            f"{a.label}: Cast to {name} is not supported (float32, int64, int32 and bool only); convert the model "
            f"to float32 (model.float()) and {REEXPORT_HINT}"
        )
    return {"dtype": _TORCH_TYPES[to]}


def _prep_axes_attr(c: _Converter, node: NodeProto, a: _Attrs) -> dict[str, Any]:
    """Unsqueeze/Squeeze: axes as an attribute before opset 13, as an input from 13 on."""
    return {"axes": a.get_ints("axes", None) if c.opset < 13 else None}


def _prep_reduce(c: _Converter, node: NodeProto, a: _Attrs) -> dict[str, Any]:
    as_input = c.opset >= (13 if node.op_type == "ReduceSum" else 18)
    return {
        "axes": None if as_input else a.get_ints("axes", None),
        "keepdims": bool(a.get_int("keepdims", 1)),
        "noop": bool(a.get_int("noop_with_empty_axes", 0)),
    }


def _prep_split(c: _Converter, node: NodeProto, a: _Attrs) -> dict[str, Any]:
    return {
        "axis": a.get_int("axis", 0),
        "split": a.get_ints("split", None) if c.opset < 13 else None,
        "num_outputs": a.get_int("num_outputs", 0),
        "n": len(node.output),
    }


def _prep_slice(c: _Converter, node: NodeProto, a: _Attrs) -> dict[str, Any]:
    if c.opset >= 10:
        return {"legacy": None}
    return {"legacy": (a.get_ints("starts", []), a.get_ints("ends", []), a.get_ints("axes", None))}


def _prep_pad(c: _Converter, node: NodeProto, a: _Attrs) -> dict[str, Any]:
    mode = a.get_str("mode", "constant")
    if mode not in ("constant", "reflect", "edge", "wrap"):
        raise OnnxFormatError(f"{a.label}: Pad mode {short_repr(mode)} is not supported")
    legacy = (a.get_ints("pads", []), a.get_float("value", 0.0)) if c.opset < 11 else None
    return {"mode": mode, "legacy": legacy}


_RESIZE_COORDS = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "tf_half_pixel_for_nn")


def _prep_resize(c: _Converter, node: NodeProto, a: _Attrs) -> dict[str, Any]:
    mode = a.get_str("mode", "nearest")
    coords = a.get_str("coordinate_transformation_mode", "half_pixel" if c.opset >= 11 else "asymmetric")
    nearest = a.get_str("nearest_mode", "round_prefer_floor")
    if mode not in ("nearest", "linear") or coords not in _RESIZE_COORDS or a.get_int("antialias", 0):
        raise OnnxFormatError(
            f"{a.label}: Resize with mode={mode!r}, coordinate_transformation_mode={coords!r} or antialias is not "
            "supported (nearest or linear modes only); use nn.Upsample(mode='nearest' or 'bilinear') and re-export"
        )
    if nearest not in ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil"):
        raise OnnxFormatError(f"{a.label}: nearest_mode {short_repr(nearest)} is not supported")
    if a.get_str("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise OnnxFormatError(f"{a.label}: keep_aspect_ratio_policy other than 'stretch' is not supported")
    return {"mode": mode, "coords": coords, "nearest": nearest, "axes": a.get_ints("axes", None), "v10": c.opset < 11}


def _prep_einsum(c: _Converter, node: NodeProto, a: _Attrs) -> dict[str, Any]:
    equation = a.get_str("equation", "")
    if not re.fullmatch(r"[A-Za-z,. \->]{1,200}", equation):
        raise OnnxFormatError(f"{a.label}: Einsum equation {short_repr(equation)} is not supported")
    return {"equation": equation.replace(" ", "")}


def _prep_attention(c: _Converter, node: NodeProto, a: _Attrs) -> dict[str, Any]:
    if any(node.input[4:]) or any(node.output[3:]):
        raise OnnxFormatError(
            f"{a.label}: Attention with a key/value cache (past_key, past_value) or the qk_matmul output is not "
            f"supported; {REEXPORT_HINT} without a cache (use_cache=False)"
        )
    return {
        "causal": bool(a.get_int("is_causal", 0)),
        "q_heads": a.get_int("q_num_heads", 0),
        "kv_heads": a.get_int("kv_num_heads", 0),
        "scale": a.get_float("scale", 0.0) if "scale" in a.values else None,
        "softcap": a.get_float("softcap", 0.0),
    }


def _prep_constant_of_shape(c: _Converter, node: NodeProto, a: _Attrs) -> dict[str, Any]:
    value = a.get_tensor("value")
    if value is not None and value.numel() != 1:
        raise OnnxFormatError(f"{a.label}: the value must hold one element")
    return {"value": value.reshape(()).item() if value is not None else 0.0,
            "dtype": value.dtype if value is not None else torch.float32}  # fmt: skip


def _settings(**defaults: Any) -> _Prepare:
    """Attributes read with their defaults: int, float or str by the default's type."""

    def prepare(c: _Converter, node: NodeProto, a: _Attrs) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, default in defaults.items():
            if isinstance(default, int):
                out[key] = type(default)(a.get_int(key, int(default)))
            elif isinstance(default, float):
                out[key] = a.get_float(key, default)
            else:
                out[key] = a.get_str(key, default)
        return out

    return prepare


_SAME_RANK = frozenset(
    {
        "Relu", "Sigmoid", "Tanh", "Erf", "Exp", "Log", "Abs", "Neg", "Reciprocal", "Floor", "Ceil", "Round",
        "Sign", "Sqrt", "Sin", "Cos", "IsNaN", "IsInf", "Softplus", "Identity", "Not", "Elu", "HardSigmoid",
        "HardSwish", "LeakyRelu", "Gelu", "Cast", "CastLike", "Clip", "Softmax", "LogSoftmax", "Dropout",
        "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Transpose", "Concat", "Pad", "Resize",
        "Trilu", "CumSum", "Tile", "GatherElements",
    }
)  # fmt: skip
_ELEMENTWISE = frozenset(
    {"Add", "Sub", "Mul", "Div", "Pow", "Mod", "Max", "Min", "Sum", "Mean", "Equal", "Less", "Greater",
     "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Where"}
)  # fmt: skip

_PREPARE: dict[str, _Prepare] = {
    **{op: _no_settings for op in ("Relu", "Sigmoid", "Tanh", "Erf", "Exp", "Log", "Abs", "Neg", "Reciprocal",
                                   "Floor", "Ceil", "Round", "Sign", "Sqrt", "Sin", "Cos", "IsNaN", "Softplus",
                                   "Identity", "Not", "HardSwish", "Dropout", "GlobalAveragePool", "GlobalMaxPool",
                                   "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Equal", "Less",
                                   "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Where",
                                   "CastLike", "Size", "Expand", "Tile", "Range")},
    "IsInf": _settings(detect_negative=1, detect_positive=1),
    "Elu": _settings(alpha=1.0),
    "HardSigmoid": _settings(alpha=0.2, beta=0.5),
    "LeakyRelu": _settings(alpha=0.01),
    "Gelu": _settings(approximate="none"),
    "Mod": _settings(fmod=0),
    "Reshape": _settings(allowzero=0),
    "Flatten": _settings(axis=1),
    "Gather": _settings(axis=0),
    "GatherElements": _settings(axis=0),
    "GatherND": _settings(batch_dims=0),
    "Shape": _settings(start=0, end=2**62),
    "Trilu": _settings(upper=1),
    "CumSum": _settings(exclusive=0, reverse=0),
    "ArgMax": _settings(axis=0, keepdims=1, select_last_index=0),
    "ArgMin": _settings(axis=0, keepdims=1, select_last_index=0),
    "MaxPool": _prep_pool,
    "AveragePool": _prep_pool,
    "Clip": _prep_clip,
    "Softmax": _prep_softmax,
    "LogSoftmax": _prep_softmax,
    "Transpose": _prep_transpose,
    "Concat": _prep_concat,
    "Cast": _prep_cast,
    "Unsqueeze": _prep_axes_attr,
    "Squeeze": _prep_axes_attr,
    **{op: _prep_reduce for op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2")},
    "Split": _prep_split,
    "Slice": _prep_slice,
    "Pad": _prep_pad,
    "Resize": _prep_resize,
    "Einsum": _prep_einsum,
    "Attention": _prep_attention,
    "ConstantOfShape": _prep_constant_of_shape,
}  # fmt: skip
_PREPARE_WEIGHTED: dict[str, _Prepare] = {
    "Conv": lambda c, node, a: c.conv_settings(node, a),
    "Gemm": lambda c, node, a: c.gemm_settings(node, a),
    "MatMul": _no_settings,
    "BatchNormalization": lambda c, node, a: {"eps": c.batchnorm_settings(node, a)["eps"]},
    "LayerNormalization": lambda c, node, a: c.layernorm_settings(node, a),
}


# -- running the steps ----------------------------------------------------------------------------

_Args = list[torch.Tensor | None]
_Out = list[torch.Tensor | None]
_Runner = Callable[[OnnxModule, _Step, _Args], _Out]
_CONV: dict[int, Callable[..., torch.Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_MAXPOOL: dict[int, Callable[..., torch.Tensor]] = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVGPOOL: dict[int, Callable[..., torch.Tensor]] = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _t(x: torch.Tensor | None) -> torch.Tensor:
    if x is None:
        raise ValueError("a required input is missing")
    return x


def _axis(axis: int, rank: int, last: int) -> int:
    """``axis`` in 0..last, counting negative values from ``rank``."""
    if not -rank <= axis <= last:
        raise ValueError(f"axis {axis} is out of range for a {rank}-D input")
    return axis + rank if axis < 0 else axis


def _run_conv(m: OnnxModule, s: _Step, args: _Args) -> _Out:
    a = s.attrs
    x = _pad(_t(args[0]), a, 0.0)
    if s.module is None:
        bias = args[2] if len(args) > 2 else None
        return [_CONV[a["nd"]](x, _t(args[1]), bias, a["strides"], a["padding"], a["dilations"], a["group"])]
    y = m.get_submodule(s.module)(x)
    if len(args) > 1 and args[1] is not None:  # a bias shared with another node stays a constant
        y = y + args[1].reshape(1, -1, *([1] * a["nd"]))
    return [y]


def _run_gemm(m: OnnxModule, s: _Step, args: _Args) -> _Out:
    a = s.attrs
    x = _t(args[0]).t() if a["transA"] else _t(args[0])
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
        w = _t(args[1]).t() if a["transB"] else _t(args[1])
        y = alpha * (x @ w)
        rest = args[2:]
    if rest and rest[0] is not None:
        y = y + beta * rest[0]
    return [y]


def _run_matmul(m: OnnxModule, s: _Step, args: _Args) -> _Out:
    if s.module is not None:
        return [m.get_submodule(s.module)(args[0])]
    return [torch.matmul(_t(args[0]), _t(args[1]))]


def _run_batchnorm(m: OnnxModule, s: _Step, args: _Args) -> _Out:
    if s.module is not None:
        return [m.get_submodule(s.module)(args[0])]
    x, scale, bias, mean, var = args
    return [F.batch_norm(_t(x), mean, var, scale, bias, False, 0.0, s.attrs["eps"])]


def _run_layernorm(m: OnnxModule, s: _Step, args: _Args) -> _Out:
    if s.module is not None:
        return [m.get_submodule(s.module)(args[0])]
    x, scale = _t(args[0]), _t(args[1])
    bias = args[2] if len(args) > 2 else None
    axis = _axis(s.attrs["axis"], x.dim(), x.dim() - 1)
    shape = tuple(x.shape[axis:])
    if tuple(scale.shape) == shape and (bias is None or tuple(bias.shape) == shape):
        return [F.layer_norm(x, shape, scale, bias, s.attrs["eps"])]
    y = F.layer_norm(x, shape, None, None, s.attrs["eps"]) * scale
    return [y if bias is None else y + bias]


def _run_maxpool(m: OnnxModule, s: _Step, args: _Args) -> _Out:
    a = s.attrs
    x = _pad(_t(args[0]), a, -math.inf)
    return [_MAXPOOL[a["nd"]](x, a["kernel"], a["strides"], a["padding"], a["dilations"], ceil_mode=a["ceil"])]


def _run_avgpool(m: OnnxModule, s: _Step, args: _Args) -> _Out:
    a = s.attrs
    x, pool = _t(args[0]), _AVGPOOL[a["nd"]]
    if a["pad_mode"] == "symmetric":
        return [
            pool(
                x, a["kernel"], a["strides"], a["padding"], ceil_mode=a["ceil"],
                count_include_pad=a["count_include_pad"],
            )
        ]  # fmt: skip
    pads = a["fpad"] if a["pad_mode"] == "explicit" else _same_fpad(x.shape[2:], a)
    total = pool(F.pad(x, pads), a["kernel"], a["strides"], 0, ceil_mode=False, count_include_pad=True)
    if a["count_include_pad"]:
        return [total]
    ones = F.pad(torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device), pads)
    return [total / pool(ones, a["kernel"], a["strides"], 0, ceil_mode=False, count_include_pad=True)]


def _run_softmax(m: OnnxModule, s: _Step, args: _Args) -> _Out:
    x, axis = _t(args[0]), s.attrs["axis"]
    fn = F.softmax if s.op == "Softmax" else F.log_softmax
    if not s.attrs["legacy"]:
        return [fn(x, dim=axis)]
    axis = _axis(axis, x.dim(), x.dim() - 1)  # opset < 13: softmax over the flattened tail
    flat = x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))
    return [fn(flat, dim=1).reshape(x.shape)]


def _run_clip(m: OnnxModule, s: _Step, args: _Args) -> _Out:
    x = _t(args[0])
    lo = args[1] if len(args) > 1 and args[1] is not None else s.attrs["min"]
    hi = args[2] if len(args) > 2 and args[2] is not None else s.attrs["max"]
    if isinstance(lo, torch.Tensor):
        lo = _scalar(lo, "minimum")
    if isinstance(hi, torch.Tensor):
        hi = _scalar(hi, "maximum")
    if lo is None and hi is None:
        return [x]
    return [torch.clamp(x, min=lo, max=hi)]


def _run_flatten(m: OnnxModule, s: _Step, args: _Args) -> _Out:
    x = _t(args[0])
    axis = _axis(s.attrs["axis"], x.dim(), x.dim())
    return [x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))]


def _run_reshape(m: OnnxModule, s: _Step, args: _Args) -> _Out:
    x, shape = _t(args[0]), _ints(args[1], "shape")
    allowzero = s.attrs["allowzero"]
    if sum(v == -1 for v in shape) > 1 or any(v < -1 for v in shape) or (allowzero and 0 in shape and -1 in shape):
        raise ValueError(f"invalid shape {short_repr(shape)}")
    if not allowzero:
        shape = [x.shape[k] if v == 0 else v for k, v in enumerate(shape)]
    return [x.reshape(shape)]


def _run_transpose(m: OnnxModule, s: _Step, args: _Args) -> _Out:
    perm = s.attrs["perm"]
    x = _t(args[0])
    return [x.permute(perm if perm is not None else list(reversed(range(x.dim()))))]


def _run_div(m: OnnxModule, s: _Step, args: _Args) -> _Out:
    x, y = _t(args[0]), _t(args[1])
    if x.is_floating_point():
        return [x / y]
    return [torch.div(x, y, rounding_mode="trunc")]


def _run_pow(m: OnnxModule, s: _Step, args: _Args) -> _Out:
    x, y = _t(args[0]), _t(args[1])
    if y.numel() == 1 and x.is_floating_point():
        e = float(y.reshape(()).item())
        return [x * x if e == 2.0 else torch.sqrt(x) if e == 0.5 else torch.pow(x, e)]
    return [torch.pow(x, y).to(x.dtype)]


def _run_mod(m: OnnxModule, s: _Step, args: _Args) -> _Out:
    x, y = _t(args[0]), _t(args[1])
    return [torch.fmod(x, y) if s.attrs["fmod"] else torch.remainder(x, y)]


def _run_dropout(m: OnnxModule, s: _Step, args: _Args) -> _Out:
    # inference: the identity, and an all-true mask if the graph names one
    x = _t(args[0])
    mask = len(s.outputs) > 1 and bool(s.outputs[1])
    return [x, torch.ones_like(x, dtype=torch.bool)] if mask else [x]


def _variadic(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> _Runner:
    return lambda m, s, args: [functools.reduce(fn, [_t(a) for a in args])]


def _run_mean(m: OnnxModule, s: _Step, args: _Args) -> _Out:
    xs = [_t(a) for a in args]
    return [functools.reduce(torch.add, xs) / len(xs)]


def _run_where(m: OnnxModule, s: _Step, args: _Args) -> _Out:
    return [torch.where(_t(args[0]).bool(), _t(args[1]), _t(args[2]))]


def _run_cast(m: OnnxModule, s: _Step, args: _Args) -> _Out:
    return [_t(args[0]).to(s.attrs["dtype"])]


def _run_shape(m: OnnxModule, s: _Step, args: _Args) -> _Out:
    x = _t(args[0])
    dims = list(x.shape)[slice(s.attrs["start"], s.attrs["end"])]
    return [torch.tensor(dims, dtype=torch.int64, device=x.device)]


def _indices(idx: torch.Tensor, size: int) -> torch.Tensor:
    idx = idx.long()
    return torch.where(idx < 0, idx + size, idx)


def _run_gather(m: OnnxModule, s: _Step, args: _Args) -> _Out:
    x, idx = _t(args[0]), _t(args[1])
    axis = _axis(s.attrs["axis"], x.dim(), x.dim() - 1)
    flat = _indices(idx, x.shape[axis]).reshape(-1)
    out = x.index_select(axis, flat)
    return [out.reshape((*x.shape[:axis], *idx.shape, *x.shape[axis + 1 :]))]


def _run_gather_elements(m: OnnxModule, s: _Step, args: _Args) -> _Out:
    x, idx = _t(args[0]), _t(args[1])
    axis = _axis(s.attrs["axis"], x.dim(), x.dim() - 1)
    return [torch.gather(x, axis, _indices(idx, x.shape[axis]))]


def _run_gather_nd(m: OnnxModule, s: _Step, args: _Args) -> _Out:
    x, idx = _t(args[0]), _t(args[1]).long()
    b = s.attrs["batch_dims"]
    k = idx.shape[-1]
    if not 0 <= b < min(x.dim(), idx.dim()) or b + k > x.dim() or list(x.shape[:b]) != list(idx.shape[:b]):
        raise ValueError(f"GatherND indices of shape {tuple(idx.shape)} do not fit data of shape {tuple(x.shape)}")
    batch = math.prod(x.shape[:b])
    data = x.reshape(batch, *x.shape[b:])
    ind = idx.reshape(batch, -1, k)
    parts = [_indices(ind[..., j], data.shape[1 + j]) for j in range(k)]
    rows = torch.arange(batch, device=x.device).reshape(batch, 1)
    out = data[(rows, *parts)]
    return [out.reshape((*idx.shape[:-1], *x.shape[b + k :]))]


def _axes_input(s: _Step, args: _Args) -> list[int] | None:
    if s.attrs.get("axes") is not None:
        return list(s.attrs["axes"])
    return _ints(args[1], "axes") if len(args) > 1 and args[1] is not None else None


def _run_unsqueeze(m: OnnxModule, s: _Step, args: _Args) -> _Out:
    x = _t(args[0])
    axes = _axes_input(s, args)
    if axes is None:
        raise ValueError("Unsqueeze needs axes")
    rank = x.dim() + len(axes)
    for ax in sorted(_axis(v, rank, rank - 1) for v in axes):
        x = x.unsqueeze(ax)
    return [x]


def _run_squeeze(m: OnnxModule, s: _Step, args: _Args) -> _Out:
    x = _t(args[0])
    axes = _axes_input(s, args)
    if axes is None:
        return [x.squeeze()]
    dims = sorted({_axis(v, x.dim(), x.dim() - 1) for v in axes}, reverse=True)
    for d in dims:
        if x.shape[d] != 1:
            raise ValueError(f"cannot squeeze dimension {d} of size {x.shape[d]}")
        x = x.squeeze(d)
    return [x]


def _run_concat(m: OnnxModule, s: _Step, args: _Args) -> _Out:
    xs = [_t(a) for a in args]
    return [torch.cat(xs, dim=_axis(s.attrs["axis"], xs[0].dim(), xs[0].dim() - 1))]


def _run_split(m: OnnxModule, s: _Step, args: _Args) -> _Out:
    x = _t(args[0])
    a = s.attrs
    axis = _axis(a["axis"], x.dim(), x.dim() - 1)
    sizes = (
        a["split"]
        if a["split"] is not None
        else (_ints(args[1], "split") if len(args) > 1 and args[1] is not None else None)
    )
    if sizes is None:
        parts = a["num_outputs"] or a["n"]
        size = x.shape[axis]
        chunk = -(-size // parts)
        sizes = [min(chunk, size - k * chunk) for k in range(parts)]
    if sum(sizes) != x.shape[axis] or any(v < 0 for v in sizes):
        raise ValueError(f"split sizes {sizes} do not add up to {x.shape[axis]}")
    return list(torch.split(x, sizes, dim=axis))


def _run_slice(m: OnnxModule, s: _Step, args: _Args) -> _Out:
    x = _t(args[0])
    legacy = s.attrs["legacy"]
    if legacy is not None:
        starts, ends, axes = legacy
        steps = [1] * len(starts)
    else:
        starts, ends = _ints(args[1], "starts"), _ints(args[2], "ends")
        axes = _ints(args[3], "axes") if len(args) > 3 and args[3] is not None else None
        steps = _ints(args[4], "steps") if len(args) > 4 and args[4] is not None else [1] * len(starts)
    axes = list(range(len(starts))) if axes is None else axes
    if not len(starts) == len(ends) == len(axes) == len(steps):
        raise ValueError("starts, ends, axes and steps differ in length")
    for start, end, ax, step in zip(starts, ends, axes, steps, strict=True):
        d = _axis(ax, x.dim(), x.dim() - 1)
        n = x.shape[d]
        if step == 0:
            raise ValueError("a slice step of 0")
        start = start + n if start < 0 else start
        end = end + n if end < 0 else end
        if step > 0:
            start, end = min(max(start, 0), n), min(max(end, 0), n)
            index: list[Any] = [slice(None)] * x.dim()
            index[d] = slice(start, end, step)
            x = x[tuple(index)]
        else:
            start, end = min(max(start, 0), n - 1), min(max(end, -1), n - 1)
            picks = torch.arange(start, end, step, device=x.device)
            x = x.index_select(d, picks)
    return [x]


def _run_expand(m: OnnxModule, s: _Step, args: _Args) -> _Out:
    x = _t(args[0])
    shape = torch.broadcast_shapes(tuple(x.shape), tuple(_ints(args[1], "shape")))  # type: ignore[no-untyped-call]
    _limit(m, shape, s.label)
    return [x.expand(shape)]


def _run_tile(m: OnnxModule, s: _Step, args: _Args) -> _Out:
    x, reps = _t(args[0]), _ints(args[1], "repeats")
    if len(reps) != x.dim():
        raise ValueError(f"{len(reps)} repeats for a {x.dim()}-D input")
    _limit(m, [d * r for d, r in zip(x.shape, reps, strict=True)], s.label)
    return [x.repeat(reps)]


def _run_constant_of_shape(m: OnnxModule, s: _Step, args: _Args) -> _Out:
    shape = _ints(args[0], "shape")
    _limit(m, shape, s.label)
    return [torch.full(shape, s.attrs["value"], dtype=s.attrs["dtype"], device=_t(args[0]).device)]


def _run_range(m: OnnxModule, s: _Step, args: _Args) -> _Out:
    start, limit, delta = (_t(v) for v in args[:3])
    a, b, d = (_scalar(v, what) for v, what in ((start, "start"), (limit, "limit"), (delta, "delta")))
    if d == 0:
        raise ValueError("a Range delta of 0")
    _limit(m, [max(math.ceil((b - a) / d), 0)], s.label)
    return [torch.arange(a, b, d, dtype=start.dtype, device=start.device)]


def _run_pad(m: OnnxModule, s: _Step, args: _Args) -> _Out:
    x = _t(args[0])
    legacy = s.attrs["legacy"]
    if legacy is not None:
        pads, value = legacy
        axes = list(range(x.dim()))
    else:
        pads = _ints(args[1], "pads")
        value = _scalar(args[2], "constant value") if len(args) > 2 and args[2] is not None else 0
        axes_t = args[3] if len(args) > 3 else None
        axes = (
            [_axis(v, x.dim(), x.dim() - 1) for v in _ints(axes_t, "axes")]
            if axes_t is not None
            else list(range(x.dim()))
        )
    if len(pads) != 2 * len(axes):
        raise ValueError(f"{len(pads)} pads for {len(axes)} axes")
    begins, ends = pads[: len(axes)], pads[len(axes) :]
    full_b, full_e = [0] * x.dim(), [0] * x.dim()
    for ax, b, e in zip(axes, begins, ends, strict=True):
        full_b[ax], full_e[ax] = b, e
    _limit(m, [n + b + e for n, b, e in zip(x.shape, full_b, full_e, strict=True)], s.label)
    mode = s.attrs["mode"]
    if mode == "constant":
        return [F.pad(x, _fpad(full_b, full_e), value=float(value))]
    for ax in range(x.dim()):
        b, e = full_b[ax], full_e[ax]
        if b == 0 and e == 0:
            continue
        n = x.shape[ax]
        pos = torch.arange(-b, n + e, device=x.device)
        if mode == "edge":
            pos = pos.clamp(0, n - 1)
        elif mode == "wrap":
            pos = pos.remainder(n)
        else:  # reflect
            if n < 2 or b >= n or e >= n:
                raise ValueError("reflect padding larger than the input")
            pos = pos.abs()
            pos = torch.where(pos > n - 1, 2 * (n - 1) - pos, pos)
        x = x.index_select(ax, pos)
    return [x]


def _resize_coords(out: int, n: int, scale: float, mode: str) -> torch.Tensor:
    i = torch.arange(out, dtype=torch.float64)
    if mode == "align_corners":
        return i * ((n - 1) / (out - 1)) if out > 1 else torch.zeros(out, dtype=torch.float64)
    if mode == "asymmetric":
        return i / scale
    if mode == "tf_half_pixel_for_nn":
        return (i + 0.5) / scale
    if mode == "pytorch_half_pixel" and out == 1:
        return torch.zeros(1, dtype=torch.float64)
    return (i + 0.5) / scale - 0.5


def _run_resize(m: OnnxModule, s: _Step, args: _Args) -> _Out:
    x = _t(args[0])
    a = s.attrs
    if a["v10"]:
        scales_t, sizes_t = args[1], None
    else:
        scales_t = args[2] if len(args) > 2 else None
        sizes_t = args[3] if len(args) > 3 else None
    axes = [_axis(v, x.dim(), x.dim() - 1) for v in a["axes"]] if a["axes"] is not None else list(range(x.dim()))
    if sizes_t is not None and sizes_t.numel():
        sizes = _ints(sizes_t, "sizes")
        scales = [o / x.shape[ax] for o, ax in zip(sizes, axes, strict=True)]
    elif scales_t is not None and scales_t.numel():
        scales = [float(v) for v in scales_t.reshape(-1).tolist()]
        if any(not math.isfinite(v) or v <= 0 for v in scales):
            raise ValueError(f"invalid scales {short_repr(scales)}")
        sizes = [math.floor(x.shape[ax] * sc) for ax, sc in zip(axes, scales, strict=True)]
    else:
        raise ValueError("Resize needs scales or sizes")
    if len(sizes) != len(axes):
        raise ValueError(f"{len(sizes)} sizes for {len(axes)} axes")
    shape = list(x.shape)
    for ax, o in zip(axes, sizes, strict=True):
        shape[ax] = o
    _limit(m, shape, s.label)
    for ax, out, scale in zip(axes, sizes, scales, strict=True):
        n = x.shape[ax]
        if out == n and scale == 1.0:
            continue
        coords = _resize_coords(out, n, scale, a["coords"])
        if a["mode"] == "nearest":
            rule = a["nearest"]
            if rule == "round_prefer_floor":
                pos = torch.ceil(coords - 0.5)
            elif rule == "round_prefer_ceil":
                pos = torch.floor(coords + 0.5)
            else:
                pos = torch.floor(coords) if rule == "floor" else torch.ceil(coords)
            x = x.index_select(ax, pos.clamp(0, n - 1).long().to(x.device))
        else:
            c = coords.clamp(0, n - 1)
            lo = torch.floor(c)
            w = (c - lo).to(x.dtype).to(x.device)
            lo_i = lo.long().to(x.device)
            hi_i = (lo_i + 1).clamp(max=n - 1)
            view = [1] * x.dim()
            view[ax] = out
            w = w.reshape(view)
            x = x.index_select(ax, lo_i) * (1 - w) + x.index_select(ax, hi_i) * w
    return [x]


def _run_reduce(m: OnnxModule, s: _Step, args: _Args) -> _Out:
    x = _t(args[0])
    axes = _axes_input(s, args)
    keep = s.attrs["keepdims"]
    if not axes:
        if s.attrs["noop"]:
            return [x]
        axes = list(range(x.dim()))
    dims = sorted({_axis(v, x.dim(), x.dim() - 1) for v in axes})
    op = s.op
    if op == "ReduceMean":
        return [x.mean(dim=dims, keepdim=keep)]
    if op == "ReduceSum":
        return [x.sum(dim=dims, keepdim=keep)]
    if op == "ReduceMax":
        return [x.amax(dim=dims, keepdim=keep)]
    if op == "ReduceMin":
        return [x.amin(dim=dims, keepdim=keep)]
    if op == "ReduceL2":
        return [torch.sqrt((x * x).sum(dim=dims, keepdim=keep))]
    for d in reversed(dims):  # ReduceProd
        x = x.prod(dim=d, keepdim=keep)
    return [x]


def _run_argmax(m: OnnxModule, s: _Step, args: _Args) -> _Out:
    x = _t(args[0])
    axis = _axis(s.attrs["axis"], x.dim(), x.dim() - 1)
    fn = torch.argmax if s.op == "ArgMax" else torch.argmin
    if s.attrs["select_last_index"]:
        out = x.shape[axis] - 1 - fn(x.flip(axis), dim=axis, keepdim=bool(s.attrs["keepdims"]))
    else:
        out = fn(x, dim=axis, keepdim=bool(s.attrs["keepdims"]))
    return [out]


def _run_trilu(m: OnnxModule, s: _Step, args: _Args) -> _Out:
    x = _t(args[0])
    k = int(_scalar(args[1], "k")) if len(args) > 1 and args[1] is not None else 0
    return [torch.triu(x, k) if s.attrs["upper"] else torch.tril(x, k)]


def _run_cumsum(m: OnnxModule, s: _Step, args: _Args) -> _Out:
    x = _t(args[0])
    axis = _axis(int(_scalar(_t(args[1]), "axis")), x.dim(), x.dim() - 1)
    if s.attrs["reverse"]:
        x = x.flip(axis)
    y = torch.cumsum(x, dim=axis)
    if s.attrs["exclusive"]:
        y = y - x
    return [y.flip(axis) if s.attrs["reverse"] else y]


def _run_attention(m: OnnxModule, s: _Step, args: _Args) -> _Out:
    a = s.attrs
    q, k, v = _t(args[0]), _t(args[1]), _t(args[2])
    mask = args[3] if len(args) > 3 else None
    three_d = q.dim() == 3
    if three_d:
        if a["q_heads"] <= 0 or a["kv_heads"] <= 0:
            raise ValueError("3-D Attention inputs need q_num_heads and kv_num_heads")
        b, sq, _ = q.shape
        q = q.reshape(b, sq, a["q_heads"], -1).transpose(1, 2)
        k = k.reshape(b, k.shape[1], a["kv_heads"], -1).transpose(1, 2)
        v = v.reshape(b, v.shape[1], a["kv_heads"], -1).transpose(1, 2)
    present_k, present_v = k, v
    heads, kv_heads = q.shape[1], k.shape[1]
    if heads != kv_heads:
        if heads % kv_heads:
            raise ValueError(f"{heads} query heads for {kv_heads} key/value heads")
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
    scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if a["causal"]:
        causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, -math.inf)
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else scores + mask
    if a["softcap"] > 0:
        scores = a["softcap"] * torch.tanh(scores / a["softcap"])
    y = torch.matmul(torch.softmax(scores, dim=-1), v)
    if three_d:
        y = y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1)
    return [y, present_k, present_v]


def _unary(fn: Callable[[torch.Tensor], torch.Tensor]) -> _Runner:
    return lambda m, s, args: [fn(_t(args[0]))]


def _binary(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> _Runner:
    return lambda m, s, args: [fn(_t(args[0]), _t(args[1]))]


_RUNNERS: dict[str, _Runner] = {
    "Conv": _run_conv,
    "Gemm": _run_gemm,
    "MatMul": _run_matmul,
    "BatchNormalization": _run_batchnorm,
    "LayerNormalization": _run_layernorm,
    "MaxPool": _run_maxpool,
    "AveragePool": _run_avgpool,
    "Softmax": _run_softmax,
    "LogSoftmax": _run_softmax,
    "Clip": _run_clip,
    "Flatten": _run_flatten,
    "Reshape": _run_reshape,
    "Transpose": _run_transpose,
    "Concat": _run_concat,
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _run_div,
    "Pow": _run_pow,
    "Mod": _run_mod,
    "Max": _variadic(torch.maximum),
    "Min": _variadic(torch.minimum),
    "Sum": _variadic(torch.add),
    "Mean": _run_mean,
    "Equal": _binary(torch.eq),
    "Less": _binary(torch.lt),
    "Greater": _binary(torch.gt),
    "LessOrEqual": _binary(torch.le),
    "GreaterOrEqual": _binary(torch.ge),
    "And": _binary(torch.logical_and),
    "Or": _binary(torch.logical_or),
    "Xor": _binary(torch.logical_xor),
    "Not": _unary(torch.logical_not),
    "Where": _run_where,
    "Relu": _unary(torch.relu),
    "Sigmoid": _unary(torch.sigmoid),
    "Tanh": _unary(torch.tanh),
    "Erf": _unary(torch.erf),
    "Exp": _unary(torch.exp),
    "Log": _unary(torch.log),
    "Abs": _unary(torch.abs),
    "Neg": _unary(torch.neg),
    "Reciprocal": _unary(torch.reciprocal),
    "Floor": _unary(torch.floor),
    "Ceil": _unary(torch.ceil),
    "Round": _unary(torch.round),
    "Sign": _unary(torch.sign),
    "Sqrt": _unary(torch.sqrt),
    "Sin": _unary(torch.sin),
    "Cos": _unary(torch.cos),
    "IsNaN": _unary(torch.isnan),
    "IsInf": lambda m, s, args: [
        (torch.isneginf(_t(args[0])) if s.attrs["detect_negative"] else torch.zeros_like(_t(args[0]), dtype=torch.bool))
        | (
            torch.isposinf(_t(args[0]))
            if s.attrs["detect_positive"]
            else torch.zeros_like(_t(args[0]), dtype=torch.bool)
        )
    ],
    "Softplus": _unary(F.softplus),
    "Elu": lambda m, s, args: [F.elu(_t(args[0]), s.attrs["alpha"])],
    "HardSigmoid": lambda m, s, args: [torch.clamp(s.attrs["alpha"] * _t(args[0]) + s.attrs["beta"], 0.0, 1.0)],
    "HardSwish": _unary(F.hardswish),
    "LeakyRelu": lambda m, s, args: [F.leaky_relu(_t(args[0]), s.attrs["alpha"])],
    "Gelu": lambda m, s, args: [F.gelu(_t(args[0]), approximate=s.attrs["approximate"])],
    "Identity": _unary(lambda x: x),
    "Dropout": _run_dropout,
    "GlobalAveragePool": _unary(lambda x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True)),
    "GlobalMaxPool": _unary(lambda x: x.amax(dim=tuple(range(2, x.dim())), keepdim=True)),
    "Cast": _run_cast,
    "CastLike": lambda m, s, args: [_t(args[0]).to(_t(args[1]).dtype)],
    "Shape": _run_shape,
    "Size": lambda m, s, args: [torch.tensor(_t(args[0]).numel(), dtype=torch.int64)],
    "Gather": _run_gather,
    "GatherElements": _run_gather_elements,
    "GatherND": _run_gather_nd,
    "Unsqueeze": _run_unsqueeze,
    "Squeeze": _run_squeeze,
    "Split": _run_split,
    "Slice": _run_slice,
    "Expand": _run_expand,
    "Tile": _run_tile,
    "ConstantOfShape": _run_constant_of_shape,
    "Range": _run_range,
    "Pad": _run_pad,
    "Resize": _run_resize,
    **{op: _run_reduce for op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2")},
    "ArgMax": _run_argmax,
    "ArgMin": _run_argmax,
    "Trilu": _run_trilu,
    "CumSum": _run_cumsum,
    "Einsum": lambda m, s, args: [torch.einsum(s.attrs["equation"], *[_t(x) for x in args])],
    "Attention": _run_attention,
}


# -- the upload-time check ------------------------------------------------------------------------


class _OverBudget(Exception):
    pass


def _trial_shapes(module: OnnxModule) -> list[list[int]]:
    """The input shapes of the trial run: declared dimensions, and small ones where they are dynamic."""
    out = []
    for name, shape, dtype in zip(module.input_names, module.input_shapes, module.input_dtypes, strict=True):
        if shape is None:
            raise OnnxFormatError(
                f"graph input {name!r} declares no shape; export with example inputs of the real shape "
                "(torch.onnx.export with input_names and dynamic axes only for the batch and sequence)"
            )
        dims = []
        for k, d in enumerate(shape):
            if d is not None:
                dims.append(d)
            elif k == 0:
                dims.append(2)
            elif len(shape) == 4 and dtype.is_floating_point and k >= 2:
                dims.append(32)
            elif len(shape) == 4 and k == 1:
                dims.append(3)
            else:
                dims.append(16)
        out.append(dims)
    return out


def _vocab_size(module: OnnxModule, token_input: str) -> int | None:
    """Rows of the embedding table that a Gather reads with the token ids, when the graph says so plainly."""
    tables = {n: getattr(module.params if h == "params" else module.constants, a) for n, h, a in module._const_slots}
    aliases = {token_input}
    for s in module._steps:
        if s.op in ("Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Flatten") and s.inputs[0] in aliases:
            aliases.update(o for o in s.outputs if o)
        if s.op == "Gather" and s.attrs.get("axis") == 0 and len(s.inputs) == 2 and s.inputs[1] in aliases:
            table = tables.get(s.inputs[0])
            if table is not None and table.dim() == 2 and table.is_floating_point():
                return int(table.shape[0])
    return None


def _model_input(module: OnnxModule, shapes: list[list[int]]) -> ModelInput | None:
    dtypes = module.input_dtypes
    if all(not d.is_floating_point and d != torch.bool for d in dtypes) and all(
        len(s) == 2 and s == shapes[0] for s in shapes
    ):
        return ModelInput("tokens", (shapes[0][1],), _vocab_size(module, module.input_names[0]))
    if len(shapes) != 1 or not dtypes[0].is_floating_point:
        return None
    if len(shapes[0]) == 4:
        return ModelInput("image", tuple(shapes[0][1:]))
    if len(shapes[0]) == 2:
        return ModelInput("features", (shapes[0][1],))
    return None


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def check_onnx(
    path: str | os.PathLike[str],
    *,
    max_bytes: int,
    max_memory_bytes: int,
    external_dir: str | os.PathLike[str] | None = None,
) -> OnnxFacts:
    """Everything a job does with an ONNX file at its start, done now: validate (reading external data
    from ``external_dir`` only), convert, estimate the memory training needs, and run the module once
    on zeros of the declared input shape (dynamic dimensions small) without gradients.

    Raises :class:`~dns_core.onnx_validate.OnnxFormatError` naming the problem (the operator and node
    where the trial run fails) and how to re-export, also when the estimate exceeds ``max_memory_bytes``.
    """
    module = load_onnx(path, max_bytes=max_bytes, external_dir=external_dir).eval()
    params = list(module.parameters())
    num_parameters = sum(p.numel() for p in params)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    buffer_bytes = sum(b.numel() * b.element_size() for b in module.buffers())
    fixed = 4 * param_bytes + buffer_bytes  # weights, gradients, optimizer momentum, surgery masks
    too_big = (
        "the model needs about {need} to train ({why}), more than the {limit} this server allows; prune a smaller "
        "model, or export it with smaller static input shapes"
    )
    if fixed > max_memory_bytes:
        raise OnnxFormatError(
            too_big.format(need=_mib(fixed), why="parameters, gradients, optimizer state and masks",
                           limit=_mib(max_memory_bytes))
        )  # fmt: skip
    shapes = _trial_shapes(module)
    input_bytes = sum(math.prod(s) * 8 for s in shapes)
    if fixed + input_bytes > max_memory_bytes:
        raise OnnxFormatError(
            too_big.format(
                need=_mib(fixed + input_bytes), why=f"inputs of shape {shapes}", limit=_mib(max_memory_bytes)
            )
        )
    inputs = [torch.zeros(s, dtype=d) for s, d in zip(shapes, module.input_dtypes, strict=True)]
    done = 0
    activations = 0

    def observe(step: _Step, outs: list[torch.Tensor | None]) -> None:
        nonlocal done, activations
        done += 1
        activations += sum(t.numel() * t.element_size() for t in outs if t is not None)
        if fixed + activations > max_memory_bytes:
            raise _OverBudget

    module.max_elements = max(1, (max_memory_bytes - fixed) // 4)
    flops = FlopCounterMode(display=False)  # the trial run's arithmetic, for the training-time estimate
    try:
        with torch.no_grad(), flops:
            module.run(inputs, observe=observe)
    except _OverBudget:
        raise OnnxFormatError(
            too_big.format(
                need=f"more than {_mib(fixed + activations)}",
                why=f"activations for inputs of shape {shapes}",
                limit=_mib(max_memory_bytes),
            )
        ) from None
    except OnnxFormatError:
        raise
    except Exception as e:
        where = module._steps[done].label if done < len(module._steps) else "the graph outputs"
        raise OnnxFormatError(
            f"the model fails on a trial input of shape {shapes} at {where}: {short_repr(str(e), 300)}; {REEXPORT_HINT}"
        ) from None
    finally:
        module.max_elements = MAX_ELEMENTS
    batch = shapes[0][0] if shapes and shapes[0] else 1
    per_example = activations // max(batch, 1)
    estimate = fixed + 2 * per_example * BATCH_SIZE  # activations kept for the backward pass, and their gradients
    if estimate > max_memory_bytes:
        raise OnnxFormatError(
            too_big.format(need=_mib(estimate), why=f"with activations for a batch of {BATCH_SIZE}",
                           limit=_mib(max_memory_bytes))
        )  # fmt: skip
    flops_per_example = int(flops.get_total_flops()) // max(batch, 1)
    return OnnxFacts(num_parameters, _model_input(module, shapes), estimate, module.train(), flops_per_example)
