"""What the routers share: declared error responses, paging parameters, what an upload route needs."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from fastapi import Depends, Query, Request
from sqlalchemy.orm import Session

from api.deps import SessionDep, SettingsDep, StorageDep, TenantDep
from api.schemas import ErrorBody
from service.errors import (
    AppError,
    BadRequest,
    InvalidFile,
    InvalidRequest,
    PayloadTooLarge,
    QuotaExceeded,
    ServiceUnavailable,
    TooManyRequests,
    Unauthorized,
    UnsupportedFormat,
)
from service.repositories import MAX_PAGE
from service.settings import Settings
from service.storage import Storage

Limit = Annotated[int, Query(ge=1, le=MAX_PAGE, description="Rows per page.")]
Offset = Annotated[int, Query(ge=0, le=2**31 - 1, description="Rows to skip.")]
#: What an upload of a file the tenant already uploaded does: answer with the one it has (200), or add a new one.
Duplicate = Annotated[
    Literal["existing", "new"],
    Query(
        description="An upload of a file you already have (same bytes, read the same way): `existing` answers "
        "200 with that one and stores nothing; `new` adds another entry (201)."
    ),
]

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


@dataclass(frozen=True, slots=True)
class UploadScope:
    """What an upload route works with: whose upload, the request's session, the limits, where the
    body is received (a private folder under ``root``) and where an accepted file is stored."""

    tenant_id: uuid.UUID
    session: Session
    settings: Settings
    storage: Storage
    root: Path


async def get_upload_scope(
    tenant: TenantDep, session: SessionDep, settings: SettingsDep, storage: StorageDep, root: UploadRootDep
) -> UploadScope:
    return UploadScope(tenant.tenant_id, session, settings, storage, root)


UploadScopeDep = Annotated[UploadScope, Depends(get_upload_scope)]

#: The errors an upload route declares: unparsable body, over the byte cap, refused format, bad file, quota.
UPLOAD_ERRORS = responses(BadRequest, PayloadTooLarge, UnsupportedFormat, InvalidFile, QuotaExceeded)


def duplicate_responses(what: str, model: type[Any]) -> dict[int | str, dict[str, Any]]:
    """:data:`UPLOAD_ERRORS` and the 200 of an upload that repeats one of the tenant's ``what``."""
    return {200: {"model": model, "description": f"The {what} you already have with these bytes (duplicate=existing)."},
            **UPLOAD_ERRORS}  # fmt: skip
