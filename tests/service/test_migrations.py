"""Migrations: up to head, down to base, up again, and no difference from the models, on both backends."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from service.database import make_engine
from service.migrate import downgrade, upgrade
from service.orm import Base

BACKENDS = ["postgres_url", "sqlite_url"]


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _diff(url: str) -> list[object]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return list(compare_metadata(MigrationContext.configure(connection), Base.metadata))
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", BACKENDS)
def test_upgrade_downgrade_upgrade(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url: str = request.getfixturevalue(backend)
    monkeypatch.chdir(tmp_path)  # no alembic.ini here: the helpers must find the scripts themselves
    model_tables = set(Base.metadata.tables)

    upgrade(url)
    assert _tables(url) == model_tables | {"alembic_version"}

    downgrade(url)
    assert _tables(url) <= {"alembic_version"}

    upgrade(url)
    assert _tables(url) == model_tables | {"alembic_version"}
    assert _diff(url) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_compare_finds_a_schema_drift(backend: str, request: pytest.FixtureRequest) -> None:
    """The no-difference check above can fail: an index missing from the database is reported."""
    url: str = request.getfixturevalue(backend)
    upgrade(url)
    engine = make_engine(url)
    with engine.begin() as connection:
        connection.execute(text("DROP INDEX ix_jobs_state_lease_expires_at"))
    engine.dispose()

    diff = _diff(url)
    assert [d[0] for d in diff if isinstance(d, tuple)] == ["add_index"]
