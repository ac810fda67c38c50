"""Receiving uploads: a multipart body streamed to temporary files under a byte cap, then judged by content.

**Receiving.** FastAPI's ``UploadFile`` spools the whole body before the route runs; here the body
is read from ``request.stream()`` chunk by chunk and fed to python-multipart's streaming parser,
whose callbacks write each file part to its own temporary file while hashing it. So:

- a ``Content-Length`` above the cap is refused (413) before a byte of the body is read;
- a body without one (chunked), or one that turns out longer than declared, is refused as soon as
  the running count passes the cap: reading stops there;
- the caller owns the temporary folder and removes it whatever happens (:func:`upload_folder`).

**Inspecting.** What an uploaded file is, judged by its content once the body is complete, and
whether the service accepts it. Nothing here unpickles, imports or runs what it reads, and no
model is loaded:

- every file is first classified by :func:`dns_core.uploads.sniff` (pickles, ``torch.save`` and
  TorchScript archives, ``.pt2`` and ``torch.package`` are refused there);
- an ONNX graph goes through :func:`dns_core.onnx_convert.check_onnx` (validation, external data
  read only from the files of the same upload, conversion, memory estimate, a trial run); its
  parameter count is that of the converted module;
- a safetensors file has only its header read (:func:`dns_core.uploads.validate_safetensors`);
  its tensor names, shapes and dtypes are compared with the zoo architecture built on the
  ``meta`` device (shapes only, no memory, no weights);
- every accepted model has the FLOPs of one example's forward pass recorded
  (:mod:`dns_core.cost`, on the meta model or during the ONNX trial run; None when they cannot be
  counted), from which a CPU-only deployment estimates a job's time at submit;
- a data file is read by :func:`dns_core.data.load_data_file` (``allow_pickle=False``, archive
  checks first).

Errors come out as :mod:`service.errors` classes: a refused format is a 415, a file past a cap a
413, a malformed file or one that does not fit its architecture a 422 (``invalid_file``), and a
wrong ``architecture`` or ``config`` value a 422 (``invalid_request``).

ONNX refusals are split by what the client must do: a file that is not ONNX at all is a 415;
every other ``OnnxFormatError`` (unsupported operator, opset, dtype, failed checker, external data
not among the uploaded files, a trial run that fails …) is a 422.

**Together.** :func:`receive_model` and :func:`receive_dataset` do both for the upload routes,
with the tenant's stored-bytes quota checked before the body is read and again once it is in.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final

import torch
from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from dns_core import archives, bundles, cost, models, named, uploads
from dns_core.data import DataError, load_data_file
from dns_core.hf import inspect_hf_folder
from dns_core.onnx_convert import check_onnx
from dns_core.onnx_validate import OnnxFormatError
from dns_core.surgery import prunable_layers
from service.errors import (
    AppError,
    BadRequest,
    InvalidFile,
    InvalidRequest,
    PayloadTooLarge,
    UnsupportedFormat,
)
from service.orm import NAME_LENGTH
from service.quotas import check_storage_quota
from service.repositories.datasets import DatasetFacts
from service.repositories.models import ModelFacts
from service.settings import Settings
from service.usecases import StagedFile
from service.usecases.datasets import DatasetUpload
from service.usecases.models import ModelUpload

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

log = logging.getLogger(__name__)

#: Room for boundaries, part headers and the text fields on top of the file bytes.
FORM_OVERHEAD: Final = 64 * 1024
#: Most file parts in one form (a Hugging Face folder is a handful of files; more come as an archive).
MAX_FILE_PARTS: Final = 32
#: Largest text field (``name``, ``architecture``, ``config``).
MAX_TEXT_FIELD: Final = 32 * 1024
#: Body bytes gathered before a (blocking) parse-and-write step is handed to a worker thread.
FLUSH_BYTES: Final = 1 << 20
#: Upload folders older than this are left over from a crashed process and removed at start-up.
STALE_SECONDS: Final = 24 * 3600
# a 413 sent before the body was read: the rest of the body is never read, so the connection closes
_CLOSE: Final = {"Connection": "close"}


@dataclass(frozen=True, slots=True)
class ReceivedFile:
    """A file part, complete on disk."""

    field: str
    filename: str | None
    path: Path
    size: int
    sha256: str


@dataclass(slots=True)
class ReceivedForm:
    files: dict[str, ReceivedFile] = field(default_factory=dict)  # the first file part of each field
    fields: dict[str, str] = field(default_factory=dict)
    parts: list[ReceivedFile] = field(default_factory=list)  # every file part, in order

    def all(self, name: str) -> list[ReceivedFile]:
        """Every file part of field ``name`` (a field listed as repeatable may come several times)."""
        return [p for p in self.parts if p.field == name]


def too_large(limit: int, what: str = "the upload") -> PayloadTooLarge:
    return PayloadTooLarge(f"{what} is larger than the {limit:,}-byte limit", headers=_CLOSE)


def check_declared_length(request: Request, limit: int, what: str = "the upload", *, cap: int | None = None) -> None:
    """413 before reading when ``Content-Length`` already says the body is over ``limit``; the message quotes
    ``cap`` (the limit the user knows, such as the file cap of a form whose body may be a little larger)."""
    declared = request.headers.get("content-length")
    if declared is None:
        return
    try:
        size = int(declared)
    except ValueError:
        raise BadRequest(f"bad Content-Length {declared[:40]!r}") from None
    if size > limit:
        raise too_large(limit if cap is None else cap, what)


def multipart_boundary(request: Request) -> bytes | None:
    """The boundary of a ``multipart/form-data`` request; None for any other content type."""
    ctype, params = parse_options_header(request.headers.get("content-type"))
    if ctype != b"multipart/form-data":
        return None
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadRequest("multipart/form-data without a boundary")
    return boundary


class _FormSink:
    """python-multipart callbacks: each file part to its own file (hashed), text parts to memory.

    Runs in a worker thread, one ``write`` at a time.
    """

    def __init__(
        self,
        folder: Path,
        file_fields: Collection[str],
        text_fields: Collection[str],
        max_file_bytes: int,
        repeatable: Collection[str] = (),
    ) -> None:
        self.folder = folder
        self.file_fields = frozenset(file_fields)
        self.repeatable = frozenset(repeatable)
        self.text_fields = frozenset(text_fields)
        self.max_file_bytes = max_file_bytes
        self.form = ReceivedForm()
        self.complete = False
        self._file_bytes = 0
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, str] = {}
        self._name: str | None = None
        self._filename: str | None = None
        self._out: IO[bytes] | None = None
        self._hash = hashlib.sha256()
        self._size = 0
        self._text = bytearray()

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_val,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._headers = {}
        self._name = self._filename = None

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_val(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header_name.decode("latin-1").strip().lower()] = self._header_value.decode("latin-1")
        self._header_name.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        disposition, params = parse_options_header(self._headers.get("content-disposition"))
        name = params.get(b"name")
        if disposition != b"form-data" or name is None:
            raise BadRequest("a multipart part without 'Content-Disposition: form-data; name=…'")
        self._name = name.decode("utf-8", "replace")
        raw_filename = params.get(b"filename")
        self._filename = raw_filename.decode("utf-8", "replace") if raw_filename is not None else None
        if (self._name in self.form.files and self._name not in self.repeatable) or self._name in self.form.fields:
            raise InvalidRequest(f"form field {self._name!r} is given twice")
        if len(self.form.parts) >= MAX_FILE_PARTS:
            raise InvalidRequest(f"more than {MAX_FILE_PARTS} files in one upload; send a zip or tar instead")
        if self._name in self.file_fields:
            # each file part in its own sub-folder, under a tame form of the client's file name (which
            # then names the file in error messages); the client's name never becomes a path
            part_dir = self.folder / f"part-{len(self.form.parts)}"
            part_dir.mkdir()
            self._out = open(part_dir / _tame(self._filename, self._name), "xb")  # noqa: SIM115 (closed in _part_end/close)
            self._hash = hashlib.sha256()
            self._size = 0
        elif self._name in self.text_fields:
            self._text.clear()
        else:
            expected = ", ".join(sorted(self.file_fields | self.text_fields))
            raise InvalidRequest(f"unexpected form field {self._name!r}; this route takes {expected}")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._out is not None:
            self._file_bytes += len(chunk)
            if self._file_bytes > self.max_file_bytes:
                raise too_large(self.max_file_bytes)
            self._out.write(chunk)
            self._hash.update(chunk)
            self._size += len(chunk)
        else:
            self._text += chunk
            if len(self._text) > MAX_TEXT_FIELD:
                raise InvalidRequest(f"form field {self._name!r} is longer than {MAX_TEXT_FIELD:,} bytes")

    def _part_end(self) -> None:
        assert self._name is not None
        if self._out is not None:
            path = Path(self._out.name)
            self._out.close()
            self._out = None
            received = ReceivedFile(self._name, self._filename, path, self._size, self._hash.hexdigest())
            self.form.files.setdefault(self._name, received)
            self.form.parts.append(received)
        else:
            try:
                self.form.fields[self._name] = self._text.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidRequest(f"form field {self._name!r} is not UTF-8 text") from None

    def _end(self) -> None:
        self.complete = True

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None


def _tame(filename: str | None, fallback: str) -> str:
    """A file name safe to create: the last path component, limited characters and length."""
    base = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    tame = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "_" for c in base)[-100:].lstrip(".")
    return tame or fallback


def _feed(parser: MultipartParser, data: bytes) -> None:
    try:
        parser.write(data)
    except FormParserError as e:
        raise BadRequest(f"malformed multipart body: {e}") from None


async def receive_form(
    request: Request,
    folder: Path,
    *,
    max_file_bytes: int,
    file_fields: Collection[str],
    text_fields: Collection[str] = (),
    repeatable: Collection[str] = (),
) -> ReceivedForm:
    """Stream the request's ``multipart/form-data`` body into ``folder``; the form once it is complete.

    The file parts together may hold ``max_file_bytes``; the body as a whole ``FORM_OVERHEAD``
    more. Raises :class:`PayloadTooLarge` (413) the moment either is passed, :class:`BadRequest`
    for a malformed or truncated body, :class:`InvalidRequest` for unknown or repeated fields.
    Files already written stay in ``folder`` for the caller to remove.
    """
    boundary = multipart_boundary(request)
    if boundary is None:
        raise UnsupportedFormat("send the upload as multipart/form-data")
    body_limit = max_file_bytes + FORM_OVERHEAD
    check_declared_length(request, body_limit, cap=max_file_bytes)  # one figure in every 413: the file cap
    sink = _FormSink(folder, file_fields, text_fields, max_file_bytes, repeatable)
    try:
        parser = MultipartParser(boundary, sink.callbacks())
    except FormParserError as e:
        raise BadRequest(f"bad multipart boundary: {e}") from None
    received = 0
    pending = bytearray()
    try:
        async for chunk in _body(request):
            received += len(chunk)
            if received > body_limit:
                raise too_large(max_file_bytes)
            pending += chunk
            if len(pending) >= FLUSH_BYTES:
                await run_in_threadpool(_feed, parser, bytes(pending))
                pending.clear()
        if pending:
            await run_in_threadpool(_feed, parser, bytes(pending))
        parser.finalize()
    finally:
        sink.close()
    if not sink.complete:
        raise BadRequest("the multipart body ended before its closing boundary (truncated upload?)")
    return sink.form


async def read_small_body(request: Request, limit: int) -> bytes:
    """The whole body of a small (JSON) request, refusing more than ``limit`` bytes."""
    check_declared_length(request, limit, "the request body")
    body = bytearray()
    async for chunk in _body(request):
        body += chunk
        if len(body) > limit:
            raise too_large(limit, "the request body")
    return bytes(body)


async def _body(request: Request) -> AsyncIterator[bytes]:
    try:
        async for chunk in request.stream():
            if chunk:
                yield chunk
    except ClientDisconnect:
        raise BadRequest("the client disconnected before the body was complete") from None


@contextlib.contextmanager
def upload_folder(root: Path, prefix: str) -> Iterator[Path]:
    """A fresh private folder under ``root`` for one request's upload, removed with all it holds on exit."""
    root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def remove_stale(root: Path, older_than: float = STALE_SECONDS) -> None:
    """Remove upload folders a crashed process left under ``root`` (only old ones: siblings may be uploading)."""
    if not root.is_dir():
        return
    cutoff = time.time() - older_than
    for entry in root.iterdir():
        try:
            if entry.stat().st_mtime < cutoff:
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink()
        except OSError as e:  # pragma: no cover (a sibling removed it first)
            log.debug("could not remove stale upload %s: %s", entry, e)


