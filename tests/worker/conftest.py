"""The worker tests share the service tests' databases (migrated Postgres and SQLite, once per session)."""

from tests.api.conftest import _migrated_postgres_url, _migrated_sqlite_url, engine, factory  # noqa: F401
