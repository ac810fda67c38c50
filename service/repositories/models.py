"""Uploaded models: record, read, list, delete (the stored file is the caller's)."""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass
from typing import Any, Final

from sqlalchemy.orm import Session

from service.orm import MODEL_FORMATS, Job, Model
from service.repositories import StoredUpload, UploadRows, insert


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """What the upload checks found an accepted model file to be: its ``models`` columns besides the stored ones.

    ``flops_per_example``: the forward pass of one example, counted at upload; None if it could not be.
    ``layers``: the names of its prunable layers (Linear, Conv, attention) as a job sees them.
    """

    format: str
    parameter_count: int
    architecture: str | None = None
    config: dict[str, Any] | None = None
    flops_per_example: int | None = None
    layers: list[str] | None = None


#: The tenant-scoped read, listing and guarded delete of model rows.
rows: Final = UploadRows(Model, Job.model_id)


def create_model(session: Session, tenant_id: uuid.UUID, stored: StoredUpload, facts: ModelFacts) -> Model:
    """Record an uploaded model whose file is ``stored``."""
    if facts.format not in MODEL_FORMATS:
        raise ValueError(f"model format must be one of {MODEL_FORMATS}, got {facts.format!r}")
    return insert(session, Model(tenant_id=tenant_id, **asdict(stored), **asdict(facts)))
