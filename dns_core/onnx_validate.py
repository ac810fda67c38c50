"""Checks that an ONNX file is one netsurgery accepts, before anything else reads it.

:func:`validate_onnx` takes bytes or a path: a byte-size cap, a sniff for files that are not ONNX
at all (pickles, zip archives, …), a protobuf parse of the bytes, then refusals in pure Python
before any C++ checker sees the model: external data (unless the caller names the folder that holds
it: then :func:`resolve_external_data` reads each tensor's bytes itself, from plain files inside
that folder only), model-local functions, training info, sparse initializers, opsets outside
:data:`OPSET_RANGE`, custom domains, operators outside :data:`SUPPORTED_OPS`, subgraphs; then
``onnx.checker.check_model`` on the proto, and the element types (float32 weights; int64, int32
and bool for shapes, ids and masks).

Every refusal raises :class:`OnnxFormatError` (an :class:`~dns_core.errors.InputError`) with a
message that says what is wrong and how to fix or convert the model. This module does not import
torch: the service's API runs it on uploads. :mod:`dns_core.onnx_convert` turns an accepted model
into a trainable module, :mod:`dns_core.onnx_export` writes one back.
"""

from __future__ import annotations

import math
import os
import re
import stat
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto

from .errors import InputError

__all__ = [
    "DEFAULT_DOMAINS",
    "DEFAULT_MAX_BYTES",
    "EXPORT_HINT",
    "MAX_SPATIAL",
    "NUMPY_TYPES",
    "OPSET_RANGE",
    "SUPPORTED_OPS",
    "OnnxFormatError",
    "check_dtype",
    "parse_onnx",
    "resolve_external_data",
    "short_repr",
    "uses_external_data",
    "validate_onnx",
    "validate_proto",
]

DEFAULT_MAX_BYTES = 512 * 2**20
OPSET_RANGE = (7, 23)
"""Accepted versions of the default ONNX domain (both ends included)."""

SUPPORTED_OPS = frozenset(
    {
        "Abs", "Add", "And", "ArgMax", "ArgMin", "Attention", "AveragePool", "BatchNormalization", "Cast", "CastLike",
        "Ceil", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv", "Cos", "CumSum", "Div", "Dropout", "Einsum",
        "Elu", "Equal", "Erf", "Exp", "Expand", "Flatten", "Floor", "Gather", "GatherElements", "GatherND", "Gelu",
        "Gemm", "GlobalAveragePool", "GlobalMaxPool", "Greater", "GreaterOrEqual", "HardSigmoid", "HardSwish",
        "Identity", "IsInf", "IsNaN", "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax",
        "MatMul", "Max", "MaxPool", "Mean", "Min", "Mod", "Mul", "Neg", "Not", "Or", "Pad", "Pow", "Range",
        "Reciprocal", "ReduceL2", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "Relu",
        "Reshape", "Resize", "Round", "Shape", "Sigmoid", "Sign", "Sin", "Size", "Slice", "Softmax", "Softplus",
        "Split", "Sqrt", "Squeeze", "Sub", "Sum", "Tanh", "Tile", "Transpose", "Trilu", "Unsqueeze", "Where", "Xor",
    }
)  # fmt: skip
"""Operators of the default domain that :class:`~dns_core.onnx_convert.OnnxModule` converts."""

EXPORT_HINT = (
    "export the model on your side with torch.onnx.export(model.eval(), example_input, 'model.onnx') (see docs/onnx.md)"
)
# the limits below bind the converter too
DEFAULT_DOMAINS = ("", "ai.onnx")
MAX_SPATIAL = 1024  # bound on pads, strides, dilations and pool kernels
NUMPY_TYPES: dict[int, np.dtype[Any]] = {  # the accepted element types of tensor data
    TensorProto.FLOAT: np.dtype("<f4"),
    TensorProto.INT64: np.dtype("<i8"),
    TensorProto.INT32: np.dtype("<i4"),
    TensorProto.BOOL: np.dtype("?"),
}
_OTHER_FLOATS = {"FLOAT16", "DOUBLE", "BFLOAT16", "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ",
                 "FLOAT4E2M1", "FLOAT8E8M0", "COMPLEX64", "COMPLEX128"}  # fmt: skip


_IO_TYPES = {TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32, TensorProto.BOOL}


class OnnxFormatError(InputError):
    """An ONNX file (or something pretending to be one) that netsurgery does not accept."""


# -- reading and validation ---------------------------------------------------------------------


