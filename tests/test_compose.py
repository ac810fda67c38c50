"""docker-compose.yml and the Dockerfile against the code they start (no Docker daemon needed).

These machines have no Docker daemon and no registry access, so the file is not run here (see
docs/service.md). What can drift silently is checked instead: every setting it passes is one the
service reads and accepts, its commands exist, the services wait for what they need, workers
reserve a GPU each, and the image carries every package and the migrations.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from netsurgery.cli import build_parser
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service["environment"]
    merged = dict(env.get("<<", {})) if "<<" in env else {}
    merged.update({k: v for k, v in env.items() if k != "<<"})
    return {k: str(v) for k, v in merged.items()}


def test_every_setting_passed_is_read_and_valid(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    known = {f"NETSURGERY_{name.upper()}" for name in Settings.model_fields}
    for name in ("api", "worker"):
        env = environment(compose["services"][name])
        ours = {k for k in env if k.startswith("NETSURGERY_")}
        assert ours and ours <= known, (name, sorted(ours - known))
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        settings = Settings()  # the values parse and pass the settings' own checks
        assert settings.database_url.startswith("postgresql+psycopg://")
        assert settings.broker_url.startswith("redis://") and settings.storage_url.startswith("s3://")
        assert env["FSSPEC_S3_ENDPOINT_URL"].startswith("http://minio:")
    assert environment(compose["services"]["worker"])["NETSURGERY_DEVICE"] == "cuda"


def test_commands_exist_and_order_is_right(compose: dict[str, Any]) -> None:
    services = compose["services"]
    api_command = " ".join(services["api"]["command"])
    assert api_command.index("netsurgery migrate") < api_command.index("uvicorn --factory api.app:create_app")
    assert "--http api.server:JsonErrorsProtocol" in api_command  # a request uvicorn cannot parse gets JSON too
    parser = build_parser()
    parser.parse_args(["migrate"])  # the subcommands the file and its comments use exist
    parser.parse_args(shlex.split("admin create-tenant acme"))
    parser.parse_args(services["worker"]["command"][1:])
    assert services["api"]["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "redis": {"condition": "service_healthy"},
        "make-bucket": {"condition": "service_completed_successfully"},
    }
    assert "/readyz" in " ".join(services["api"]["healthcheck"]["test"])
    assert services["worker"]["depends_on"] == {"api": {"condition": "service_healthy"}}
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def test_the_image_carries_the_whole_project() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    copied = {line.split()[1] for line in dockerfile.splitlines() if line.startswith("COPY ")}
    for package in ("dns_core", "service", "api", "worker", "netsurgery", "migrations"):
        assert package in copied, package
    assert "alembic.ini" in dockerfile and 'pip install -e ".[service,s3]"' in dockerfile
    assert "TORCH_VERSION=2.13.0" in dockerfile  # the version the project is tested with
