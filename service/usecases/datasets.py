"""Data sets: add a built-in one, store an accepted upload, read and list them, delete one with its files."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Final

from sqlalchemy.orm import Session

from service import keys
from service.orm import Dataset
from service.repositories import StoredUpload, datasets
from service.repositories.datasets import DatasetFacts
from service.storage import Storage
from service.usecases import StagedFile, StoredUploads, put_staged, stored_and_recorded


@dataclass(frozen=True, slots=True)
class DatasetUpload:
    """An accepted data set upload, received but not stored yet: inputs, IDX targets if sent, name, facts."""

    inputs: StagedFile
    targets: StagedFile | None
    name: str
    facts: DatasetFacts


def add_builtin_dataset(session: Session, tenant_id: uuid.UUID, builtin: str, name: str | None = None) -> Dataset:
    """Record the built-in set ``builtin`` for the tenant (named ``name``, else ``builtin``), committed."""
    dataset = datasets.create_builtin_dataset(session, tenant_id, builtin, name or builtin)
    session.commit()
    return dataset


def find_duplicate(session: Session, tenant_id: uuid.UUID, upload: DatasetUpload) -> Dataset | None:
    """The tenant's earliest data set that this upload repeats: one file (no separate targets) with the same
    bytes (sha256 and size) read the same way; None if there is none. Its name may differ.

    An upload with IDX targets is never a duplicate: its ``sha256`` is the inputs file's alone.
    """
    if upload.targets is not None:
        return None
    for dataset in datasets.rows.same_file(session, tenant_id, upload.inputs.sha256, upload.inputs.size):
        if dataset.kind == upload.facts.kind and dataset.n_examples == upload.facts.n_examples:
            return dataset
    return None


def store_dataset(
    session: Session, storage: Storage, tenant_id: uuid.UUID, upload: DatasetUpload, *, reuse: bool = False
) -> tuple[Dataset, bool]:
    """Move the checked files into storage and record them, committed; on any failure neither stays.

    ``size_bytes`` counts both files, ``sha256`` is the inputs file's. Returns the data set and whether
    it is new. With ``reuse``, an upload the tenant already has (:func:`find_duplicate`) stores nothing
    and returns that data set.
    """
    if reuse and (existing := find_duplicate(session, tenant_id, upload)) is not None:
        return existing, False
    dataset_id = uuid.uuid4()
    with stored_and_recorded(session, storage, keys.dataset_prefix(dataset_id)):
        stored = put_staged(storage, keys.dataset_inputs_key(dataset_id, upload.facts.kind), upload.inputs)
        size = stored.size
        if upload.targets is not None:
            size += put_staged(storage, keys.dataset_targets_key(dataset_id), upload.targets).size
        record = StoredUpload(dataset_id, upload.name, size, stored.sha256, stored.key)
        dataset = datasets.create_dataset(session, tenant_id, record, upload.facts)
    return dataset, True


#: Read, list and delete the tenant's data sets with their stored files.
uploads: Final = StoredUploads("dataset", datasets.rows, keys.dataset_prefix)
