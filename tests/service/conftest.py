"""The service core's tests share the HTTP tests' databases (migrated Postgres and SQLite, once per session)."""

from tests.api.conftest import (  # noqa: F401
    _migrated_postgres_url,
    _migrated_sqlite_url,
    engine,
    factory,
    job_id,
    postgres_url,
    session,
    sqlite_url,
    tenant_id,
)
