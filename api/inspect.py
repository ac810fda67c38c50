"""What an uploaded file is, judged by its content, and whether the service accepts it.

Nothing here unpickles, imports or runs what it reads, and no model is loaded:

- every file is first classified by :func:`dns_core.uploads.sniff` (pickles, ``torch.save`` and
  TorchScript archives, ``.pt2`` and ``torch.package`` are refused there);
- an ONNX graph is parsed from bytes and checked by :func:`dns_core.onnx_io.validate_onnx`
  (external data is never resolved); its parameter count is the number of elements of its float
  initializers;
- a safetensors file has only its header read (:func:`dns_core.uploads.validate_safetensors`);
  its tensor names, shapes and dtypes are compared with the zoo architecture built on the
  ``meta`` device (shapes only, no memory, no weights);
- a data file is read by :func:`dns_core.data.load_data_file` (``allow_pickle=False``, archive
  checks first).

Errors come out as :mod:`api.errors` classes: a refused format is a 415, a file past a cap a 413,
a malformed file or one that does not fit its architecture a 422 (``invalid_file``), and a wrong
``architecture`` or ``config`` value a 422 (``invalid_request``).

ONNX refusals are split by what the client must do: a file that is not ONNX at all, or ONNX
with external data (a format we never read: the weights live in other files), is a 415; every
other ``OnnxFormatError`` (unsupported operator, opset, dtype, failed checker …) is a 422.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import torch
from onnx import TensorProto

from api.errors import AppError, InvalidFile, InvalidRequest, PayloadTooLarge, UnsupportedFormat
from dns_core import models, uploads
from dns_core.data import DataError, load_data_file
from dns_core.onnx_io import OnnxFormatError, validate_onnx

#: Header metadata that :func:`dns_core.io.save_model` writes.
ARCH_KEY: Final = "netsurgery.arch"
CONFIG_KEY: Final = "netsurgery.config"
_FLOAT_DTYPES: Final = frozenset({"F64", "F32", "F16", "BF16"})
# OnnxFormatError messages that mean "this format is refused", not "this ONNX file is wrong"
_ONNX_REFUSALS: Final = ("this is not an ONNX model", "ONNX with external data is not accepted")
_MAX_LISTED: Final = 20


@dataclass(frozen=True, slots=True)
class ModelFacts:
    format: str
    parameter_count: int
    architecture: str | None = None
    config: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class DatasetFacts:
    kind: str
    n_examples: int
    input_shape: list[int]
    has_targets: bool


def upload_error(e: uploads.UploadError) -> AppError:
    """The HTTP error for a ``dns_core.uploads`` refusal."""
    if isinstance(e, uploads.RefusedFormat):
        return UnsupportedFormat(str(e))
    if isinstance(e, uploads.FileTooLarge):
        return PayloadTooLarge(str(e))
    return InvalidFile(str(e))


def _sniff(path: Path, max_bytes: int) -> str:
    try:
        return uploads.sniff(path, max_bytes=max_bytes).kind
    except uploads.UploadError as e:
        raise upload_error(e) from None


# ------------------------------------------------------------------------------------------ models


def inspect_model(
    path: Path, *, max_bytes: int, architecture: str | None = None, config_text: str | None = None
) -> ModelFacts:
    """Accept or refuse an uploaded model file; what it is if accepted.

    ``architecture`` (a zoo name) and ``config_text`` (a JSON object) apply to safetensors weights;
    when left out they are read from the file's header (``netsurgery.arch``/``netsurgery.config``,
    as :func:`dns_core.io.save_model` writes them).
    """
    kind = _sniff(path, max_bytes)
    if kind == "onnx":
        if architecture or config_text:
            raise InvalidRequest("architecture and config go with safetensors weights; an ONNX file is the whole model")
        return _inspect_onnx(path, max_bytes)
    if kind == "safetensors":
        return _inspect_safetensors(path, max_bytes, architecture, config_text)
    raise UnsupportedFormat(
        f"this is {kind} data, not a model; upload a model as ONNX, or as safetensors weights of a built-in "
        "architecture (upload data sets to /v1/datasets)"
    )


def _inspect_onnx(path: Path, max_bytes: int) -> ModelFacts:
    try:
        model = validate_onnx(path, max_bytes=max_bytes)
    except OnnxFormatError as e:
        message = str(e)
        if message.startswith(_ONNX_REFUSALS):
            raise UnsupportedFormat(message) from None
        raise InvalidFile(message) from None
    count = sum(math.prod(t.dims) for t in model.graph.initializer if t.data_type == TensorProto.FLOAT)
    return ModelFacts("onnx", count)


def _config(
    header: uploads.SafetensorsHeader, architecture: str | None, config_text: str | None
) -> tuple[str, dict[str, Any]]:
    """The architecture and raw config: the form's, else the file header's."""
    header_arch = header.metadata.get(ARCH_KEY)
    arch = architecture or header_arch
    if not arch:
        raise InvalidRequest(
            "safetensors weights need an architecture: send the form field 'architecture' "
            f"({', '.join(sorted(models.ZOO))})"
        )
    if config_text is not None and config_text.strip():
        source, text = "the form field 'config'", config_text
    elif arch == header_arch and CONFIG_KEY in header.metadata:
        source, text = f"the file's {CONFIG_KEY} header", header.metadata[CONFIG_KEY]
    else:
        return arch, {}
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidRequest(f"{source} is not JSON: {e}") from None
    if not isinstance(config, dict):
        raise InvalidRequest(f"{source} must be a JSON object, got {type(config).__name__}")
    return arch, config


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown if len(items) <= _MAX_LISTED else f"{shown} and {len(items) - _MAX_LISTED} more"


def _inspect_safetensors(path: Path, max_bytes: int, architecture: str | None, config_text: str | None) -> ModelFacts:
    try:
        header = uploads.validate_safetensors(path, max_bytes=max_bytes)
    except uploads.UploadError as e:
        raise upload_error(e) from None
    arch, raw = _config(header, architecture, config_text)
    try:
        config = models.check_config(arch, raw)
    except ValueError as e:
        raise InvalidRequest(str(e)) from None
    with torch.device("meta"):  # shapes only: nothing is allocated, nothing is loaded
        module = models.build(arch, **config)
    want = {k: (tuple(v.shape), v.is_floating_point()) for k, v in module.state_dict().items()}
    got = header.tensors
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    wrong: list[str] = []
    for key in sorted(set(want) & set(got)):
        (shape, floating), (dtype, got_shape) = want[key], got[key]
        if shape != got_shape:
            wrong.append(f"{key}: expected {list(shape)}, got {list(got_shape)}")
        elif floating and dtype not in _FLOAT_DTYPES:
            wrong.append(f"{key}: expected floating-point values, got {dtype}")
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected {_listing(unexpected)}")
        if wrong:
            parts.append(f"mis-shaped {_listing(wrong)}")
        raise InvalidFile(f"the weights do not match {arch} with config {raw}: " + " | ".join(parts))
    stored = json.loads(json.dumps(config))  # tuples (vgg widths) as JSON lists
    return ModelFacts("safetensors", models.count_parameters(module), arch, stored)


# ---------------------------------------------------------------------------------------- datasets


def inspect_dataset(path: Path, targets: Path | None, *, max_bytes: int) -> DatasetFacts:
    """Accept or refuse an uploaded data file (and IDX targets); its kind, size and example shape.

    The file is read in full (safely: no pickle) to know the count and shape for certain.
    """
    kind = _sniff(path, max_bytes)
    if kind == "onnx":
        raise UnsupportedFormat("this is an ONNX model, not data; upload data as .npz, safetensors or IDX")
    if targets is not None and kind != "idx":
        raise InvalidRequest(f"a separate 'targets' file goes with IDX inputs only; this is {kind}")
    try:
        data = load_data_file(path, targets, max_bytes=max_bytes)
    except uploads.UploadError as e:
        raise upload_error(e) from None
    except DataError as e:
        raise InvalidFile(str(e)) from None
    return DatasetFacts(kind, len(data), [int(d) for d in data.inputs.shape[1:]], data.targets is not None)
