"""Receiving uploads: a multipart body streamed to temporary files under a byte cap.

FastAPI's ``UploadFile`` spools the whole body before the route runs; here the body is read from
``request.stream()`` chunk by chunk and fed to python-multipart's streaming parser, whose callbacks
write each file part to its own temporary file while hashing it. So:

- a ``Content-Length`` above the cap is refused (413) before a byte of the body is read;
- a body without one (chunked), or one that turns out longer than declared, is refused as soon as
  the running count passes the cap: reading stops there;
- the caller owns the temporary folder and removes it whatever happens (:func:`upload_folder`).

Nothing here looks at what the files contain; :mod:`api.inspect` does, once the body is complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Final

from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from api.errors import BadRequest, InvalidRequest, PayloadTooLarge, UnsupportedFormat

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

log = logging.getLogger(__name__)

#: Room for boundaries, part headers and the text fields on top of the file bytes.
FORM_OVERHEAD: Final = 64 * 1024
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
    files: dict[str, ReceivedFile] = field(default_factory=dict)
    fields: dict[str, str] = field(default_factory=dict)


def too_large(limit: int, what: str = "the upload") -> PayloadTooLarge:
    return PayloadTooLarge(f"{what} is larger than the {limit:,}-byte limit", headers=_CLOSE)


def check_declared_length(request: Request, limit: int, what: str = "the upload") -> None:
    """413 before reading when ``Content-Length`` already says the body is over ``limit``."""
    declared = request.headers.get("content-length")
    if declared is None:
        return
    try:
        size = int(declared)
    except ValueError:
        raise BadRequest(f"bad Content-Length {declared[:40]!r}") from None
    if size > limit:
        raise too_large(limit, what)


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
        self, folder: Path, file_fields: Collection[str], text_fields: Collection[str], max_file_bytes: int
    ) -> None:
        self.folder = folder
        self.file_fields = frozenset(file_fields)
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
        if self._name in self.form.files or self._name in self.form.fields:
            raise InvalidRequest(f"form field {self._name!r} is given twice")
        if self._name in self.file_fields:
            # each file part in its own sub-folder, under a tame form of the client's file name (which
            # then names the file in error messages); the client's name never becomes a path
            part_dir = self.folder / f"part-{len(self.form.files)}"
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
            self.form.files[self._name] = ReceivedFile(
                self._name, self._filename, path, self._size, self._hash.hexdigest()
            )
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
    check_declared_length(request, body_limit)
    sink = _FormSink(folder, file_fields, text_fields, max_file_bytes)
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