def short_repr(value: object, limit: int = 120) -> str:
    """``repr(value)``, cut to ``limit`` characters for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _plain(text: str, limit: int = 60) -> str:
    """An operator or domain name as is when it looks like one, else quoted."""
    return text if len(text) <= limit and re.fullmatch(r"[A-Za-z0-9_.]+", text) else short_repr(text, limit)


def _listing(items: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown} and {len(items) - limit} more"


def _read(data: bytes | bytearray | memoryview | str | os.PathLike[str], max_bytes: int) -> bytes:
    too_big = (
        "the file is larger than the {limit} byte limit ({size} bytes); prune a smaller model or "
        "raise max_bytes if you trust the source"
    )
    if isinstance(data, bytes | bytearray | memoryview):
        raw = bytes(data)
        if len(raw) > max_bytes:
            raise OnnxFormatError(too_big.format(limit=max_bytes, size=len(raw)))
        return raw
    with open(os.fspath(data), "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise OnnxFormatError(too_big.format(limit=max_bytes, size=size))
        raw = f.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise OnnxFormatError(too_big.format(limit=max_bytes, size=f"more than {max_bytes}"))
    return raw


def _sniff(raw: bytes) -> None:
    """Refuse, by content, well-known formats that are not ONNX."""
    if not raw:
        raise OnnxFormatError(f"the file is empty, not an ONNX model; {EXPORT_HINT}")
    kind = None
    if raw[:1] == b"\x80" and raw[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        kind = "a Python pickle (torch.save .pt/.pth/.bin/.pkl)"
    elif raw[:4] == b"PK\x03\x04":
        kind = "a zip archive (torch.save .pt/.pth, TorchScript, torch.export .pt2 or Keras .keras)"
    elif raw[:8] == b"\x89HDF\r\n\x1a\n":
        kind = "an HDF5 file (Keras .h5)"
    elif raw[:2] == b"\x1f\x8b":
        kind = "a gzip archive"
    elif raw[:6] == b"\x93NUMPY":
        kind = "a NumPy .npy file"
    elif raw[4:8] == b"TFL3":
        kind = "a TensorFlow Lite model"
    elif len(raw) > 9 and raw[8:9] == b"{" and 2 <= int.from_bytes(raw[:8], "little") <= len(raw) - 8:
        kind = "a safetensors weights file (weights only, no graph)"
    if kind is not None:
        raise OnnxFormatError(
            f"this is not an ONNX model: it looks like {kind}. Uploads are never unpickled or unzipped; {EXPORT_HINT}"
        )


def _parse(raw: bytes) -> ModelProto:
    model = ModelProto()
    try:
        model.ParseFromString(raw)
    except Exception as e:  # protobuf raises DecodeError, or RuntimeError from upb
        raise OnnxFormatError(
            f"this is not an ONNX model: the bytes do not parse as an ONNX protobuf ({short_repr(str(e), 200)}); "
            f"{EXPORT_HINT}"
        ) from None
    if model.ir_version <= 0 or not model.HasField("graph"):
        raise OnnxFormatError(
            f"this is not an ONNX model: it has no IR version or no graph (is it another protobuf, e.g. a "
            f"TensorFlow .pb?); {EXPORT_HINT}"
        )
    return model


def _refuse_bad_text(model: ModelProto) -> None:
    """Refuse string fields that are not valid UTF-8 (protobuf hands those back as bytes)."""
    stack: list[Any] = [model]  # protobuf messages
    while stack:
        message = stack.pop()
        for fd, value in message.ListFields():
            repeated = fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED
            values = list(value) if repeated else [value]
            if fd.type == fd.TYPE_STRING and any(not isinstance(v, str) for v in values):
                raise OnnxFormatError(
                    f"the model has a {fd.name!r} text field that is not valid UTF-8; the file is corrupt or not ONNX"
                )
            if fd.type in (fd.TYPE_MESSAGE, fd.TYPE_GROUP):
                stack.extend(values)


def uses_external_data(t: TensorProto) -> bool:
    """Whether ``t`` points at data outside the file (never read)."""
    return t.data_location == TensorProto.EXTERNAL or len(t.external_data) > 0


def _node_tensors(node: NodeProto, where: str) -> Iterator[tuple[str, TensorProto]]:
    for a in node.attribute:
        here = f"attribute {node.name!r}.{a.name!r} ({node.op_type}) in {where}"  # names may hold braces
        if a.HasField("t"):
            yield here, a.t
        for t in a.tensors:
            yield here, t
        sparse = [a.sparse_tensor] if a.HasField("sparse_tensor") else []
        for st in [*sparse, *a.sparse_tensors]:
            yield here, st.values
            yield here, st.indices
        if a.HasField("g"):
            yield from _graph_tensors(a.g, f"subgraph {a.name!r}")
        for g in a.graphs:
            yield from _graph_tensors(g, f"subgraph {a.name!r}")


def _graph_tensors(graph: GraphProto, where: str = "the graph") -> Iterator[tuple[str, TensorProto]]:
    for t in graph.initializer:
        yield f"initializer {t.name!r}", t
    for st in graph.sparse_initializer:
        yield f"sparse initializer {st.values.name!r}", st.values
        yield f"sparse initializer {st.values.name!r}", st.indices
    for node in graph.node:
        yield from _node_tensors(node, where)


def _model_tensors(model: ModelProto) -> Iterator[tuple[str, TensorProto]]:
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node, f"function {function.name!r}")
    for info in model.training_info:
        yield from _graph_tensors(info.initialization, "training info")
        yield from _graph_tensors(info.algorithm, "training info")


def _refuse_external_data(model: ModelProto) -> None:
    for where, t in _model_tensors(model):
        if uses_external_data(t):
            location = next((e.value for e in t.external_data if e.key == "location"), "")
            raise OnnxFormatError(
                f"ONNX with external data is not accepted as a lone file ({where} points to "
                f"{short_repr(location, 80)}): upload model.onnx together with its data file (model.onnx.data) "
                "as one zip or tar archive or as several files of one multipart upload, or re-save with "
                "onnx.save(model, path, save_as_external_data=False) so that every weight is inside the one file"
            )


def _external_fields(t: TensorProto, where: str) -> tuple[str, int, int | None]:
    """``location``, ``offset`` and ``length`` of an external tensor, checked as text."""
    fields: dict[str, str] = {}
    for entry in t.external_data:
        if entry.key in fields:
            raise OnnxFormatError(f"{where}: external data key {short_repr(entry.key, 40)} is given twice")
        fields[entry.key] = entry.value
    unknown = set(fields) - {"location", "offset", "length", "checksum", "basepath"}
    if unknown:
        raise OnnxFormatError(f"{where}: unknown external data key(s) {short_repr(sorted(unknown), 80)}")
    if fields.get("basepath"):
        raise OnnxFormatError(f"{where}: external data with a basepath is not accepted")
    location = fields.get("location", "")
    numbers: list[int | None] = []
    for key in ("offset", "length"):
        text = fields.get(key)
        if text is None or text == "":
            numbers.append(None)
        elif re.fullmatch(r"[0-9]{1,19}", text):
            numbers.append(int(text))
        else:
            raise OnnxFormatError(f"{where}: external data {key} {short_repr(text, 40)} is not a byte count")
    return location, numbers[0] or 0, numbers[1]


def _external_path(folder: str, location: str, where: str) -> str:
    """The plain file ``location`` names inside ``folder``, else :class:`OnnxFormatError`."""
    bad = (
        not location
        or "\\" in location
        or "\x00" in location
        or location.startswith("/")
        or re.match(r"^[A-Za-z]:", location) is not None
    )
    parts = location.split("/")
    if bad or any(p in ("", ".", "..") for p in parts):
        raise OnnxFormatError(
            f"{where}: external data location {short_repr(location, 80)} is not a plain file name inside the "
            "uploaded folder (absolute paths, '..', empty parts and backslashes are refused); re-export with "
            "torch.onnx.export(..., external_data=True) and upload model.onnx with model.onnx.data beside it"
        )
    current = folder
    for k, part in enumerate(parts):
        current = os.path.join(current, part)
        try:
            info = os.lstat(current)
        except OSError:
            raise OnnxFormatError(
                f"{where}: its external data file {short_repr(location, 80)} is missing; upload it together "
                "with model.onnx"
            ) from None
        last = k == len(parts) - 1
        if stat.S_ISLNK(info.st_mode) or not (stat.S_ISREG(info.st_mode) if last else stat.S_ISDIR(info.st_mode)):
            raise OnnxFormatError(
                f"{where}: external data location {short_repr(location, 80)} is not a plain file inside the "
                "uploaded folder (links, devices and fifos are refused)"
            )
    return current


def resolve_external_data(model: ModelProto, folder: str | os.PathLike[str], *, max_bytes: int) -> int:
    """Read every external tensor of ``model`` from its file inside ``folder`` into the proto itself.

    Each location must be a relative path to a plain file inside ``folder`` (no absolute paths, ``..``,
    links, devices or fifos), with ``offset`` and ``length`` inside the file and the length the tensor
    needs; at most ``max_bytes`` are read in all. The bytes are read here, with ``O_NOFOLLOW``; onnx's
    own loader is never asked to open anything. Returns the number of bytes read.
    """
    root = os.fspath(folder)
    if not os.path.isdir(root):
        raise OnnxFormatError(f"the external data folder {short_repr(root, 80)} is not a folder")
    total = 0
    handles: dict[str, tuple[int, int]] = {}  # path -> (fd, size)
    try:
        for where, t in _model_tensors(model):
            if not uses_external_data(t):
                continue
            if t.data_location != TensorProto.EXTERNAL or t.HasField("raw_data"):
                raise OnnxFormatError(f"{where}: external data entries on a tensor that is not external")
            location, offset, length = _external_fields(t, where)
            path = _external_path(root, location, where)
            if path not in handles:
                flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
                try:
                    fd = os.open(path, flags)
                except OSError as e:
                    raise OnnxFormatError(f"{where}: cannot open its external data file ({e.strerror})") from None
                info = os.fstat(fd)
                handles[path] = (fd, info.st_size)
                if not stat.S_ISREG(info.st_mode):
                    raise OnnxFormatError(f"{where}: external data location {short_repr(location, 80)} is not a file")
            fd, size = handles[path]
            if length is None:
                length = size - offset
            if offset > size or length > size - offset:
                raise OnnxFormatError(
                    f"{where}: external data offset {offset} and length {length} go past the end of "
                    f"{short_repr(location, 80)} ({size} bytes); the data file does not belong to this model"
                )
            dtype = NUMPY_TYPES.get(t.data_type)
            need = None if dtype is None or any(d < 0 for d in t.dims) else math.prod(t.dims) * dtype.itemsize
            if need is not None and length != need:
                raise OnnxFormatError(
                    f"{where}: external data length {length} does not match its shape {short_repr(list(t.dims))} "
                    f"({need} bytes); the data file does not belong to this model"
                )
            total += length
            if total > max_bytes:
                raise OnnxFormatError(
                    f"the model's external data is larger than the {max_bytes} byte limit; prune a smaller model"
                )
            raw = os.pread(fd, length, offset)
            if len(raw) != length:
                raise OnnxFormatError(f"{where}: the external data file {short_repr(location, 80)} is too short")
            del t.external_data[:]
            t.data_location = TensorProto.DEFAULT
            t.raw_data = raw
    finally:
        for fd, _ in handles.values():
            os.close(fd)
    return total


def _default_opset(model: ModelProto) -> int:
    versions = {int(o.version) for o in model.opset_import if o.domain in DEFAULT_DOMAINS}
    lo, hi = OPSET_RANGE
    if not versions:
        raise OnnxFormatError(
            "the model imports no opset of the default ONNX domain; re-export it with torch.onnx.export(..., "
            "opset_version=17)"
        )
    if len(versions) > 1:
        raise OnnxFormatError(f"the model imports the default ONNX domain twice (opsets {sorted(versions)})")
    version = versions.pop()
    if not lo <= version <= hi:
        raise OnnxFormatError(
            f"ONNX opset {version} is not supported (accepted: {lo} to {hi}); re-export with "
            "torch.onnx.export(..., opset_version=17) or convert with "
            "onnx.version_converter.convert_version(model, 17)"
        )
    return version


def _check_nodes(model: ModelProto) -> None:
    graph = model.graph
    if not graph.node:
        raise OnnxFormatError("the ONNX graph has no nodes: there is nothing to convert or prune")
    custom: list[str] = []
    unknown: list[str] = []
    nested: list[str] = []
    for i, node in enumerate(graph.node):
        name = node.name or f"#{i}"
        if node.domain not in DEFAULT_DOMAINS:
            custom.append(f"{_plain(node.domain)}::{_plain(node.op_type)} (node {short_repr(name, 60)})")
        elif node.op_type not in SUPPORTED_OPS:
            unknown.append(f"{_plain(node.op_type)} (node {short_repr(name, 60)})")
        for a in node.attribute:
            if a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) or a.HasField("g") or len(a.graphs):
                nested.append(f"{_plain(node.op_type)} (node {short_repr(name, 60)})")
    supported = ", ".join(sorted(SUPPORTED_OPS))
    if custom:
        raise OnnxFormatError(
            f"operators from custom domains are not accepted: {_listing(custom)}; export with standard ONNX "
            f"operators only (supported: {supported})"
        )
    if unknown:
        raise OnnxFormatError(
            f"unsupported ONNX operator(s): {_listing(unknown)}; netsurgery converts only {supported}. Replace "
            "those layers with supported ones before exporting, or prune the model in PyTorch directly"
        )
    if nested:
        raise OnnxFormatError(f"subgraphs (control flow) are not accepted: {_listing(nested)}")


def _run_checker(model: ModelProto) -> None:
    try:
        onnx.checker.check_model(model)
    except Exception as e:  # ValidationError, or ValueError/RuntimeError from the C++ side
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OnnxFormatError(
            f"the ONNX checker rejected the model: {short_repr(first, 300)}; re-export it with a current "
            "torch.onnx.export, or repair it with the onnx tools (onnx.checker.check_model shows the problem)"
        ) from None


def _dtype_name(code: int) -> str:
    try:
        return str(TensorProto.DataType.Name(code))
    except ValueError:
        return f"type {code}"


def check_dtype(code: int, where: str) -> None:
    """Refuse an element type other than float32, int64 or int32 (:data:`NUMPY_TYPES`), saying why."""
    if code in NUMPY_TYPES:
        return
    name = _dtype_name(code)
    if name in _OTHER_FLOATS:
        raise OnnxFormatError(
            f"only float32 models are accepted: {where} is {name}; convert the model to float32 before exporting "
            "(model.float() in PyTorch)"
        )
    raise OnnxFormatError(
        f"{where} has element type {name}, which is not supported (float32 weights and int64/int32 shape constants "
        "only; quantized models are not accepted, export the float32 model)"
    )


def _check_types(graph: GraphProto) -> None:
    init_names = {t.name for t in graph.initializer}
    for kind, values in (("input", graph.input), ("output", graph.output)):
        for v in values:
            if v.name in init_names:
                continue
            if not v.type.HasField("tensor_type"):
                raise OnnxFormatError(f"graph {kind} {v.name!r} is not a tensor; only tensor inputs/outputs work")
            elem = v.type.tensor_type.elem_type
            if elem not in _IO_TYPES:
                raise OnnxFormatError(
                    f"graph {kind} {v.name!r} is {_dtype_name(elem)}; only float32 (and int64/int32/bool) inputs and "
                    "outputs are accepted (export the model with float32 example inputs)"
                )
    for t in graph.initializer:
        check_dtype(t.data_type, f"initializer {t.name!r}")
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                check_dtype(a.t.data_type, f"attribute {a.name!r} of {node.op_type} node {node.name!r}")


def validate_proto(model: ModelProto) -> int:
    """All checks on a parsed model (:exc:`OnnxFormatError` if one fails); the default-domain opset."""
    if model.ir_version <= 0 or not model.HasField("graph"):
        raise OnnxFormatError(f"this is not an ONNX model: it has no IR version or no graph; {EXPORT_HINT}")
    _refuse_bad_text(model)
    _refuse_external_data(model)  # before the C++ checker, which would look for the files
    if len(model.functions):
        names = [f.name for f in model.functions]
        raise OnnxFormatError(
            f"model-local functions are not accepted ({_listing(names)}); inline them before saving with "
            "onnx.inliner.inline_local_functions(model)"
        )
    if len(model.training_info):
        raise OnnxFormatError("ONNX training info is not accepted; save the inference model only")
    opset = _default_opset(model)
    _check_nodes(model)
    if len(model.graph.sparse_initializer):
        raise OnnxFormatError("sparse initializers are not accepted; store the weights as dense initializers")
    _run_checker(model)
    _check_types(model.graph)
    return opset


def validate_onnx(
    data: bytes | bytearray | memoryview | str | os.PathLike[str],
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    external_dir: str | os.PathLike[str] | None = None,
) -> ModelProto:
    """The parsed model if netsurgery accepts ``data`` (ONNX bytes or a path), else :class:`OnnxFormatError`.

    External data is refused unless ``external_dir`` names the folder that holds the data files: then
    each tensor's bytes are read from there (:func:`resolve_external_data`, at most ``max_bytes``) into
    the returned proto. Without it a path is read as bytes only: nothing next to it is ever opened.
    """
    model = parse_onnx(data, max_bytes=max_bytes)
    if external_dir is not None:
        resolve_external_data(model, external_dir, max_bytes=max_bytes)
    validate_proto(model)
    return model


def parse_onnx(
    data: bytes | bytearray | memoryview | str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES
) -> ModelProto:
    """``data`` (ONNX bytes or a path) read under the size cap, sniffed and parsed, not yet validated."""
    raw = _read(data, max_bytes)
    _sniff(raw)
    return _parse(raw)
