"""Data sets: built-in ones by name and uploaded files; record, read, list, delete."""

from __future__ import annotations

import uuid

from sqlalchemy.orm import Session

from service.orm import DATASET_KINDS, Dataset, Job
from service.repositories import Page, delete_unused, get_owned, insert, list_owned


def create_dataset(
    session: Session,
    tenant_id: uuid.UUID,
    *,
    name: str,
    kind: str,
    builtin_name: str | None = None,
    n_examples: int | None = None,
    input_shape: list[int] | None = None,
    has_targets: bool = True,
    size_bytes: int | None = None,
    sha256: str | None = None,
    uri: str | None = None,
    dataset_id: uuid.UUID | None = None,
) -> Dataset:
    """Record a dataset: a built-in one (``kind='builtin'`` and ``builtin_name``) or an upload (``uri``)."""
    if kind not in DATASET_KINDS:
        raise ValueError(f"dataset kind must be one of {DATASET_KINDS}, got {kind!r}")
    if (kind == "builtin") != (builtin_name is not None) or (kind == "builtin") == (uri is not None):
        raise ValueError("a built-in dataset has builtin_name and no uri; an uploaded one has uri and no builtin_name")
    dataset = Dataset(
        id=dataset_id or uuid.uuid4(),
        tenant_id=tenant_id,
        name=name,
        kind=kind,
        builtin_name=builtin_name,
        n_examples=n_examples,
        input_shape=input_shape,
        has_targets=has_targets,
        size_bytes=size_bytes,
        sha256=sha256,
        uri=uri,
    )
    return insert(session, dataset)


def get_dataset(session: Session, tenant_id: uuid.UUID, dataset_id: uuid.UUID) -> Dataset | None:
    """The tenant's dataset ``dataset_id``; None if missing or another tenant's."""
    return get_owned(session, Dataset, tenant_id, dataset_id)


def list_datasets(session: Session, tenant_id: uuid.UUID, *, limit: int = 50, offset: int = 0) -> Page[Dataset]:
    """The tenant's datasets, newest first."""
    return list_owned(session, Dataset, tenant_id, limit, offset)


def delete_dataset(session: Session, tenant_id: uuid.UUID, dataset_id: uuid.UUID) -> bool:
    """Delete the tenant's dataset; False if there is none, ``Conflict`` while a job refers to it."""
    return delete_unused(session, Dataset, dataset_id, tenant_id, Job.dataset_id == dataset_id)
