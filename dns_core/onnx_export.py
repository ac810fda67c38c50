"""ONNX out: the original graph with the pruned weights, and a check against onnxruntime.

:func:`export_onnx` takes the original graph and replaces the initializers that were turned into
layer parameters or buffers (:attr:`~dns_core.onnx_convert.OnnxModule.initializer_map`) with the
module's current values (W ⊙ T after surgery); everything else stays as it was.
:func:`check_with_onnxruntime` runs a module and onnxruntime on the same inputs and compares them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from onnx import AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto

from .onnx_convert import OnnxModule
from .onnx_validate import OnnxFormatError, short_repr, validate_onnx

__all__ = ["OnnxMismatchError", "check_with_onnxruntime", "export_onnx"]


class OnnxMismatchError(OnnxFormatError):
    """The converted module and onnxruntime disagree on the same inputs."""


# -- export and checks ----------------------------------------------------------------------------


def export_onnx(module: OnnxModule, path: str | os.PathLike[str] | None = None) -> bytes:
    """The original graph with every bound initializer replaced by the module's current value.

    After surgery that is W ⊙ T (dense, with zeros); BatchNorm running statistics and the other
    trained tensors (``params``) are written back too. The result is one self-contained file (also
    for a model that came with external data). Inputs, outputs, nodes and all other initializers are
    unchanged, except where layers shared an initializer through Identity nodes: each layer's
    tensor becomes an initializer of its own, those Identity nodes go, and so does what nothing uses
    any more. Writes ``path`` if given.
    """
    model = ModelProto()
    model.ParseFromString(module._template)
    graph = model.graph
    targets: dict[str, TensorProto] = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for a in node.attribute:
                if a.name == "value" and a.type == AttributeProto.TENSOR:
                    targets.setdefault(node.output[0], a.t)
    shared: set[str] = set()
    for name, binding in module.initializer_map.items():
        value = module.exported_tensor(name)
        if binding.source == "shared":  # an Identity of a shared initializer: now a tensor of its own
            shared.add(name)
            tensor = graph.initializer.add()
            tensor.name, tensor.data_type = name, TensorProto.FLOAT
            tensor.dims.extend(value.shape)
        else:
            tensor = targets[name]
            tensor.ClearField("float_data")
        tensor.raw_data = value.tobytes()
    if shared:
        kept = [n for n in graph.node if not (n.output and set(n.output) <= shared)]
        del graph.node[:]
        graph.node.extend(kept)
        _drop_unused(graph)
    try:
        data = model.SerializeToString()
    except Exception as e:  # protobuf refuses messages over 2 GiB
        raise OnnxFormatError(f"cannot serialise the exported model: {short_repr(str(e), 200)}") from None
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(data)
    return data


def _drop_unused(graph: GraphProto) -> None:
    """Remove nodes, initializers and value infos that no graph output depends on any more."""
    needed = {o.name for o in graph.output}
    kept: list[NodeProto] = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output if o):
            kept.append(node)
            needed.update(n for n in node.input if n)
    kept.reverse()
    produced = {o for n in kept for o in n.output} | {i.name for i in graph.input}
    inits = [t for t in graph.initializer if t.name in needed]
    infos = [v for v in graph.value_info if v.name in produced or v.name in needed]
    del graph.node[:]
    graph.node.extend(kept)
    del graph.initializer[:]
    graph.initializer.extend(inits)
    del graph.value_info[:]
    graph.value_info.extend(infos)


def _random_inputs(module: OnnxModule, n: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for name, shape, dtype in zip(module.input_names, module.input_shapes, module.input_dtypes, strict=True):
        if shape is None:
            raise OnnxFormatError(f"input {name!r} has no declared shape; pass inputs= explicitly")
        dims = []
        for k, d in enumerate(shape):
            if d is None and k > 0:
                raise OnnxFormatError(
                    f"input {name!r} has an unknown dimension {k} in {shape}; pass inputs= explicitly"
                )
            dims.append(n if d is None else d)
        if dtype.is_floating_point:
            out.append(torch.randn(dims, generator=generator))
        else:  # ids and masks: 0 and 1 are valid for any vocabulary
            out.append(torch.randint(0, 2, dims, generator=generator).to(dtype))
    return out


def check_with_onnxruntime(
    module: OnnxModule,
    onnx_bytes: bytes,
    n: int = 4,
    atol: float = 1e-4,
    *,
    rtol: float = 0.0,
    inputs: Sequence[torch.Tensor] | None = None,
    seed: int = 0,
) -> float:
    """Max abs difference between ``module`` (eval mode) and onnxruntime on ``onnx_bytes``.

    Random normal inputs (seeded) use ``n`` for a symbolic batch (first) dimension; other unknown
    dimensions need explicit ``inputs``. ``onnx_bytes`` is validated before onnxruntime loads it.
    Raises :class:`OnnxMismatchError` where an output differs by more than ``atol + rtol·|expected|``
    (equal infinities and NaN in both count as agreeing).
    """
    validate_onnx(onnx_bytes, max_bytes=max(len(onnx_bytes), 1))
    xs = list(inputs) if inputs is not None else _random_inputs(module, n, seed)
    feeds = {
        name: x.detach().cpu().to(dtype).numpy()
        for name, x, dtype in zip(module.input_names, module._inputs(xs), module.input_dtypes, strict=True)
    }
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 4  # errors come back as exceptions
    try:
        session = onnxruntime.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
        expected = session.run(module.output_names, feeds)
    except Exception as e:
        raise OnnxFormatError(f"onnxruntime cannot run the model: {short_repr(str(e), 300)}") from None
    device = next((t.device for t in [*module.parameters(), *module.buffers()]), torch.device("cpu"))
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            got = module(*[x.to(device) for x in xs])
    except Exception as e:
        raise OnnxMismatchError(
            f"the converted module fails where onnxruntime runs: {short_repr(str(e), 300)}"
        ) from None
    finally:
        module.train(was_training)
    outputs = (got,) if isinstance(got, torch.Tensor) else got
    worst, bad = 0.0, []
    for name, ours, theirs in zip(module.output_names, outputs, expected, strict=True):
        mine = ours.detach().cpu().numpy().astype(np.float64)
        ref = np.asarray(theirs, dtype=np.float64)
        if mine.shape != ref.shape:
            raise OnnxMismatchError(f"output {name!r}: torch gives shape {mine.shape}, onnxruntime {ref.shape}")
        same = (mine == ref) | (np.isnan(mine) & np.isnan(ref))
        with np.errstate(invalid="ignore"):
            diff = np.where(same, 0.0, np.abs(mine - ref))
        diff = np.where(np.isnan(diff), np.inf, diff)
        if diff.size:
            worst = max(worst, float(diff.max()))
            if bool((diff > atol + rtol * np.abs(np.nan_to_num(ref))).any()):
                bad.append(name)
    if bad:
        raise OnnxMismatchError(
            f"the converted module and onnxruntime differ by up to {worst:.3g} on {', '.join(bad)} (atol {atol:g}, "
            f"rtol {rtol:g}); the conversion does not reproduce this model, please report it"
        )
    return worst
