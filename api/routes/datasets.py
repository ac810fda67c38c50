"""``/v1/datasets``: a built-in set by name (JSON) or an uploaded file (multipart), read, list, delete.

Stored layout: :func:`service.keys.dataset_inputs_key` and, for IDX inputs with labels,
:func:`service.keys.dataset_targets_key` beside it; ``datasets.uri`` holds the inputs' storage key.
``size_bytes`` counts both files, ``sha256`` is the inputs file's.
"""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Request, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from api.deps import SessionDep, SettingsDep, StorageDep, TenantDep
from api.metrics import record_upload
from api.routes.common import Limit, Offset, UploadRootDep, responses
from api.schemas import BuiltinDatasetCreate, DatasetPage, DatasetRead
from api.uploads import multipart_boundary, read_small_body, receive_dataset, upload_folder
from service.errors import (
    BadRequest,
    Conflict,
    InvalidFile,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    QuotaExceeded,
    UnsupportedFormat,
)
from service.repositories import datasets as repository
from service.usecases import datasets

router = APIRouter(prefix="/datasets", tags=["datasets"])

MAX_JSON_BODY = 16 * 1024

_CREATE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": BuiltinDatasetCreate.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "Inputs: .npz or safetensors holding 'inputs' (N×…) and optionally "
                            "'targets' (N class indices), or an IDX file (MNIST format, may be gzipped).",
                        },
                        "targets": {
                            "type": "string",
                            "format": "binary",
                            "description": "IDX labels for IDX inputs.",
                        },
                        "name": {"type": "string", "maxLength": 255},
                    },
                    "additionalProperties": False,  # other form fields are refused (422)
                }
            },
        },
    }
}


async def read_builtin_request(request: Request) -> tuple[str, str | None]:
    """The built-in set and name a JSON body asks for (415 for another content type, 422 for bad values)."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise UnsupportedFormat("send JSON {'builtin': …} for a built-in set, or multipart/form-data to upload")
    body = await read_small_body(request, MAX_JSON_BODY)
    try:
        parsed = BuiltinDatasetCreate.model_validate_json(body)
    except ValidationError as e:
        raise InvalidRequest(
            "invalid built-in data set request",
            extra={"fields": e.errors(include_url=False, include_context=False, include_input=False)},
        ) from None
    return parsed.builtin, parsed.name


@router.post(
    "",
    status_code=201,
    response_model=DatasetRead,
    summary="Add a data set",
    responses=responses(BadRequest, PayloadTooLarge, UnsupportedFormat, InvalidFile, QuotaExceeded),
    openapi_extra=_CREATE_BODY,
)
async def create_dataset(
    request: Request,
    response: Response,
    tenant: TenantDep,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    upload_root: UploadRootDep,
) -> DatasetRead:
    """Add a data set: JSON ``{"builtin": "digits"}`` names a built-in set; a ``multipart/form-data``
    upload (``file``, optional ``targets`` and ``name``) is streamed under the byte cap and read
    safely (no pickle; archives checked first) to learn its size and shape before it is stored.
    An upload that would take the tenant past its stored-bytes quota is a 429 (``quota_exceeded``).
    """
    if multipart_boundary(request) is None:
        builtin, name = await read_builtin_request(request)
        dataset = await run_in_threadpool(datasets.add_builtin_dataset, session, tenant.tenant_id, builtin, name)
    else:
        with upload_folder(upload_root, "dataset-") as folder:
            upload = await receive_dataset(request, session, settings, tenant.tenant_id, folder)
            dataset = await run_in_threadpool(datasets.store_dataset, session, storage, tenant.tenant_id, upload)
        record_upload(request.app, "dataset", dataset.size_bytes or 0)
    response.headers["Location"] = f"/v1/datasets/{dataset.id}"
    return DatasetRead.model_validate(dataset)


@router.get("", response_model=DatasetPage, summary="List data sets", responses=responses())
def list_datasets(tenant: TenantDep, session: SessionDep, limit: Limit = 50, offset: Offset = 0) -> DatasetPage:
    """The tenant's data sets, newest first."""
    page = repository.list_datasets(session, tenant.tenant_id, limit=limit, offset=offset)
    return DatasetPage(
        items=[DatasetRead.model_validate(d) for d in page.items], total=page.total, limit=limit, offset=offset
    )


@router.get("/{dataset_id}", response_model=DatasetRead, summary="Get a data set", responses=responses(NotFound))
def get_dataset(dataset_id: uuid.UUID, tenant: TenantDep, session: SessionDep) -> DatasetRead:
    return DatasetRead.model_validate(datasets.get_dataset(session, tenant.tenant_id, dataset_id))


@router.delete("/{dataset_id}", status_code=204, summary="Delete a data set", responses=responses(NotFound, Conflict))
def delete_dataset(dataset_id: uuid.UUID, tenant: TenantDep, session: SessionDep, storage: StorageDep) -> Response:
    """Delete the data set and its stored files; 409 while a job refers to it (delete the job first)."""
    datasets.delete_dataset(session, storage, tenant.tenant_id, dataset_id)
    return Response(status_code=204)
