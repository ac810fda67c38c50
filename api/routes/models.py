"""``/v1/models``: upload (streamed, checked by content), read, list, delete.

Stored layout: ``models/<id>/model.onnx`` or ``models/<id>/model.safetensors``; ``models.uri``
holds that storage key (relative to ``Settings.storage_url``).
"""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Request, Response
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api import repository
from api.db import Model
from api.deps import SessionDep, SettingsDep, StorageDep, TenantDep
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
from api.inspect import ModelFacts, inspect_model
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
from api.schemas import ModelPage, ModelRead
from api.storage import Storage
from api.upload import ReceivedFile, receive_form, upload_folder
from dns_core.models import ZOO

router = APIRouter(prefix="/models", tags=["models"])

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "additionalProperties": False,  # other form fields are refused (422)
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "An ONNX graph without external data, or safetensors weights of a "
                            "built-in architecture. Pickle-based files (torch.save, TorchScript, .pt2, "
                            "torch.package) are refused with 415.",
                        },
                        "name": {"type": "string", "maxLength": 255, "description": "Defaults to the file name."},
                        "architecture": {
                            "type": "string",
                            "enum": sorted(ZOO),
                            "description": "Built-in architecture of safetensors weights (else read from the "
                            "file's netsurgery.arch header).",
                        },
                        "config": {
                            "type": "string",
                            "description": 'The architecture\'s config as a JSON object, e.g. {"num_classes": 10}.',
                        },
                    },
                }
            }
        },
    }
}


def model_prefix(model_id: uuid.UUID) -> str:
    return f"models/{model_id}"


def _store(
    session: Session, storage: Storage, tenant_id: uuid.UUID, upload: ReceivedFile, name: str, facts: ModelFacts
) -> Model:
    """Move the checked file into storage and record it; on any failure neither stays."""
    model_id = uuid.uuid4()
    prefix = model_prefix(model_id)
    try:
        stored = storage.put_file(f"{prefix}/model.{facts.format}", upload.path)
        if (stored.size, stored.sha256) != (upload.size, upload.sha256):
            raise RuntimeError(f"stored copy of the upload differs from what was received ({stored} vs {upload})")
        model = repository.create_model(
            session,
            tenant_id,
            name=name,
            format=facts.format,
            parameter_count=facts.parameter_count,
            size_bytes=upload.size,
            sha256=upload.sha256,
            uri=stored.key,
            architecture=facts.architecture,
            config=facts.config,
            model_id=model_id,
        )
        session.commit()
    except BaseException:
        session.rollback()
        storage.delete_prefix(prefix)
        raise
    return model


@router.post(
    "",
    status_code=201,
    response_model=ModelRead,
    summary="Upload a model",
    responses=responses(BadRequest, PayloadTooLarge, UnsupportedFormat, InvalidFile, QuotaExceeded),
    openapi_extra=_UPLOAD_BODY,
)
async def upload_model(
    request: Request,
    response: Response,
    tenant: TenantDep,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    upload_root: UploadRootDep,
) -> ModelRead:
    """Upload an ONNX graph or safetensors weights as ``multipart/form-data``.

    The body is streamed to a private temporary folder under a byte cap (413 past
    ``max_upload_bytes``), then judged by content: refused formats are a 415, malformed files
    or weights that do not fit the architecture (missing, unexpected or mis-shaped tensors) a
    422. Only an accepted file is moved into storage and recorded. An upload that would take the
    tenant past its stored-bytes quota is a 429 (``quota_exceeded``): before the body is read when
    ``Content-Length`` already says so, else once it is received.
    """
    cap = settings.max_upload_bytes
    await check_upload_quota(request, session, settings, tenant.tenant_id)
    with upload_folder(upload_root, "model-") as folder:
        form = await receive_form(
            request, folder, max_file_bytes=cap, file_fields=("file",), text_fields=("name", "architecture", "config")
        )
        await check_upload_quota(request, session, settings, tenant.tenant_id, form)
        upload = form.files.get("file")
        if upload is None:
            raise InvalidRequest("the form field 'file' (the model) is required")
        name = display_name(form.fields.get("name"), upload.filename, "model")
        facts = await run_in_threadpool(
            inspect_model,
            upload.path,
            max_bytes=cap,
            architecture=(form.fields.get("architecture") or "").strip() or None,
            config_text=form.fields.get("config"),
        )
        model = await run_in_threadpool(_store, session, storage, tenant.tenant_id, upload, name, facts)
    if (metrics := metrics_of(request.app)) is not None:
        metrics.record_upload("model", model.size_bytes)
    response.headers["Location"] = f"/v1/models/{model.id}"
    return ModelRead.model_validate(model)


@router.get("", response_model=ModelPage, summary="List models", responses=responses())
def list_models(tenant: TenantDep, session: SessionDep, limit: Limit = 50, offset: Offset = 0) -> ModelPage:
    """The tenant's models, newest first."""
    page = repository.list_models(session, tenant.tenant_id, limit=limit, offset=offset)
    return ModelPage(
        items=[ModelRead.model_validate(m) for m in page.items], total=page.total, limit=limit, offset=offset
    )


@router.get("/{model_id}", response_model=ModelRead, summary="Get a model", responses=responses(NotFound))
def get_model(model_id: uuid.UUID, tenant: TenantDep, session: SessionDep) -> ModelRead:
    model = repository.get_model(session, tenant.tenant_id, model_id)
    if model is None:
        raise NotFound(f"model {model_id} not found")
    return ModelRead.model_validate(model)


@router.delete("/{model_id}", status_code=204, summary="Delete a model", responses=responses(NotFound, Conflict))
def delete_model(model_id: uuid.UUID, tenant: TenantDep, session: SessionDep, storage: StorageDep) -> Response:
    """Delete the model and its stored file; 409 while a job refers to it (delete the job first)."""
    if not repository.delete_model(session, tenant.tenant_id, model_id):
        raise NotFound(f"model {model_id} not found")
    session.commit()
    remove_blobs(storage, model_prefix(model_id))
    return Response(status_code=204)