# ---------------------------------------------------------------------------------------- inspecting

#: Header metadata that :func:`dns_core.io.save_model` writes.
ARCH_KEY: Final = "netsurgery.arch"
CONFIG_KEY: Final = "netsurgery.config"
# the OnnxFormatError message that means "this is not ONNX at all", not "this ONNX file is wrong" (uploads always
# give the graph a folder, so external data is never refused as a format here: a missing data file is a 422)
_ONNX_REFUSALS: Final = ("this is not an ONNX model",)


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


@dataclass(frozen=True, slots=True)
class InspectedModel:
    """An accepted model: what it is, and the one file to store (the upload, or a bundle of its files)."""

    facts: ModelFacts
    file: StagedFile
    suffix: str  # the stored file's extension: onnx, safetensors or zip


@dataclass(frozen=True, slots=True)
class Bundle:
    """A zip the service wrote (a multi-file model's kept files), with its size and sha256."""

    path: Path
    size: int
    sha256: str

    @classmethod
    def of(cls, path: Path) -> Bundle:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return cls(path, path.stat().st_size, h.hexdigest())


def inspect_model(
    parts: list[ReceivedFile],
    work: Path,
    *,
    max_bytes: int,
    max_memory_bytes: int,
    architecture: str | None = None,
    config_text: str | None = None,
) -> InspectedModel:
    """Accept or refuse an uploaded model; what it is if accepted, and the file to store.

    One file: an ONNX graph, safetensors weights (``architecture``, a built-in or a torchvision/timm
    name, and ``config_text``, a JSON object, apply to those; when left out they are read from the
    file's header, as :func:`dns_core.io.save_model` writes them), or a zip/tar of a model folder.
    Several files: the files of one model folder (a Hugging Face folder, or ``model.onnx`` with its
    external data). A folder's kept files are stored as one zip bundle (:mod:`dns_core.bundles`).
    ``work`` is a scratch folder of the request's.
    """
    if len(parts) == 1 and _tame(parts[0].filename, "") != bundles.HF_CONFIG:  # a lone config.json: a folder
        path = parts[0].path
        kind = _sniff(path, max_bytes)
        if kind == "onnx":
            if architecture or config_text:
                raise InvalidRequest(
                    "architecture and config go with safetensors weights; an ONNX file is the whole model"
                )
            # the part's own folder holds nothing else: external data the graph names is missing, and said so
            facts = _inspect_onnx(path, max_bytes, max_memory_bytes, path.parent)
            return InspectedModel(facts, parts[0], "onnx")
        if kind == "safetensors":
            return InspectedModel(
                _inspect_safetensors(path, max_bytes, architecture, config_text), parts[0], "safetensors"
            )
        if kind not in ("zip", "tar"):
            raise UnsupportedFormat(
                f"this is {kind} data, not a model; upload a model as ONNX, safetensors weights of a built-in, "
                "torchvision or timm architecture, or a Hugging Face folder (upload data sets to /v1/datasets)"
            )
    if architecture or config_text:
        raise InvalidRequest(
            "architecture and config go with safetensors weights alone; a model folder describes itself"
        )
    folder = _model_folder(parts, work / "model", max_bytes)
    if folder.kind == "hf":
        facts = _inspect_hf(folder.root, max_memory_bytes)
    else:
        facts = _inspect_onnx(folder.main, max_bytes, max_memory_bytes, folder.root)
    return InspectedModel(facts, Bundle.of(bundles.write_bundle(folder, work / "bundle.zip")), "zip")


