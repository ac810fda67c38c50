"""A CPU-only deployment refuses, at submit, a job whose estimated training time is over its limit.

Over real HTTP against Postgres: the FLOPs of one example recorded at upload (safetensors, a Hugging
Face folder, ONNX), the same model's job refused (422 ``exceeds_cpu_time_limit``, the estimate and
the limit in the message, no job row) or accepted as the limit moves, a GPU deployment never
refused; and the arithmetic of :mod:`service.estimates`.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import torch
from sqlalchemy import func, select

from dns_core import suite
from dns_core.defaults import BATCH_SIZE
from service.database import session_scope
from service.errors import ExceedsCpuTimeLimit
from service.estimates import (
    ENGINE_BATCH_SIZE,
    TrainingEstimate,
    check_cpu_time,
    duration,
    training_seconds,
    trains_on_cpu_only,
)
from service.orm import Job
from service.repositories import StoredUpload, models
from service.settings import Settings
from tests.api.conftest import REDIS_TEST_URL, LiveServer, http_settings, serve
from tests.api.test_http_uploads import lenet_safetensors, onnx_mlp, upload

#: An assumed CPU rate that makes the estimates round: 0.1 GFLOP/s.
RATE = 1e8
#: LeNet-300-100's forward pass, by hand: 2 FLOPs per multiply-add of its three layers.
LENET_FLOPS = 2 * (784 * 300 + 300 * 100 + 100 * 10)
#: A LeNet-300-100 job with the defaults (20,000 iterations, batches of 64) at RATE: 20,444 s, 5 h 41 min.
LENET_DEFAULT_SECONDS = 3 * LENET_FLOPS * 64 * 20_000 / RATE


@contextmanager
def _server(folder: Path, database_url: str, **overrides: Any) -> Iterator[LiveServer]:
    from api.app import create_app

    settings = http_settings(folder, database_url, REDIS_TEST_URL, cpu_flops_per_second=RATE, **overrides)
    app = create_app(settings)
    with serve(app) as url:
        yield LiveServer(url, app, settings, app.state.session_factory)


@pytest.fixture(scope="module")
def cpu(
    tmp_path_factory: pytest.TempPathFactory, _migrated_postgres_url: str, redis_queue: redis.Redis
) -> Iterator[LiveServer]:
    """A deployment whose workers train on CPUs (``device="cpu"``), with the default limit (6 hours)."""
    with _server(tmp_path_factory.mktemp("cpu"), _migrated_postgres_url, device="cpu") as server:
        yield server


@pytest.fixture(scope="module")
def gpu(
    tmp_path_factory: pytest.TempPathFactory, _migrated_postgres_url: str, redis_queue: redis.Redis
) -> Iterator[LiveServer]:
    """A deployment whose workers train on GPUs (``device="cuda"``), with a CPU limit of one second."""
    with _server(tmp_path_factory.mktemp("gpu"), _migrated_postgres_url, device="cuda", cpu_job_limit_seconds=1) as s:
        yield s


@contextmanager
def cpu_limit(server: LiveServer, seconds: float) -> Iterator[None]:
    """The server's ``cpu_job_limit_seconds`` set to ``seconds`` for a while (read at each submit)."""
    before: Settings = server.app.state.settings
    server.app.state.settings = before.model_copy(update={"cpu_job_limit_seconds": seconds})
    try:
        yield
    finally:
        server.app.state.settings = before


@contextmanager
def tenant_client(server: LiveServer) -> Iterator[tuple[uuid.UUID, httpx.Client]]:
    tenant_id, key = server.new_tenant()
    with server.client(key) as client:
        yield tenant_id, client


def lenet_and_digits(client: httpx.Client, tmp_path: Path) -> tuple[dict[str, Any], str]:
    """A LeNet-300-100 uploaded as safetensors (the model as read back) and the built-in digits' id."""
    r = upload(client, "/v1/models", lenet_safetensors(tmp_path), "lenet.safetensors")
    assert r.status_code == 201, r.text
    data = client.post("/v1/datasets", json={"builtin": "digits"})
    assert data.status_code == 201, data.text
    return r.json(), data.json()["id"]


def submit(
    client: httpx.Client, model_id: str, dataset_id: str, key: str | None = None, **settings: int
) -> httpx.Response:
    body = {"model_id": model_id, "dataset_id": dataset_id, "method": "dns", "target": {"compression": 5}}
    headers = {"Idempotency-Key": key} if key else {}
    return client.post("/v1/jobs", json=body | {"settings": settings}, headers=headers)


def job_rows(server: LiveServer, tenant_id: uuid.UUID) -> int:
    with session_scope(server.factory) as session:
        return int(session.scalar(select(func.count()).select_from(Job).where(Job.tenant_id == tenant_id)) or 0)


# -- the count recorded at upload -------------------------------------------------------------------


