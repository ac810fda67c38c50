"""What the routers share: declared error responses, paging parameters, the upload folder."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Annotated, Any, Final

from fastapi import Depends, Query, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.db import NAME_LENGTH
from api.errors import AppError, InvalidRequest, ServiceUnavailable, TooManyRequests, Unauthorized
from api.limits import check_storage_quota
from api.repository import MAX_PAGE
from api.schemas import ErrorBody
from api.settings import Settings
from api.storage import Storage
from api.upload import FORM_OVERHEAD, ReceivedForm

log = logging.getLogger(__name__)

Limit = Annotated[int, Query(ge=1, le=MAX_PAGE, description="Rows per page.")]
Offset = Annotated[int, Query(ge=0, le=2**31 - 1, description="Rows to skip.")]

#: Errors any authenticated route can answer: no key, bad query/path values, the key's rate limit, database down.
COMMON: Final[tuple[type[AppError], ...]] = (Unauthorized, InvalidRequest, TooManyRequests, ServiceUnavailable)


def responses(*errors: type[AppError]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` for a route that may answer ``errors`` (plus :data:`COMMON`)."""
    out: dict[int | str, dict[str, Any]] = {}
    for error in (*errors, *COMMON):
        entry = out.setdefault(error.status_code, {"model": ErrorBody, "description": ""})
        text = f"`{error.code}`: {error.description}"
        if text not in entry["description"]:
            entry["description"] = f"{entry['description']} {text}".strip()
    return dict(sorted(out.items(), key=lambda kv: str(kv[0])))


def get_upload_root(request: Request) -> Path:
    """Where uploads are streamed to before they are checked (one private folder per request)."""
    root: Path = request.app.state.upload_root
    return root


UploadRootDep = Annotated[Path, Depends(get_upload_root)]


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


def remove_blobs(storage: Storage, *prefixes: str) -> None:
    """Remove stored files after their rows' delete was committed; a failure is logged, not answered."""
    for prefix in prefixes:
        try:
            storage.delete_prefix(prefix)
        except Exception:  # the row is gone; an orphaned blob is only wasted space
            log.exception("could not remove stored files under %s", prefix)


async def check_upload_quota(
    request: Request, session: Session, settings: Settings, tenant_id: uuid.UUID, form: ReceivedForm | None = None
) -> None:
    """The tenant's stored-bytes quota for an upload (429 ``quota_exceeded`` past it).

    Without ``form``, before the body is read: from ``Content-Length`` less the room a form takes
    around its files (:data:`~api.upload.FORM_OVERHEAD`), so only an upload that is over for certain
    is refused unread; a chunked body, or a length over the upload cap (a 413 follows), is left to
    the check after it. With ``form``, once the body is received: from its files' sizes, before
    anything is stored.
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
