"""Databases for the service tests: fresh Postgres databases (skipped when Postgres is down) and SQLite files."""

from __future__ import annotations

import os
import secrets
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from api.database import make_engine, make_session_factory
from api.migrate import upgrade
from tests.api.factories import new_job, new_tenant

# libpq URL of a Postgres server where the tests may create and drop databases
POSTGRES_ADMIN_URL = os.environ.get("NETSURGERY_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


def _admin_connection() -> psycopg.Connection[tuple[object, ...]]:
    try:
        return psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"Postgres unreachable at {POSTGRES_ADMIN_URL} (set NETSURGERY_TEST_POSTGRES): {exc}")


def _sqlalchemy_url(admin_url: str, database: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(admin_url)
    user = info.get("user", "postgres")
    password = f":{info['password']}" if info.get("password") else ""
    host = info.get("host", "127.0.0.1")
    port = info.get("port", "5432")
    return f"postgresql+psycopg://{user}{password}@{host}:{port}/{database}"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A new, empty Postgres database with a unique name; dropped (connections forced off) afterwards."""
    with _postgres_database() as url:
        yield url


@pytest.fixture(scope="session")
def _migrated_postgres_url() -> Iterator[str]:
    with _postgres_database() as url:
        upgrade(url)
        yield url


@contextmanager
def _postgres_database() -> Iterator[str]:
    admin = _admin_connection()
    name = f"ns_test_{secrets.token_hex(6)}"
    try:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield _sqlalchemy_url(POSTGRES_ADMIN_URL, name)
        finally:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    finally:
        admin.close()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite file URL in the test's temporary folder (the file does not exist yet)."""
    return f"sqlite:///{tmp_path / 'netsurgery.db'}"


@pytest.fixture(scope="session")
def _migrated_sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'netsurgery.db'}"
    upgrade(url)
    return url


@pytest.fixture(scope="session", params=["postgresql", "sqlite"])
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    """An engine on a database migrated to head, once per backend for the session.

    Tests share it; each one works in its own tenant, so they need no clean-up between them.
    """
    fixture = "_migrated_postgres_url" if request.param == "postgresql" else "_migrated_sqlite_url"
    url: str = request.getfixturevalue(fixture)
    engine = make_engine(url)
    yield engine
    engine.dispose()


@pytest.fixture
def factory(engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(engine)


@pytest.fixture
def session(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session on the shared database; what the test commits stays (in the test's own tenant)."""
    with factory() as session:
        yield session
        session.rollback()


@pytest.fixture
def tenant_id(factory: sessionmaker[Session]) -> uuid.UUID:
    return new_tenant(factory)


@pytest.fixture
def job_id(factory: sessionmaker[Session], tenant_id: uuid.UUID) -> uuid.UUID:
    return new_job(factory, tenant_id)
