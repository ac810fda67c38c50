"""Settings: environment prefix, defaults under the data folder, refusal of a lease shorter than a heartbeat."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import Settings, get_settings


def test_defaults_live_under_the_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NETSURGERY_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("NETSURGERY_DATABASE_URL", raising=False)
    monkeypatch.delenv("NETSURGERY_STORAGE_URL", raising=False)
    settings = Settings()
    assert settings.database_url == f"sqlite:///{tmp_path / 'netsurgery.db'}"
    assert settings.storage_url == str(tmp_path / "storage")
    assert settings.max_upload_bytes == 512 * 1024 * 1024
    assert settings.progress_flush_seconds == 1.0


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NETSURGERY_DATABASE_URL", "postgresql+psycopg://svc@db/netsurgery")
    monkeypatch.setenv("NETSURGERY_STORAGE_URL", "s3://bucket/prefix")
    monkeypatch.setenv("NETSURGERY_BROKER_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("NETSURGERY_LEASE_SECONDS", "300")
    settings = Settings()
    assert settings.database_url == "postgresql+psycopg://svc@db/netsurgery"
    assert settings.storage_url == "s3://bucket/prefix"
    assert settings.broker_url == "redis://127.0.0.1:6379/0"
    assert settings.lease_seconds == 300.0


def test_invalid_values_are_refused() -> None:
    with pytest.raises(ValidationError, match="heartbeat_seconds"):
        Settings(lease_seconds=10, heartbeat_seconds=10)
    with pytest.raises(ValidationError):
        Settings(max_upload_bytes=0)


def test_get_settings_is_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    get_settings.cache_clear()
    try:
        first = get_settings()
        monkeypatch.setenv("NETSURGERY_CHECKPOINT_EVERY", str(first.checkpoint_every + 1))
        assert get_settings() is first
        get_settings.cache_clear()
        assert get_settings().checkpoint_every == first.checkpoint_every + 1
    finally:
        get_settings.cache_clear()