def _model_folder(parts: list[ReceivedFile], dest: Path, max_bytes: int) -> bundles.ModelFolder:
    """The uploaded files as one model folder: an archive extracted, or several files side by side."""
    dest.mkdir()
    try:
        if len(parts) == 1 and archives.archive_kind(parts[0].path) is not None:
            archives.extract_archive(parts[0].path, dest, max_expanded=max_bytes)
        else:
            for part in parts:
                name = _tame(part.filename, "")
                if not name:
                    raise InvalidRequest("each file of a model folder needs its file name (config.json, …)")
                if (dest / name).exists():
                    raise InvalidRequest(f"the file {name!r} is given twice")
                shutil.move(part.path, dest / name)
        return bundles.classify_folder(dest)
    except uploads.UploadError as e:
        raise upload_error(e) from None


def _inspect_hf(root: Path, max_memory_bytes: int) -> ModelFacts:
    try:
        facts = inspect_hf_folder(root, max_bytes=max_memory_bytes)
    except uploads.UploadError as e:
        raise upload_error(e) from None
    except ValueError as e:  # ModelError: refused architecture, remote code, too large, mismatched weights
        raise InvalidFile(str(e)) from None
    return ModelFacts("hf", facts.num_parameters, facts.architecture, None, facts.flops_per_example, list(facts.layers))


