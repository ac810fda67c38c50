"""``/v1/datasets``: a built-in set by name (JSON) or an uploaded file (multipart), read, list, delete.

Stored layout: ``datasets/<id>/inputs.<kind>`` and, for IDX inputs with labels,
``datasets/<id>/targets.idx`` beside it; ``datasets.uri`` holds the inputs' storage key.
``size_bytes`` counts both files, ``sha256`` is the inputs file's.
"""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Request, Response
from pydantic import ValidationError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api import repository
from api.db import Dataset
from api.deps import Principal, SessionDep, SettingsDep, StorageDep, TenantDep
from api.errors import (
    BadRequest,
    Conflict,
    InvalidFile,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    QuotaExceeded,
    UnsupportedFormat,
)
from api.inspect import DatasetFacts, inspect_dataset
from api.metrics import metrics_of
from api.routes.common import (
    Limit,
    Offset,
    UploadRootDep,
    check_upload_quota,
    display_name,
    remove_blobs,
    responses,
)
from api.schemas import BuiltinDatasetCreate, DatasetPage, DatasetRead
from api.settings import Settings
from api.storage import Storage
from api.upload import ReceivedFile, multipart_boundary, read_small_body, receive_form, upload_folder

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


def dataset_prefix(dataset_id: uuid.UUID) -> str:
    return f"datasets/{dataset_id}"


def _store(
    session: Session,
    storage: Storage,
    tenant_id: uuid.UUID,
    inputs: ReceivedFile,
    targets: ReceivedFile | None,
    name: str,
    facts: DatasetFacts,
) -> Dataset:
    """Move the checked files into storage and record them; on any failure neither stays."""
    dataset_id = uuid.uuid4()
    prefix = dataset_prefix(dataset_id)
    try:
        stored = storage.put_file(f"{prefix}/inputs.{facts.kind}", inputs.path)
        size = stored.size
        if targets is not None:
            size += storage.put_file(f"{prefix}/targets.idx", targets.path).size
        dataset = repository.create_dataset(
            session,
            tenant_id,
            name=name,
            kind=facts.kind,
            n_examples=facts.n_examples,
            input_shape=facts.input_shape,
            has_targets=facts.has_targets,
            size_bytes=size,
            sha256=inputs.sha256,
            uri=stored.key,
            dataset_id=dataset_id,
        )
        session.commit()
    except BaseException:
        session.rollback()
        storage.delete_prefix(prefix)
        raise
    return dataset


def _create_builtin(session: Session, tenant_id: uuid.UUID, body: bytes) -> Dataset:
    try:
        request = BuiltinDatasetCreate.model_validate_json(body)
    except ValidationError as e:
        raise InvalidRequest(
            "invalid built-in data set request",
            extra={"fields": e.errors(include_url=False, include_context=False, include_input=False)},
        ) from None
    dataset = repository.create_dataset(
        session,
        tenant_id,
        name=request.name or request.builtin,
        kind="builtin",
        builtin_name=request.builtin,
    )
    session.commit()
    return dataset


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
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            raise UnsupportedFormat("send JSON {'builtin': …} for a built-in set, or multipart/form-data to upload")
        body = await read_small_body(request, MAX_JSON_BODY)
        dataset = await run_in_threadpool(_create_builtin, session, tenant.tenant_id, body)
    else:
        dataset = await _upload(request, tenant, session, settings, storage, upload_root)
        if (metrics := metrics_of(request.app)) is not None:
            metrics.record_upload("dataset", dataset.size_bytes or 0)
    response.headers["Location"] = f"/v1/datasets/{dataset.id}"
    return DatasetRead.model_validate(dataset)


async def _upload(
    request: Request,
    tenant: Principal,
    session: Session,
    settings: Settings,
    storage: Storage,
    upload_root: UploadRootDep,
) -> Dataset:
    cap = settings.max_upload_bytes
    await check_upload_quota(request, session, settings, tenant.tenant_id)
    with upload_folder(upload_root, "dataset-") as folder:
        form = await receive_form(
            request, folder, max_file_bytes=cap, file_fields=("file", "targets"), text_fields=("name",)
        )
        await check_upload_quota(request, session, settings, tenant.tenant_id, form)
        inputs = form.files.get("file")
        if inputs is None:
            raise InvalidRequest("the form field 'file' (the inputs) is required")
        targets = form.files.get("targets")
        name = display_name(form.fields.get("name"), inputs.filename, "data")
        facts = await run_in_threadpool(inspect_dataset, inputs.path, targets.path if targets else None, max_bytes=cap)
        return await run_in_threadpool(_store, session, storage, tenant.tenant_id, inputs, targets, name, facts)


@router.get("", response_model=DatasetPage, summary="List data sets", responses=responses())
def list_datasets(tenant: TenantDep, session: SessionDep, limit: Limit = 50, offset: Offset = 0) -> DatasetPage:
    """The tenant's data sets, newest first."""
    page = repository.list_datasets(session, tenant.tenant_id, limit=limit, offset=offset)
    return DatasetPage(
        items=[DatasetRead.model_validate(d) for d in page.items], total=page.total, limit=limit, offset=offset
    )


@router.get("/{dataset_id}", response_model=DatasetRead, summary="Get a data set", responses=responses(NotFound))
def get_dataset(dataset_id: uuid.UUID, tenant: TenantDep, session: SessionDep) -> DatasetRead:
    dataset = repository.get_dataset(session, tenant.tenant_id, dataset_id)
    if dataset is None:
        raise NotFound(f"dataset {dataset_id} not found")
    return DatasetRead.model_validate(dataset)


@router.delete("/{dataset_id}", status_code=204, summary="Delete a data set", responses=responses(NotFound, Conflict))
def delete_dataset(dataset_id: uuid.UUID, tenant: TenantDep, session: SessionDep, storage: StorageDep) -> Response:
    """Delete the data set and its stored files; 409 while a job refers to it (delete the job first)."""
    if not repository.delete_dataset(session, tenant.tenant_id, dataset_id):
        raise NotFound(f"dataset {dataset_id} not found")
    session.commit()
    remove_blobs(storage, dataset_prefix(dataset_id))
    return Response(status_code=204)
