"""Uploaded models: record, read, list, delete (the stored file is the caller's)."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy.orm import Session

from service.orm import MODEL_FORMATS, Job, Model
from service.repositories import Page, delete_unused, get_owned, insert, list_owned


def create_model(
    session: Session,
    tenant_id: uuid.UUID,
    *,
    name: str,
    format: str,
    parameter_count: int,
    size_bytes: int,
    sha256: str,
    uri: str,
    architecture: str | None = None,
    config: dict[str, Any] | None = None,
    model_id: uuid.UUID | None = None,
) -> Model:
    """Record an uploaded model. ``model_id`` lets the caller pick the id it already used for the stored object."""
    if format not in MODEL_FORMATS:
        raise ValueError(f"model format must be one of {MODEL_FORMATS}, got {format!r}")
    model = Model(
        id=model_id or uuid.uuid4(),
        tenant_id=tenant_id,
        name=name,
        format=format,
        architecture=architecture,
        config=config,
        parameter_count=parameter_count,
        size_bytes=size_bytes,
        sha256=sha256,
        uri=uri,
    )
    return insert(session, model)


def get_model(session: Session, tenant_id: uuid.UUID, model_id: uuid.UUID) -> Model | None:
    """The tenant's model ``model_id``; None if missing or another tenant's."""
    return get_owned(session, Model, tenant_id, model_id)


def list_models(session: Session, tenant_id: uuid.UUID, *, limit: int = 50, offset: int = 0) -> Page[Model]:
    """The tenant's models, newest first."""
    return list_owned(session, Model, tenant_id, limit, offset)


def delete_model(session: Session, tenant_id: uuid.UUID, model_id: uuid.UUID) -> bool:
    """Delete the tenant's model; False if there is none, ``Conflict`` while a job refers to it."""
    return delete_unused(session, Model, model_id, tenant_id, Job.model_id == model_id)
