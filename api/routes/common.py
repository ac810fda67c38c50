"""What the routers share: declared error responses, paging parameters, the upload folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Final

from fastapi import Depends, Query, Request

from api.schemas import ErrorBody
from service.errors import AppError, InvalidRequest, ServiceUnavailable, TooManyRequests, Unauthorized
from service.repositories import MAX_PAGE

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