def test_upload_records_flops_per_example_at_each_door(cpu: LiveServer, tmp_path: Path) -> None:
    with tenant_client(cpu) as (_, client):
        lenet, _ = lenet_and_digits(client, tmp_path)
        assert lenet["flops_per_example"] == LENET_FLOPS
        assert client.get(f"/v1/models/{lenet['id']}").json()["flops_per_example"] == LENET_FLOPS

        r = upload(client, "/v1/models", onnx_mlp(), "mlp.onnx")  # a 4-8-3 MLP: two Gemms
        assert r.status_code == 201, r.text
        assert r.json()["flops_per_example"] == 2 * (4 * 8 + 8 * 3)

        folder = suite.write_suite_folder("bert", tmp_path / "bert-tiny")
        files = [("file", (p.name, p.read_bytes())) for p in sorted(folder.iterdir()) if p.is_file()]
        r = client.post("/v1/models", files=files)
        assert r.status_code == 201, r.text
        bert = r.json()
        length = 16  # the suite's BERT reads 16 tokens
        # about 2 FLOPs per parameter per token: the embeddings are lookups, attention adds its own products
        assert length * bert["parameter_count"] <= bert["flops_per_example"] <= 2 * length * bert["parameter_count"]


# -- the check at submit ---------------------------------------------------------------------------------


def test_a_job_over_the_limit_is_refused_with_its_estimate_and_nothing_written(cpu: LiveServer, tmp_path: Path) -> None:
    with tenant_client(cpu) as (tenant_id, client), cpu_limit(cpu, 3600):
        model, data = lenet_and_digits(client, tmp_path)
        r = submit(client, model["id"], data)  # the defaults: 20,000 iterations, batches of 64
        assert r.status_code == 422, r.text
        body = r.json()
        assert set(body) == {"error", "detail"} and body["error"] == "exceeds_cpu_time_limit"
        detail = body["detail"]
        assert duration(LENET_DEFAULT_SECONDS) == "5 h 41 min"
        expected = (
            "estimated 5 h 41 min", "limit of 1 h 0 min", "20,000 iterations", "batches of 64",
            "0.000532 GFLOP forward per example", "0.1 GFLOP/s", "at most 3,521 iterations", "GPU workers",
        )  # fmt: skip
        for words in expected:
            assert words in detail, (words, detail)

        r = submit(client, model["id"], data, batch_size=4096, iterations=100)  # the job's own batch size counts
        assert (
            r.status_code == 422 and "batches of 4,096" in r.json()["detail"] and "100 iterations" in r.json()["detail"]
        )

        assert job_rows(cpu, tenant_id) == 0
        assert client.get("/v1/jobs").json()["total"] == 0

        r = submit(client, model["id"], data, iterations=3_521)  # the most that fit: 3,599 s
        assert r.status_code == 202, r.text
        assert job_rows(cpu, tenant_id) == 1


def test_the_same_job_is_accepted_when_the_limit_is_above_or_off(cpu: LiveServer, tmp_path: Path) -> None:
    with tenant_client(cpu) as (tenant_id, client):
        model, data = lenet_and_digits(client, tmp_path)
        with cpu_limit(cpu, LENET_DEFAULT_SECONDS - 1):
            assert submit(client, model["id"], data).status_code == 422
        assert submit(client, model["id"], data).status_code == 202  # the default limit: 6 hours
        with cpu_limit(cpu, 0):  # no limit
            assert submit(client, model["id"], data, iterations=10_000_000).status_code == 202
        assert job_rows(cpu, tenant_id) == 2


def test_a_replayed_idempotency_key_still_returns_its_job(cpu: LiveServer, tmp_path: Path) -> None:
    with tenant_client(cpu) as (tenant_id, client):
        model, data = lenet_and_digits(client, tmp_path)
        first = submit(client, model["id"], data, key="long-run")
        assert first.status_code == 202, first.text
        with cpu_limit(cpu, 60):  # the limit was lowered since
            again = submit(client, model["id"], data, key="long-run")
            assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
            assert again.headers["Idempotent-Replayed"] == "true"
            assert submit(client, model["id"], data, key="another").status_code == 422
        assert job_rows(cpu, tenant_id) == 1


def test_a_model_without_a_count_is_never_refused(cpu: LiveServer, tmp_path: Path) -> None:
    """Models uploaded before the count was recorded have none (NULL): no estimate, no refusal."""
    with tenant_client(cpu) as (tenant_id, client), cpu_limit(cpu, 1):
        _, data = lenet_and_digits(client, tmp_path)
        with session_scope(cpu.factory) as session:
            stored = StoredUpload(uuid.uuid4(), "old", 1_066_000, "0" * 64, "file:///tmp/model.onnx")
            old = models.create_model(session, tenant_id, stored, models.ModelFacts("onnx", 266_610))
            old_id = str(old.id)
        assert client.get(f"/v1/models/{old_id}").json()["flops_per_example"] is None
        assert submit(client, old_id, data, iterations=10_000_000).status_code == 202


