"""Jobs as last read, kept in the API process until PostgreSQL says they changed.

``GET /v1/jobs/{id}`` is what clients poll, often many of them on the same few jobs, while a job's
row changes at most about once a second (progress is written in batches). So each API process keeps
the answer it last read for a job and serves it from memory until the row changes. It learns of a
change from the database itself: a trigger on ``jobs`` (migration 0002) sends
``NOTIFY netsurgery_jobs, '<job id>'`` on every update and delete, whichever process made it (a
worker's progress, the reaper, another API process's cancel), and :meth:`JobCache.run` listens on
one connection of its own (:func:`service.repositories.jobs.listen_to_job_changes`) and drops that
job's entry.

What makes it safe to serve from memory:

- **Only while listening.** Entries are served only while the listening connection is up. When it
  breaks (the database restarted, the connection was killed) the cache empties and reads go to the
  database until a new connection listens again; then it starts empty.
- **No stale fill.** A read that raced a change must not be kept: :meth:`token` is taken before the
  read and :meth:`put` keeps the row only if no change arrived in between (any job's change: the
  check is global, cheap, and errs on the side of reading again).
- **Bounded age.** An entry is dropped after ``max_age`` seconds even if no change was announced,
  which bounds the damage of a bug here; changes normally arrive within milliseconds of their commit.
- **Own writes.** A route that changes a job in this process drops its entry right after its commit
  (:meth:`invalidate`), so a client that cancels and then reads sees its cancel at once.
- **Tenants.** An entry remembers its tenant; another tenant's read of that id is not served from
  it (it goes to the database and gets a 404).

Only PostgreSQL has ``LISTEN``; on SQLite (the embedded default) the cache never goes live and every
read goes to the database.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any, Final

import psycopg

from service.repositories import jobs

log = logging.getLogger(__name__)

#: Seconds between attempts to listen again after the connection broke.
RETRY_SECONDS: Final = 1.0


class JobCache:
    """Job answers by id, dropped when PostgreSQL announces a change (see the module).

    ``size``: entries kept (the oldest is dropped first past it); ``max_age``: seconds an entry is
    served at most. Everything here runs on the event loop of the application, so no lock is needed.
    """

    def __init__(self, size: int = 10_000, max_age: float = 30.0) -> None:
        self.size, self.max_age = size, max_age
        self._entries: dict[uuid.UUID, tuple[float, uuid.UUID, Any]] = {}
        self._changes = 0
        self.live = False
        self.hits = self.misses = 0

    def get(self, job_id: uuid.UUID, tenant_id: uuid.UUID) -> Any | None:
        """The cached answer for the tenant's job, or None (not cached, too old, another tenant's, not live)."""
        entry = self._entries.get(job_id) if self.live else None
        if entry is None or entry[1] != tenant_id or entry[0] < time.monotonic():
            self.misses += 1
            return None
        self.hits += 1
        return entry[2]

    def token(self) -> int:
        """Take before reading the row that will be :meth:`put`."""
        return self._changes

    def put(self, job_id: uuid.UUID, tenant_id: uuid.UUID, value: Any, token: int) -> None:
        """Keep ``value`` unless a change arrived since ``token`` was taken, or the cache is not live."""
        if not self.live or token != self._changes:
            return
        if job_id not in self._entries and len(self._entries) >= self.size:
            del self._entries[next(iter(self._entries))]
        self._entries[job_id] = (time.monotonic() + self.max_age, tenant_id, value)

    def invalidate(self, job_id: uuid.UUID) -> None:
        """Drop the job's entry (it changed)."""
        self._changes += 1
        self._entries.pop(job_id, None)

    def _clear(self, live: bool) -> None:
        self._changes += 1
        self._entries.clear()
        self.live = live

    async def run(self, conninfo: str, connect_timeout: float = 3.0) -> None:
        """Listen for changes until cancelled; while not listening nothing is served from memory.

        A lost or refused connection is logged once per outage, then tried again every
        :data:`RETRY_SECONDS`.
        """
        quiet = False
        while True:
            try:
                connection = await jobs.connect_listener(conninfo, connect_timeout)
            except psycopg.Error as exc:
                if not quiet:
                    log.warning("job cache: cannot connect to listen (%s); reading every job from the database", exc)
                    quiet = True
                await asyncio.sleep(RETRY_SECONDS)
                continue
            try:
                async with connection:
                    await jobs.listen_to_job_changes(connection)
                    self._clear(live=True)
                    if quiet:
                        log.info("job cache: listening again")
                        quiet = False
                    async for notice in connection.notifies():
                        try:
                            self.invalidate(uuid.UUID(notice.payload))
                        except ValueError:  # not one of ours: drop everything to be safe
                            self._clear(live=True)
            except psycopg.Error as exc:
                log.warning("job cache: listening connection lost (%s); reading every job from the database", exc)
                quiet = True
            finally:
                self._clear(live=False)
            await asyncio.sleep(RETRY_SECONDS)
