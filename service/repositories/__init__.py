"""The repository layer: every SQL statement the service runs lives in this package.

One module per resource: :mod:`~service.repositories.tenants` (tenants and API keys),
:mod:`~service.repositories.models`, :mod:`~service.repositories.datasets`,
:mod:`~service.repositories.jobs` (jobs, progress, per-layer points, artifacts, change notices),
:mod:`~service.repositories.stats` (quota counts and service figures) and
:mod:`~service.repositories.jobstate` (every change of a job's state, lease and attempt). This
module holds what they share: paging and dialect helpers.

Functions take the caller's ``Session`` and flush at most; the request or task scope commits.
Reads of tenant-owned rows take the ``tenant_id`` and return None for another tenant's row, the
same as for a missing one. Functions that read a job's children by ``job_id`` alone (progress,
layer points) expect the caller to have read the job through :func:`~service.repositories.jobs.get_job`
first.

Deletes: deleting a tenant removes everything it owns (``ON DELETE CASCADE``); deleting a job
removes its progress, layer points and artifact rows, and is refused (:class:`~service.errors.Conflict`)
while the job is queued or running; deleting a model or dataset that a job uses is refused. Stored
files are not touched here: callers read the URIs first and remove the objects after the commit.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

from sqlalchemy import ColumnElement, Insert, Select, delete, exists, func, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import InstrumentedAttribute, Session

from service.errors import Conflict
from service.orm import Dataset, Model

T = TypeVar("T")
OwnedT = TypeVar("OwnedT", Model, Dataset)

MAX_PAGE: Final = 1000


# ---------------------------------------------------------------------------------------- paging


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a listing and the number of rows across all pages."""

    items: list[T]
    total: int
    limit: int
    offset: int


def check_page(limit: int, offset: int) -> None:
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit must be within 1..{MAX_PAGE}, got {limit}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")


def page(
    session: Session,
    entity: type[T],
    conditions: Sequence[ColumnElement[bool]],
    order_by: Sequence[Any],
    limit: int,
    offset: int,
) -> Page[T]:
    check_page(limit, offset)
    total = session.scalar(select(func.count()).select_from(entity).where(*conditions)) or 0
    stmt: Select[T] = select(entity).where(*conditions).order_by(*order_by).limit(limit).offset(offset)
    return Page(items=list(session.scalars(stmt)), total=total, limit=limit, offset=offset)


def insert(session: Session, row: T) -> T:
    """Add ``row`` and flush it (the caller's scope commits)."""
    session.add(row)
    session.flush()
    return row


def deleted_any(result: Iterable[Any]) -> bool:
    """Whether a ``DELETE … RETURNING`` (or a guarded ``UPDATE … RETURNING``) matched a row."""
    return next(iter(result), None) is not None


def insert_ignoring(session: Session, entity: type[Any], keys: list[str]) -> Insert:
    """``INSERT INTO entity … ON CONFLICT (keys) DO NOTHING`` in the session's dialect."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(entity).on_conflict_do_nothing(index_elements=keys)
    if dialect == "sqlite":
        return sqlite.insert(entity).on_conflict_do_nothing(index_elements=keys)
    raise NotImplementedError(f"insert-or-ignore on {dialect!r}")  # pragma: no cover


def ping(session: Session) -> None:
    """Run ``SELECT 1``: raises when the database cannot be reached (the readiness probe)."""
    session.execute(text("SELECT 1"))


# ------------------------------------------------------------------------------- stored uploads


@dataclass(frozen=True, slots=True)
class StoredUpload:
    """The columns an uploaded model or data set gets from storing it.

    ``id`` is the one its storage keys use, ``uri`` the stored key, ``size_bytes`` and ``sha256``
    what the store counted.
    """

    id: uuid.UUID
    name: str
    size_bytes: int
    sha256: str
    uri: str


class UploadRows(Generic[OwnedT]):
    """The tenant-scoped read, listing and delete of models or datasets (``entity``).

    ``used_by`` is the jobs column that refers to a row: a row a job uses is not deleted.
    """

    def __init__(self, entity: type[OwnedT], used_by: InstrumentedAttribute[uuid.UUID]) -> None:
        self.entity: type[OwnedT] = entity
        self.used_by: InstrumentedAttribute[uuid.UUID] = used_by

    def get(self, session: Session, tenant_id: uuid.UUID, row_id: uuid.UUID) -> OwnedT | None:
        """The tenant's row ``row_id``; None if missing or another tenant's."""
        entity: type[OwnedT] = self.entity
        return session.scalar(select(entity).where(entity.id == row_id, entity.tenant_id == tenant_id))

    def list(self, session: Session, tenant_id: uuid.UUID, *, limit: int = 50, offset: int = 0) -> Page[OwnedT]:
        """The tenant's rows, newest first."""
        entity: type[OwnedT] = self.entity
        newest_first = [entity.created_at.desc(), entity.id.desc()]
        return page(session, entity, [entity.tenant_id == tenant_id], newest_first, limit, offset)

    def same_file(self, session: Session, tenant_id: uuid.UUID, sha256: str, size_bytes: int) -> Sequence[OwnedT]:
        """The tenant's rows whose stored file has this sha256 and size, oldest first (duplicates of an upload)."""
        entity: type[OwnedT] = self.entity
        stmt = (
            select(entity)
            .where(entity.tenant_id == tenant_id, entity.sha256 == sha256, entity.size_bytes == size_bytes)
            .order_by(entity.created_at, entity.id)
        )
        return session.scalars(stmt).all()

    def delete(self, session: Session, tenant_id: uuid.UUID, row_id: uuid.UUID) -> bool:
        """Delete the tenant's row ``row_id`` unless a job refers to it.

        False if there is no such row; :class:`Conflict` while a job refers to it.
        """
        entity: type[OwnedT] = self.entity
        result = session.execute(
            delete(entity)
            .where(entity.id == row_id, entity.tenant_id == tenant_id, ~exists().where(self.used_by == row_id))
            .returning(entity.id)
        )
        if deleted_any(result):
            return True
        if self.get(session, tenant_id, row_id) is not None:
            raise Conflict(f"{entity.__tablename__.removesuffix('s')} {row_id} is used by a job; delete the job first")
        return False
