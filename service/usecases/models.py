"""Models: store an accepted upload, read and list them, delete one with its file."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Final

from sqlalchemy.orm import Session

from service import keys
from service.orm import Model
from service.repositories import StoredUpload, models
from service.repositories.models import ModelFacts
from service.storage import Storage
from service.usecases import StagedFile, StoredUploads, put_staged, stored_and_recorded


@dataclass(frozen=True, slots=True)
class ModelUpload:
    """An accepted model upload, received but not stored yet: the file, its name, what it is.

    ``suffix`` is the stored file's extension: ``onnx``, ``safetensors``, or ``zip`` for a model of
    several files kept as one bundle (:mod:`dns_core.bundles`).
    """

    file: StagedFile
    name: str
    facts: ModelFacts
    suffix: str


def find_duplicate(session: Session, tenant_id: uuid.UUID, upload: ModelUpload) -> Model | None:
    """The tenant's earliest model that this upload repeats: the same stored bytes (sha256 and size) read
    the same way (format, architecture, config); None if there is none. Its name may differ."""
    for model in models.rows.same_file(session, tenant_id, upload.file.sha256, upload.file.size):
        facts = upload.facts
        if (model.format, model.architecture, model.config) == (facts.format, facts.architecture, facts.config):
            return model
    return None


def store_model(
    session: Session, storage: Storage, tenant_id: uuid.UUID, upload: ModelUpload, *, reuse: bool = False
) -> tuple[Model, bool]:
    """Move the checked file into storage and record it, committed; on any failure neither stays.

    Returns the model and whether it is new. With ``reuse``, an upload the tenant already has
    (:func:`find_duplicate`) stores nothing and returns that model.
    """
    if reuse and (existing := find_duplicate(session, tenant_id, upload)) is not None:
        return existing, False
    model_id = uuid.uuid4()
    with stored_and_recorded(session, storage, keys.model_prefix(model_id)):
        stored = put_staged(storage, keys.model_key(model_id, upload.suffix), upload.file)
        record = StoredUpload(model_id, upload.name, stored.size, stored.sha256, stored.key)
        model = models.create_model(session, tenant_id, record, upload.facts)
    return model, True


#: Read, list and delete the tenant's models with their stored files.
uploads: Final = StoredUploads("model", models.rows, keys.model_prefix)
