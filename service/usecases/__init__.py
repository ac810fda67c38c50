"""The use cases: what a client asks of the service, one unit of work each, for the HTTP layer to call.

Each use case runs its repository calls in the caller's session, commits, and only then does what
must follow the commit: a job is enqueued once its row is committed, stored files are removed once
their rows' delete is committed. A file is stored before its row is inserted, and removed again if
the insert or the commit fails, so neither a row without its file nor a file without its row stays.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from sqlalchemy.orm import Session

from service.errors import NotFound
from service.repositories import OwnedT, Page, UploadRows
from service.storage import Storage, Stored

log = logging.getLogger(__name__)

T = TypeVar("T")


class StagedFile(Protocol):
    """A complete file on local disk, with the size and sha256 counted while it was received."""

    @property
    def path(self) -> Path: ...

    @property
    def size(self) -> int: ...

    @property
    def sha256(self) -> str: ...


def put_staged(storage: Storage, key: str, staged: StagedFile) -> Stored:
    """Copy ``staged`` into the store under ``key``; ``RuntimeError`` if the stored copy differs from it."""
    stored = storage.put_file(key, staged.path)
    if (stored.size, stored.sha256) != (staged.size, staged.sha256):
        raise RuntimeError(f"stored copy of the upload differs from what was received ({stored} vs {staged})")
    return stored


@contextlib.contextmanager
def stored_and_recorded(session: Session, storage: Storage, prefix: str) -> Iterator[None]:
    """Store files under ``prefix`` and insert their rows in the block, then commit.

    On any failure (a store, the insert, the commit) the transaction is rolled back and everything
    under ``prefix`` removed: neither the files nor the rows stay.
    """
    try:
        yield
        session.commit()
    except BaseException:
        session.rollback()
        storage.delete_prefix(prefix)
        raise


def remove_stored(storage: Storage, *prefixes: str) -> None:
    """Remove stored files after their rows' delete was committed; a failure is logged, not raised."""
    for prefix in prefixes:
        try:
            storage.delete_prefix(prefix)
        except Exception:  # the row is gone; an orphaned blob is only wasted space
            log.exception("could not remove stored files under %s", prefix)


def found(row: T | None, what: str, row_id: uuid.UUID) -> T:
    """``row``, or :class:`NotFound` when a tenant-scoped read found nothing (missing, or another tenant's)."""
    if row is None:
        raise NotFound(f"{what} {row_id} not found")
    return row


class StoredUploads(Generic[OwnedT]):
    """Read, list and delete a tenant's models or datasets: the rows (``rows``) and their stored files.

    ``what`` names one in errors ("model"); ``prefix`` gives the storage prefix of a row's files.
    """

    def __init__(self, what: str, rows: UploadRows[OwnedT], prefix: Callable[[uuid.UUID], str]) -> None:
        self.what: str = what
        self.rows: UploadRows[OwnedT] = rows
        self.prefix: Callable[[uuid.UUID], str] = prefix

    def get(self, session: Session, tenant_id: uuid.UUID, row_id: uuid.UUID) -> OwnedT:
        """The tenant's row; :class:`~service.errors.NotFound` if missing or another tenant's."""
        return found(self.rows.get(session, tenant_id, row_id), self.what, row_id)

    def list(self, session: Session, tenant_id: uuid.UUID, *, limit: int = 50, offset: int = 0) -> Page[OwnedT]:
        """The tenant's rows, newest first."""
        return self.rows.list(session, tenant_id, limit=limit, offset=offset)

    def delete(self, session: Session, storage: Storage, tenant_id: uuid.UUID, row_id: uuid.UUID) -> None:
        """Delete the row (committed), then its stored files; :class:`~service.errors.Conflict` while a job uses it."""
        if not self.rows.delete(session, tenant_id, row_id):
            raise NotFound(f"{self.what} {row_id} not found")
        session.commit()
        remove_stored(storage, self.prefix(row_id))
