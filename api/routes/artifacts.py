"""``/v1/jobs/{id}/artifacts``: what a job produced, and downloads streamed from storage.

Downloads carry ``ETag: "<sha256>"`` (``If-None-Match`` → 304), ``Accept-Ranges: bytes`` and
honour one ``Range: bytes=a-b`` (also ``a-`` and ``-n``) with a 206 and ``Content-Range``; a
range wholly past the end is a 416. A header with several ranges, another unit or bad syntax is
ignored and the whole file sent (RFC 9110 §14.2), as is a ``Range`` whose ``If-Range`` names
another version. ``artifacts.uri`` is the storage key the worker wrote.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from typing import IO, Annotated, Final

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import StreamingResponse

from api.deps import SessionDep, StorageDep, TenantDep
from api.metrics import metrics_of
from api.routes.common import responses
from api.schemas import ArtifactList, ArtifactRead
from service.errors import NotFound, RangeNotSatisfiable
from service.repositories import jobs as repository
from service.storage import StorageError
from service.usecases.jobs import get_job

log = logging.getLogger(__name__)

router = APIRouter(prefix="/jobs/{job_id}/artifacts", tags=["artifacts"])

CHUNK: Final = 1 << 20
_MEDIA_TYPES: Final = {".json": "application/json", ".onnx": "application/octet-stream"}


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """The one byte range ``(first, last)`` (inclusive) that ``header`` asks for within ``size`` bytes.

    None means "ignore the header, send everything"; :class:`RangeNotSatisfiable` that no byte asked
    for exists.
    """
    unit, eq, spec = header.partition("=")
    spec = spec.strip()
    if not eq or unit.strip().lower() != "bytes" or not spec or "," in spec:
        return None
    first, dash, last = spec.partition("-")
    first, last = first.strip(), last.strip()
    if not dash or not (first or last) or not all(_digits(part) for part in (first, last) if part):
        return None
    unsatisfiable = RangeNotSatisfiable(
        f"range {spec!r} is outside the file's {size} bytes", headers={"Content-Range": f"bytes */{size}"}
    )
    if not first:  # the last n bytes
        n = int(last)
        if n == 0 or size == 0:
            raise unsatisfiable
        return max(0, size - n), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:  # syntactically invalid: ignored
        return None
    if start >= size:
        raise unsatisfiable
    return start, min(end, size - 1)


def _digits(text: str) -> bool:
    return text.isascii() and text.isdigit()


def etag_matches(header: str, etag: str) -> bool:
    """Whether ``If-None-Match`` names ``etag`` (weak comparison, as RFC 9110 asks for this header)."""
    if header.strip() == "*":
        return True
    return any(tag.strip().removeprefix("W/") == etag for tag in header.split(","))


def _chunks(f: IO[bytes], start: int, length: int) -> Iterator[bytes]:
    try:
        f.seek(start)
        remaining = length
        while remaining > 0:
            chunk = f.read(min(CHUNK, remaining))
            if not chunk:
                break
            remaining -= len(chunk)
            yield chunk
    finally:
        f.close()


def _filename(name: str) -> str:
    safe = "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in name)
    return safe or "artifact"


@router.get("", response_model=ArtifactList, summary="List a job's artifacts", responses=responses(NotFound))
def list_artifacts(job_id: uuid.UUID, tenant: TenantDep, session: SessionDep) -> ArtifactList:
    """Name, kind, size and sha256 of each file the job produced, by name."""
    get_job(session, tenant.tenant_id, job_id)
    return ArtifactList(
        items=[ArtifactRead.model_validate(a) for a in repository.list_artifacts(session, tenant.tenant_id, job_id)]
    )


@router.get(
    "/{name}",
    summary="Download an artifact",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "The whole file."},
        206: {"content": {"application/octet-stream": {}}, "description": "One byte range of the file."},
        304: {"description": "If-None-Match named the current ETag."},
        **responses(NotFound, RangeNotSatisfiable),
    },
)
def download_artifact(
    job_id: uuid.UUID,
    name: str,
    request: Request,
    tenant: TenantDep,
    session: SessionDep,
    storage: StorageDep,
    range_: Annotated[str | None, Header(alias="Range")] = None,
    if_none_match: Annotated[str | None, Header(alias="If-None-Match")] = None,
    if_range: Annotated[str | None, Header(alias="If-Range")] = None,
) -> Response:
    """Stream the file; check it against ``sha256`` (also the ETag)."""
    artifact = repository.get_artifact(session, tenant.tenant_id, job_id, name)
    if artifact is None:
        raise NotFound(f"job {job_id} has no artifact {name!r}")
    etag = f'"{artifact.sha256}"'
    headers = {"ETag": etag, "Accept-Ranges": "bytes", "Cache-Control": "private, no-cache"}
    if if_none_match is not None and etag_matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    try:
        size = storage.size(artifact.uri)
        f = storage.open(artifact.uri)
    except (StorageError, ValueError):
        log.error("artifact %r of job %s is recorded but its file %r is missing", name, job_id, artifact.uri)
        raise NotFound(f"the file of artifact {name!r} is missing from storage") from None
    wanted = None
    if range_ is not None and (if_range is None or if_range.strip() == etag):
        try:
            wanted = parse_range(range_, size)
        except RangeNotSatisfiable:
            f.close()
            raise
    start, end = wanted if wanted is not None else (0, size - 1)
    length = max(end - start + 1, 0)
    headers["Content-Length"] = str(length)
    headers["Content-Disposition"] = f'attachment; filename="{_filename(name)}"'
    status = 200
    if wanted is not None:
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    suffix = name[name.rfind(".") :] if "." in name else ""
    chunks = _chunks(f, start, length)
    if (metrics := metrics_of(request.app)) is not None:
        chunks = metrics.counted_download(chunks, artifact.kind)
    return StreamingResponse(
        chunks,
        status_code=status,
        headers=headers,
        media_type=_MEDIA_TYPES.get(suffix, "application/octet-stream"),
    )