def test_a_gpu_deployment_is_never_refused(gpu: LiveServer, tmp_path: Path) -> None:
    assert gpu.app.state.cpu_only is False
    with tenant_client(gpu) as (tenant_id, client):
        model, data = lenet_and_digits(client, tmp_path)
        assert model["flops_per_example"] == LENET_FLOPS  # counted there too
        r = submit(client, model["id"], data, iterations=10_000_000)  # about 12 days at RATE
        assert r.status_code == 202, r.text
        assert job_rows(gpu, tenant_id) == 1


def test_cpu_only_is_settled_from_the_device_and_cuda(
    cpu: LiveServer, _migrated_postgres_url: str, tmp_path: Path
) -> None:
    from api.app import create_app

    assert cpu.app.state.cpu_only is True
    app = create_app(http_settings(tmp_path, _migrated_postgres_url, REDIS_TEST_URL))  # device "auto"
    try:
        assert app.state.cpu_only is (not torch.cuda.is_available())
    finally:
        app.state.celery.close()
        app.state.engine.dispose()
    assert trains_on_cpu_only("cpu", True) and trains_on_cpu_only("auto", False) and trains_on_cpu_only(" CPU ", True)
    assert not trains_on_cpu_only("auto", True)
    assert not any(trains_on_cpu_only(d, False) for d in ("cuda", "cuda:1"))


def test_openapi_lists_the_refusal_on_job_creation(cpu: LiveServer) -> None:
    with httpx.Client(base_url=cpu.url) as client:
        responses = client.get("/openapi.json").json()["paths"]["/v1/jobs"]["post"]["responses"]
    assert "`exceeds_cpu_time_limit`" in responses["422"]["description"]
    assert responses["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")


# -- the arithmetic ----------------------------------------------------------------------------------------


def test_training_seconds_is_forward_and_backward_of_every_batch() -> None:
    assert training_seconds(LENET_FLOPS, 20_000, 64, RATE) == pytest.approx(LENET_DEFAULT_SECONDS)
    assert training_seconds(1_000_000, 100, 10, 3e9) == pytest.approx(1.0)  # 3 × 1 MFLOP × 10 × 100 = 3 GFLOP
    assert training_seconds(1_000_000, 200, 10, 3e9) == pytest.approx(2 * training_seconds(1_000_000, 100, 10, 3e9))
    assert training_seconds(1_000_000, 0, 10, 3e9) == 0
    with pytest.raises(ValueError):
        training_seconds(1, 1, 1, 0)


def test_the_estimate_takes_the_jobs_settings_or_the_defaults() -> None:
    settings = Settings(default_iterations=1234, cpu_flops_per_second=RATE)
    assert TrainingEstimate.of(settings, 10, {}) == TrainingEstimate(10, 1234, ENGINE_BATCH_SIZE, RATE)
    assert TrainingEstimate.of(settings, 10, {"iterations": 7, "batch_size": 3}) == TrainingEstimate(10, 7, 3, RATE)
    assert ENGINE_BATCH_SIZE == BATCH_SIZE  # the engine's default, copied into the torch-free service core


def test_check_cpu_time_and_its_message() -> None:
    estimate = TrainingEstimate(LENET_FLOPS, 20_000, 64, RATE)
    check_cpu_time(estimate, 0)  # no limit
    check_cpu_time(estimate, estimate.seconds)  # at the limit: accepted
    with pytest.raises(ExceedsCpuTimeLimit) as refused:
        check_cpu_time(estimate, 21 * 60)
    assert refused.value.status_code == 422 and refused.value.code == "exceeds_cpu_time_limit"
    assert "estimated 5 h 41 min" in refused.value.detail and "limit of 21 min" in refused.value.detail
    assert "at 0.102 GFLOP a step" in refused.value.detail  # 3 × 532,400 × 64
    with pytest.raises(ExceedsCpuTimeLimit, match="even one iteration"):
        check_cpu_time(TrainingEstimate(10**12, 1, 64, RATE), 60)


def test_durations_read_in_hours_and_minutes() -> None:
    assert [duration(s) for s in (0, 42.4, 60, 754, 3600, 6 * 3600, 26_640, 10**7)] == [
        "0 s", "42 s", "1 min", "13 min", "1 h 0 min", "6 h 0 min", "7 h 24 min", "2,777 h 47 min",
    ]  # fmt: skip


def test_the_limit_settings() -> None:
    defaults = Settings()
    assert defaults.cpu_job_limit_seconds == 6 * 3600 and defaults.cpu_flops_per_second > 0
    with pytest.raises(ValueError):
        Settings(cpu_job_limit_seconds=-1)
    with pytest.raises(ValueError):
        Settings(cpu_flops_per_second=0)
