"""Models: store an accepted upload, read one, delete one with its file."""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy.orm import Session

from service import keys
from service.orm import Model
from service.repositories import models
from service.storage import Storage
from service.usecases import StagedFile, commit_delete, found, put_staged, stored_and_recorded


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """What the upload checks found an accepted model file to be."""

    format: str
    parameter_count: int
    architecture: str | None = None
    config: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class ModelUpload:
    """An accepted model upload, received but not stored yet: the file, its name, what it is."""

    file: StagedFile
    name: str
    facts: ModelFacts


def store_model(session: Session, storage: Storage, tenant_id: uuid.UUID, upload: ModelUpload) -> Model:
    """Move the checked file into storage and record it, committed; on any failure neither stays."""
    model_id = uuid.uuid4()
    with stored_and_recorded(session, storage, keys.model_prefix(model_id)):
        stored = put_staged(storage, keys.model_key(model_id, upload.facts.format), upload.file)
        model = models.create_model(
            session,
            tenant_id,
            name=upload.name,
            size_bytes=stored.size,
            sha256=stored.sha256,
            uri=stored.key,
            model_id=model_id,
            **asdict(upload.facts),
        )
    return model


def get_model(session: Session, tenant_id: uuid.UUID, model_id: uuid.UUID) -> Model:
    """The tenant's model; :class:`~service.errors.NotFound` if missing or another tenant's."""
    return found(models.get_model(session, tenant_id, model_id), "model", model_id)


def delete_model(session: Session, storage: Storage, tenant_id: uuid.UUID, model_id: uuid.UUID) -> None:
    """Delete the model (committed), then its stored file; :class:`~service.errors.Conflict` while a job uses it."""
    deleted = models.delete_model(session, tenant_id, model_id)
    commit_delete(session, storage, deleted, "model", model_id, keys.model_prefix(model_id))
