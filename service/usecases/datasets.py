"""Data sets: add a built-in one, store an accepted upload, read one, delete one with its files."""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass

from sqlalchemy.orm import Session

from service import keys
from service.orm import Dataset
from service.repositories import datasets
from service.storage import Storage
from service.usecases import StagedFile, commit_delete, found, put_staged, stored_and_recorded


@dataclass(frozen=True, slots=True)
class DatasetFacts:
    """What the upload checks found an accepted data file to be."""

    kind: str
    n_examples: int
    input_shape: list[int]
    has_targets: bool


@dataclass(frozen=True, slots=True)
class DatasetUpload:
    """An accepted data set upload, received but not stored yet: inputs, IDX targets if sent, name, facts."""

    inputs: StagedFile
    targets: StagedFile | None
    name: str
    facts: DatasetFacts


def add_builtin_dataset(session: Session, tenant_id: uuid.UUID, builtin: str, name: str | None = None) -> Dataset:
    """Record the built-in set ``builtin`` for the tenant (named ``name``, else ``builtin``), committed."""
    dataset = datasets.create_dataset(session, tenant_id, name=name or builtin, kind="builtin", builtin_name=builtin)
    session.commit()
    return dataset


def store_dataset(session: Session, storage: Storage, tenant_id: uuid.UUID, upload: DatasetUpload) -> Dataset:
    """Move the checked files into storage and record them, committed; on any failure neither stays.

    ``size_bytes`` counts both files, ``sha256`` is the inputs file's.
    """
    dataset_id = uuid.uuid4()
    with stored_and_recorded(session, storage, keys.dataset_prefix(dataset_id)):
        stored = put_staged(storage, keys.dataset_inputs_key(dataset_id, upload.facts.kind), upload.inputs)
        size = stored.size
        if upload.targets is not None:
            size += put_staged(storage, keys.dataset_targets_key(dataset_id), upload.targets).size
        dataset = datasets.create_dataset(
            session,
            tenant_id,
            name=upload.name,
            size_bytes=size,
            sha256=stored.sha256,
            uri=stored.key,
            dataset_id=dataset_id,
            **asdict(upload.facts),
        )
    return dataset


def get_dataset(session: Session, tenant_id: uuid.UUID, dataset_id: uuid.UUID) -> Dataset:
    """The tenant's data set; :class:`~service.errors.NotFound` if missing or another tenant's."""
    return found(datasets.get_dataset(session, tenant_id, dataset_id), "dataset", dataset_id)


def delete_dataset(session: Session, storage: Storage, tenant_id: uuid.UUID, dataset_id: uuid.UUID) -> None:
    """Delete the data set (committed), then its files; :class:`~service.errors.Conflict` while a job uses it."""
    deleted = datasets.delete_dataset(session, tenant_id, dataset_id)
    commit_delete(session, storage, deleted, "dataset", dataset_id, keys.dataset_prefix(dataset_id))
