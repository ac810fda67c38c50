"""Databases for the service tests: fresh Postgres databases (skipped when Postgres is down) and SQLite files."""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis
import uvicorn
from psycopg import sql
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from service.database import make_engine, make_session_factory, session_scope
from service.migrate import upgrade
from service.queue import QUEUE
from service.repositories import tenants
from service.settings import Settings
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


# ------------------------------------------------------------------------------------ live HTTP

# Redis database the HTTP tests send job messages to (their own index; only the "jobs" key is touched)
REDIS_TEST_URL = os.environ.get("NETSURGERY_TEST_REDIS", "redis://127.0.0.1:6379/15")
# the test servers' upload cap: big enough for LeNet-300-100 weights (1.07 MB), small enough to pass quickly
HTTP_MAX_UPLOAD = 2 * 1024 * 1024


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """Run ``app`` with uvicorn on a free loopback port in a background thread; its base URL."""
    from api.server import JsonErrorsProtocol

    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="warning", access_log=False, lifespan="on", http=JsonErrorsProtocol
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@dataclass(frozen=True)
class LiveServer:
    """A running API: its URL, app, settings, and the folders tests look into."""

    url: str
    app: Any
    settings: Settings
    factory: sessionmaker[Session]

    @property
    def storage_root(self) -> Path:
        return Path(self.settings.storage_url)

    @property
    def upload_root(self) -> Path:
        return self.settings.data_dir / "upload-tmp"

    def stored_files(self) -> set[Path]:
        return {p for p in self.storage_root.rglob("*") if p.is_file()}

    def new_tenant(self) -> tuple[uuid.UUID, str]:
        """A committed tenant and its plaintext API key."""
        with session_scope(self.factory) as session:
            tenant, key = tenants.create_tenant(session, f"http-{uuid.uuid4().hex[:12]}")
            return tenant.id, key

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


@pytest.fixture(scope="session")
def redis_queue() -> Iterator[redis.Redis]:
    """The test broker's Redis database; its "jobs" list is emptied before and after the session."""
    client = redis.Redis.from_url(REDIS_TEST_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.skip(f"Redis unreachable at {REDIS_TEST_URL} (set NETSURGERY_TEST_REDIS): {exc}")
    client.delete(QUEUE)
    yield client
    client.delete(QUEUE)
    client.close()


#: short, so that the revocation test can wait it out
AUTH_CACHE_SECONDS = 0.5


#: the shared test servers run without rate limits and quotas (tests/api/test_http_limits.py turns them on):
#: the other tests' request rates and job counts are not what they test
NO_LIMITS: dict[str, Any] = {
    "rate_limit_per_second": 0,
    "max_active_jobs_per_tenant": 0,
    "max_stored_bytes_per_tenant": 0,
}


def http_settings(data_dir: Path, database_url: str, broker_url: str, **overrides: Any) -> Settings:
    """The test servers' settings; ``overrides`` set other fields (limits, for example)."""
    fields: dict[str, Any] = {
        "data_dir": data_dir,
        "database_url": database_url,
        "broker_url": broker_url,
        "storage_url": str(data_dir / "storage"),
        "max_upload_bytes": HTTP_MAX_UPLOAD,
        "auth_cache_seconds": AUTH_CACHE_SECONDS,
        **NO_LIMITS,
    }
    return Settings(**(fields | overrides))


@pytest.fixture(scope="session")
def live(
    tmp_path_factory: pytest.TempPathFactory, _migrated_postgres_url: str, redis_queue: redis.Redis
) -> Iterator[LiveServer]:
    """The API on a migrated Postgres database and the Redis test broker, served over real HTTP."""
    from api.app import create_app

    settings = http_settings(tmp_path_factory.mktemp("http"), _migrated_postgres_url, REDIS_TEST_URL)
    app = create_app(settings)
    with serve(app) as url:
        yield LiveServer(url, app, settings, app.state.session_factory)


@pytest.fixture(scope="module")
def tenant(live: LiveServer) -> str:
    """A tenant of the shared test server for one test module; its API key."""
    return live.new_tenant()[1]


@pytest.fixture
def client(live: LiveServer, tenant: str) -> Iterator[httpx.Client]:
    """An HTTP client of the module's tenant."""
    with live.client(tenant) as c:
        yield c
