"""The list, get and delete routes that the two stored uploads, models and data sets, share.

No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations at run
time, and the path parameter's name (``model_id``, ``dataset_id``) is made in the function.
"""

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Path, Response
from pydantic import BaseModel

from api.deps import SessionDep, StorageDep, TenantDep
from api.routes.common import Limit, Offset, responses
from api.schemas import Page
from service.errors import Conflict, NotFound
from service.usecases import StoredUploads


def add_read_and_delete_routes(
    router: APIRouter,
    uploads: StoredUploads[Any],
    read: type[BaseModel],
    *,
    name: str,
    title: str,
    files: str,
) -> None:
    """Add ``GET ""``, ``GET /{<name>_id}`` and ``DELETE /{<name>_id}`` for ``uploads`` to ``router``.

    ``name`` is the resource in code (``"model"``: the path parameter and the operation names),
    ``title`` in prose (``"data set"``: the summaries), ``files`` what a delete removes from
    storage (``"file"``, ``"files"``); ``read`` is the schema of one row.
    """
    page = Page[read]  # type: ignore[valid-type]
    one = f"/{{{name}_id}}"
    row_id_type = Annotated[uuid.UUID, Path(alias=f"{name}_id", title=f"{name.title()} Id")]

    @router.get(
        "",
        response_model=page,
        summary=f"List {title}s",
        description=f"The tenant's {title}s, newest first.",
        responses=responses(),
        name=f"list_{name}s",
    )
    def list_rows(tenant: TenantDep, session: SessionDep, limit: Limit = 50, offset: Offset = 0) -> BaseModel:
        rows = uploads.list(session, tenant.tenant_id, limit=limit, offset=offset)
        items = [read.model_validate(row) for row in rows.items]
        return page(items=items, total=rows.total, limit=limit, offset=offset)

    @router.get(one, response_model=read, summary=f"Get a {title}", responses=responses(NotFound), name=f"get_{name}")
    def get_row(row_id: row_id_type, tenant: TenantDep, session: SessionDep) -> BaseModel:
        return read.model_validate(uploads.get(session, tenant.tenant_id, row_id))

    @router.delete(
        one,
        status_code=204,
        summary=f"Delete a {title}",
        description=f"Delete the {title} and its stored {files}; 409 while a job refers to it (delete the job first).",
        responses=responses(NotFound, Conflict),
        name=f"delete_{name}",
    )
    def delete_row(row_id: row_id_type, tenant: TenantDep, session: SessionDep, storage: StorageDep) -> Response:
        uploads.delete(session, storage, tenant.tenant_id, row_id)
        return Response(status_code=204)