def _inspect_onnx(path: Path, max_bytes: int, max_memory_bytes: int, external_dir: Path | None) -> ModelFacts:
    """Everything a job would do with the graph at its start (validate, convert, a trial run), done now."""
    try:
        facts = check_onnx(path, max_bytes=max_bytes, max_memory_bytes=max_memory_bytes, external_dir=external_dir)
    except OnnxFormatError as e:
        message = str(e)
        if message.startswith(_ONNX_REFUSALS):
            raise UnsupportedFormat(message) from None
        raise InvalidFile(message) from None
    except ValueError as e:  # too large for the worker's memory (a ModelError)
        raise InvalidFile(str(e)) from None
    layers = [name for name, _ in prunable_layers(facts.module)]
    return ModelFacts("onnx", facts.num_parameters, flops_per_example=facts.flops_per_example, layers=layers)


def _config(
    header: uploads.SafetensorsHeader, architecture: str | None, config_text: str | None
) -> tuple[str, dict[str, Any]]:
    """The architecture and raw config: the form's, else the file header's."""
    header_arch = header.metadata.get(ARCH_KEY)
    arch = architecture or header_arch
    if not arch:
        raise InvalidRequest(
            "safetensors weights need an architecture: send the form field 'architecture' "
            f"(built-in: {', '.join(sorted(models.ZOO))}; or torchvision:<name>, timm:<name>)"
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
    try:
        named.compare_state(named.state_shapes(module), header, what=f"{arch} with config {raw}")
    except ValueError as e:
        raise InvalidFile(str(e)) from None
    stored = json.loads(json.dumps(config))  # tuples (vgg widths) as JSON lists
    # one example's forward pass, counted on shapes alone (eval mode: batch norm takes a batch of one)
    flops = cost.forward_flops(module.eval(), cost.meta_example(models.model_input(arch, config)))
    layers = [name for name, _ in prunable_layers(module)]
    return ModelFacts("safetensors", models.count_parameters(module), arch, stored, flops, layers)


# ---------------------------------------------------------------------------------------- datasets


def inspect_dataset(path: Path, targets: Path | None, *, max_bytes: int) -> DatasetFacts:
    """Accept or refuse an uploaded data file (and IDX targets); its kind, size and example shape.

    The file is read in full (safely: no pickle) to know the count and shape for certain.
    """
    kind = _sniff(path, max_bytes)
    if kind == "onnx":
        raise UnsupportedFormat(
            "this is an ONNX model, not data; upload data as .npz, safetensors, IDX, or a zip/tar of class folders"
        )
    if targets is not None and kind != "idx":
        raise InvalidRequest(f"a separate 'targets' file goes with IDX inputs only; this is {kind}")
    try:
        data = load_data_file(path, targets, max_bytes=max_bytes)
    except uploads.UploadError as e:
        raise upload_error(e) from None
    except DataError as e:
        raise InvalidFile(str(e)) from None
    stored = "images" if kind in ("zip", "tar") else kind  # class folders of PNG/JPEG files
    return DatasetFacts(stored, len(data), [int(d) for d in data.inputs.shape[1:]], data.targets is not None)


# ------------------------------------------------------------------------------ the upload routes


def display_name(given: str | None, filename: str | None, default: str) -> str:
    """The resource's name: the form's ``name``, else the uploaded file's name (cut to 255), else ``default``."""
    if given is not None and given.strip():
        name = given.strip()
        if len(name) > NAME_LENGTH:
            raise InvalidRequest(f"name is longer than {NAME_LENGTH} characters ({len(name)})")
        return name
    if filename and Path(filename).name.strip():
        return Path(filename).name.strip()[:NAME_LENGTH]
    return default


async def check_upload_quota(
    request: Request, session: Session, settings: Settings, tenant_id: uuid.UUID, form: ReceivedForm | None = None
) -> None:
    """The tenant's stored-bytes quota for an upload (429 ``quota_exceeded`` past it).

    Without ``form``, before the body is read: from ``Content-Length`` less the room a form takes
    around its files (:data:`FORM_OVERHEAD`), so only an upload that is over for certain is refused
    unread; a chunked body, or a length over the upload cap (a 413 follows), is left to the check
    after it. With ``form``, once the body is received: from its files' sizes, before anything is
    stored.
    """
    if settings.max_stored_bytes_per_tenant <= 0:
        return
    if form is None:
        declared = request.headers.get("content-length", "")
        if not (declared.isascii() and declared.isdigit()):
            return
        if int(declared) > settings.max_upload_bytes + FORM_OVERHEAD:
            return
        incoming = max(0, int(declared) - FORM_OVERHEAD)
    else:
        incoming = sum(f.size for f in form.files.values())
    await run_in_threadpool(check_storage_quota, session, settings, tenant_id, incoming, body_unread=form is None)


async def _receive_within_quota(
    request: Request,
    session: Session,
    settings: Settings,
    tenant_id: uuid.UUID,
    folder: Path,
    file_fields: tuple[str, ...],
    text_fields: tuple[str, ...],
    what: str,
    repeatable: tuple[str, ...] = (),
) -> tuple[ReceivedForm, ReceivedFile]:
    """The form and its required ``file`` (``what``), with the quota checked before and after reading it."""
    await check_upload_quota(request, session, settings, tenant_id)
    form = await receive_form(
        request,
        folder,
        max_file_bytes=settings.max_upload_bytes,
        file_fields=file_fields,
        text_fields=text_fields,
        repeatable=repeatable,
    )
    await check_upload_quota(request, session, settings, tenant_id, form)
    upload = form.files.get("file")
    if upload is None:
        raise InvalidRequest(f"the form field 'file' ({what}) is required")
    return form, upload


async def receive_model(
    request: Request, session: Session, settings: Settings, tenant_id: uuid.UUID, folder: Path
) -> ModelUpload:
    """Receive a model upload into ``folder`` (``file``, repeatable; ``name``, ``architecture``,
    ``config``) and judge it."""
    fields = ("name", "architecture", "config")
    form, upload = await _receive_within_quota(
        request, session, settings, tenant_id, folder, ("file",), fields, "the model", repeatable=("file",)
    )
    parts = form.all("file")
    default = "model" if len(parts) == 1 else _folder_name(parts)
    name = display_name(form.fields.get("name"), upload.filename if len(parts) == 1 else None, default)
    inspected = await run_in_threadpool(
        inspect_model,
        parts,
        folder,
        max_bytes=settings.max_upload_bytes,
        max_memory_bytes=settings.max_model_memory_bytes,
        architecture=(form.fields.get("architecture") or "").strip() or None,
        config_text=form.fields.get("config"),
    )
    return ModelUpload(inspected.file, name, inspected.facts, inspected.suffix)


def _folder_name(parts: list[ReceivedFile]) -> str:
    """A name for a model sent as several files: its main file's name."""
    names = [Path(p.filename or "").name for p in parts]
    for main in ("config.json", *[n for n in names if n.endswith(".onnx")]):
        if main in names:
            return main
    return "model"


async def receive_dataset(
    request: Request, session: Session, settings: Settings, tenant_id: uuid.UUID, folder: Path
) -> DatasetUpload:
    """Receive a data set upload into ``folder`` (``file``, optional ``targets`` and ``name``) and judge it."""
    files = ("file", "targets")
    form, inputs = await _receive_within_quota(
        request, session, settings, tenant_id, folder, files, ("name",), "the inputs"
    )
    targets = form.files.get("targets")
    name = display_name(form.fields.get("name"), inputs.filename, "data")  # refused before the files are read
    facts = await run_in_threadpool(
        inspect_dataset, inputs.path, targets.path if targets else None, max_bytes=settings.max_upload_bytes
    )
    return DatasetUpload(inputs, targets, name, facts)
