"""Engines and sessions: built from the settings, one transaction per ``session_scope``."""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import anyio
import psycopg
from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from sqlalchemy import Engine, Select, create_engine, event
from sqlalchemy.dialects.postgresql import psycopg as pg_psycopg
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker

from service.errors import ServiceUnavailable

SQLITE_BUSY_TIMEOUT_S = 30.0
#: While reads fail, seconds between attempts to connect (every other read is answered 503 at once).
PROBE_EVERY_S = 0.25
_PG_DIALECT = pg_psycopg.dialect()  # type: ignore[no-untyped-call]


def _sqlite_on_connect(dbapi_connection: Any, connection_record: Any) -> None:
    """Per-connection SQLite set-up: WAL (readers do not block the writer) and enforced foreign keys."""
    if not isinstance(dbapi_connection, sqlite3.Connection):  # pragma: no cover (other sqlite drivers)
        return
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url``: ``pool_pre_ping`` everywhere; WAL, foreign keys and cross-thread use on SQLite.

    For a SQLite file the parent folder is created, so the embedded default works on first start.
    Extra keyword arguments go to :func:`sqlalchemy.create_engine`.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        connect_args = dict(kwargs.pop("connect_args", {}))
        connect_args.setdefault("check_same_thread", False)
        connect_args.setdefault("timeout", SQLITE_BUSY_TIMEOUT_S)
        engine = create_engine(url, pool_pre_ping=True, connect_args=connect_args, **kwargs)
        event.listen(engine, "connect", _sqlite_on_connect)
        return engine
    return create_engine(url, pool_pre_ping=True, **kwargs)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions bound to ``engine``; objects stay readable after commit (``expire_on_commit=False``)."""
    return sessionmaker(bind=engine, expire_on_commit=False)


@lru_cache(maxsize=64)
def _postgres_sql(statement: Select[Any]) -> str:
    """``statement`` compiled for psycopg, once (the cache holds the statement, so its key stays its own)."""
    return str(statement.compile(dialect=_PG_DIALECT))


def libpq_conninfo(url: str | URL) -> str:
    """The libpq connection string (``postgresql://…``) of a SQLAlchemy PostgreSQL URL, for psycopg itself."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class Reader:
    """Read-only queries for the routes clients poll, answered on the event loop where the database allows.

    On PostgreSQL a statement runs on a small :class:`psycopg_pool.AsyncConnectionPool` of
    autocommit connections (time zone UTC), compiled once to SQL by SQLAlchemy: no hop to the thread
    pool and no ORM, which on a small machine cost several times the query itself (a closed loop of
    50 clients on ``GET /v1/jobs/{id}``: ~500 answers a second through a session on a pool thread,
    see docs/service.md). A connection that broke (the database restarted) is replaced and the
    statement tried once more; a database that cannot be reached is a :class:`ServiceUnavailable`,
    answered within ``connect_timeout`` (a read waits that long at most for a pooled connection),
    and at once while reads are failing, until a probe connects again (:meth:`_probe`).

    The pool is opened by :meth:`start` on the loop that serves the application and closed by
    :meth:`close`. Before :meth:`start`, and on SQLite (the embedded default), statements run on the
    synchronous ``factory`` in the thread pool instead. Either way each statement reads one
    consistent snapshot and leaves no transaction open.
    """

    def __init__(self, url: str, factory: sessionmaker[Session], *, connect_timeout: float = 3.0,
                 max_size: int = 10) -> None:  # fmt: skip
        self.url, self.factory = make_url(url), factory
        self.connect_timeout, self.max_size = connect_timeout, max_size
        self.pool: AsyncConnectionPool[AsyncConnection[dict[str, Any]]] | None = None
        self._failing = False
        self._next_probe = 0.0
        self._retired: set[asyncio.Task[None]] = set()

    def _connect_kwargs(self) -> dict[str, Any]:
        return {"autocommit": True, "row_factory": dict_row, "connect_timeout": max(1, int(self.connect_timeout)),
                "options": "-c TimeZone=UTC"}  # fmt: skip

    async def _open_pool(self) -> None:
        self.pool = AsyncConnectionPool(
            libpq_conninfo(self.url),
            min_size=1,
            max_size=self.max_size,
            timeout=self.connect_timeout,
            kwargs=self._connect_kwargs(),
            connection_class=AsyncConnection[dict[str, Any]],
            open=False,
        )
        await self.pool.open(wait=False)

    async def start(self) -> None:
        if self.url.get_backend_name() == "postgresql" and self.pool is None:
            await self._open_pool()

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
            self.pool = None
        for task in list(self._retired):
            await task

    async def first(self, statement: Select[Any], **params: Any) -> dict[str, Any] | None:
        """The first row of ``statement`` (with its bound ``params``) as a dict by column name, or None."""
        if self.pool is None:
            return await anyio.to_thread.run_sync(functools.partial(self._first_sync, statement, params))
        sql = _postgres_sql(statement)
        if self._failing:
            await self._probe()
        for attempt in (1, 2):
            try:
                async with self.pool.connection() as connection:
                    cursor = await connection.execute(sql, params)
                    return await cursor.fetchone()
            except PoolTimeout as exc:
                self._failing = True
                raise ServiceUnavailable.database() from exc
            except psycopg.OperationalError as exc:  # a broken connection: the database restarted, or is away
                self._failing = True
                if attempt == 2:
                    raise ServiceUnavailable.database() from exc
                self._next_probe = 0.0
                await self._probe()  # 503 at once if it is away; else a new pool, and one more try
        raise AssertionError("unreachable")

    async def _probe(self) -> None:
        """While reads fail: answer 503 at once, except one connection attempt every :data:`PROBE_EVERY_S`.

        The pool keeps reconnecting by itself, but with a growing back-off (1 s, 2 s, 4 s …); a
        probe that connects ends the outage at once: a new pool takes the old one's place.
        """
        now = time.monotonic()
        if now < self._next_probe:
            raise ServiceUnavailable.database()
        self._next_probe = now + PROBE_EVERY_S
        try:
            probe = await AsyncConnection.connect(libpq_conninfo(self.url), **self._connect_kwargs())
            await probe.close()
        except psycopg.OperationalError as exc:
            raise ServiceUnavailable.database() from exc
        if not self._failing:  # another request's probe got there first
            return
        self._failing = False
        old = self.pool
        await self._open_pool()
        if old is not None:
            task = asyncio.create_task(old.close())
            self._retired.add(task)
            task.add_done_callback(self._retired.discard)

    def _first_sync(self, statement: Select[Any], params: dict[str, Any]) -> dict[str, Any] | None:
        with self.factory() as session:
            row = session.execute(statement, params).mappings().first()
            return None if row is None else dict(row)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit when the block ends normally, roll back when it raises.

    Repository functions only flush; this scope (or the request's session dependency) commits.
    """
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
