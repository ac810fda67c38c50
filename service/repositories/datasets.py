"""Data sets: built-in ones by name and uploaded files; record, read, list, delete."""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass
from typing import Final

from sqlalchemy.orm import Session

from service.orm import DATASET_KINDS, Dataset, Job
from service.repositories import StoredUpload, UploadRows, insert


@dataclass(frozen=True, slots=True)
class DatasetFacts:
    """What the upload checks found an accepted data file to be: its ``datasets`` columns besides the stored ones."""

    kind: str
    n_examples: int
    input_shape: list[int]
    has_targets: bool


#: The tenant-scoped read, listing and guarded delete of dataset rows.
rows: Final = UploadRows(Dataset, Job.dataset_id)


def create_builtin_dataset(session: Session, tenant_id: uuid.UUID, builtin_name: str, name: str) -> Dataset:
    """Record the built-in set ``builtin_name`` (no stored file) under the name ``name``."""
    return insert(session, Dataset(tenant_id=tenant_id, name=name, kind="builtin", builtin_name=builtin_name))


def create_dataset(session: Session, tenant_id: uuid.UUID, stored: StoredUpload, facts: DatasetFacts) -> Dataset:
    """Record an uploaded data set whose files are ``stored`` (``facts.kind`` is its file format)."""
    if facts.kind == "builtin" or facts.kind not in DATASET_KINDS:
        raise ValueError(f"an uploaded dataset's kind must be one of {DATASET_KINDS[1:]}, got {facts.kind!r}")
    return insert(session, Dataset(tenant_id=tenant_id, **asdict(stored), **asdict(facts)))
