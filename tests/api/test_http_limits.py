"""Rate limits and quotas over real HTTP, with real Redis and Postgres: 429 with ``Retry-After``.

Servers here are built with small limits. Two of them on one Redis share each key's budget (as API
processes on several machines do); the in-process limiter limits a single server; a Redis that
cannot be reached lets requests through. Quotas (active jobs, stored bytes) are counted in Postgres.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from pydantic import ValidationError

from api.app import create_app
from api.limits import REDIS_PREFIX, LocalRateLimiter, RedisRateLimiter
from service.database import session_scope
from service.repositories import jobstate, tenants
from service.settings import Settings
from tests.api.conftest import LiveServer, closed_port, http_settings, serve
from tests.api.test_http_uploads import npz_bytes, onnx_mlp

# Redis database for the shared counters (its own index; only netsurgery:rate:* keys are touched)
REDIS_LIMITS_URL = os.environ.get("NETSURGERY_TEST_REDIS_LIMITS", "redis://127.0.0.1:6379/14")
# slow enough that a burst of requests always lands within one interval, even on a loaded machine
RATE = 0.5
BURST = 5


@pytest.fixture(scope="module")
def limits_redis() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_LIMITS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.skip(f"Redis unreachable at {REDIS_LIMITS_URL} (set NETSURGERY_TEST_REDIS_LIMITS): {exc}")
    _clear(client)
    yield client
    _clear(client)
    client.close()


def _clear(client: redis.Redis) -> None:
    for name in client.scan_iter(match=f"{REDIS_PREFIX}*"):
        client.delete(name)


@contextmanager
def server(data_dir: Path, database_url: str, broker_url: str = "filesystem://", **limits: Any) -> Iterator[LiveServer]:
    """An API with ``limits`` on a migrated database, over HTTP (a filesystem broker: no worker needed)."""
    settings = http_settings(data_dir, database_url, broker_url, **limits)
    app = create_app(settings)
    with serve(app) as url:
        yield LiveServer(url, app, settings, app.state.session_factory)


def requests_until_refused(clients: list[httpx.Client], most: int = 3 * BURST) -> tuple[int, httpx.Response, float]:
    """GET /v1/models through ``clients`` in turn until one is refused: how many passed, the refusal, seconds taken."""
    start = time.monotonic()
    for i in range(most):
        r = clients[i % len(clients)].get("/v1/models")
        if r.status_code != 200:
            return i, r, time.monotonic() - start
    raise AssertionError(f"{most} requests passed")


def assert_limited(r: httpx.Response, code: str = "rate_limited") -> int:
    """``r`` is a 429 with ``code`` and a whole ``Retry-After`` of at least 1 s; that many seconds."""
    assert r.status_code == 429, r.text
    assert r.json()["error"] == code
    retry_after = r.headers["retry-after"]
    assert retry_after.isdigit() and int(retry_after) >= 1, retry_after
    assert r.json()["retry_after"] == int(retry_after)
    return int(retry_after)


def assert_budget_spent(passed: int, elapsed: float) -> None:
    # the burst, plus what the sustained rate refilled while the requests ran (none, usually)
    assert BURST <= passed <= BURST + int(elapsed * RATE), (passed, elapsed)


# -- rate limit ------------------------------------------------------------------------------------


def test_two_api_processes_share_one_key_budget(
    tmp_path: Path, _migrated_postgres_url: str, limits_redis: redis.Redis
) -> None:
    limits: dict[str, Any] = {"limits_url": REDIS_LIMITS_URL, "rate_limit_per_second": RATE, "rate_limit_burst": BURST}
    with (
        server(tmp_path / "a", _migrated_postgres_url, **limits) as a,
        server(tmp_path / "b", _migrated_postgres_url, **limits) as b,
    ):
        assert isinstance(a.app.state.rate_limiter, RedisRateLimiter)
        tenant_id, key = a.new_tenant()
        with session_scope(a.factory) as session:
            _, other_key = tenants.create_api_key(session, tenant_id)
        with a.client(key) as ca, b.client(key) as cb:
            passed, refused, elapsed = requests_until_refused([ca, cb])
            assert_budget_spent(passed, elapsed)
            retry_after = assert_limited(refused)
            assert "per second" in refused.json()["detail"]

            # the budget is per key, not per tenant: the tenant's other key is untouched, on either server
            with a.client(other_key) as oa, b.client(other_key) as ob:
                assert [c.get("/v1/models").status_code for c in (oa, ob, oa)] == [200, 200, 200]

            # kept in Redis under the key's sha256, never the key itself, and expiring
            names = set(limits_redis.scan_iter(match=f"{REDIS_PREFIX}*"))
            assert f"{REDIS_PREFIX}{tenants.hash_key(key)}".encode() in names
            assert not any(key.encode() in name or other_key.encode() in name for name in names)
            assert 0 < limits_redis.pttl(f"{REDIS_PREFIX}{tenants.hash_key(key)}") <= (BURST + 1) / RATE * 1000

            # still refused on both servers until Retry-After has passed; then it works again
            assert_limited(cb.get("/v1/models") if passed % 2 == 0 else ca.get("/v1/models"))
            time.sleep(retry_after)
            assert cb.get("/v1/jobs").status_code == 200
    # every authenticated route can answer 429, and says so
    for path, operations in a.app.openapi()["paths"].items():
        for method, operation in operations.items():
            if path.startswith("/v1/"):
                assert "429" in operation["responses"], (method, path)


def test_in_process_limiter_without_redis(
    tmp_path: Path, _migrated_postgres_url: str, limits_redis: redis.Redis
) -> None:
    # a filesystem broker (the embedded set-up) and no limits_url: the limiter lives in the process
    with server(tmp_path, _migrated_postgres_url, rate_limit_per_second=RATE, rate_limit_burst=BURST) as srv:
        assert srv.settings.limits_url == ""
        assert isinstance(srv.app.state.rate_limiter, LocalRateLimiter)
        _, key = srv.new_tenant()
        with srv.client(key) as c:
            passed, refused, elapsed = requests_until_refused([c])
            assert_budget_spent(passed, elapsed)
            retry_after = assert_limited(refused)
            # uploads are refused before their body is read
            assert_limited(c.post("/v1/models", files={"file": ("m.onnx", onnx_mlp())}))
            time.sleep(retry_after)
            assert c.get("/v1/models").status_code == 200
        # unauthenticated probes are not limited
        with httpx.Client(base_url=srv.url) as anonymous:
            assert {anonymous.get("/healthz").status_code for _ in range(BURST + 2)} == {200}
    assert not limits_redis.exists(f"{REDIS_PREFIX}{tenants.hash_key(key)}")


def test_unreachable_redis_lets_requests_through(
    tmp_path: Path, _migrated_postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    down = f"redis://127.0.0.1:{closed_port()}/0"
    caplog.set_level(logging.WARNING, logger="api.limits")
    with server(
        tmp_path, _migrated_postgres_url, limits_url=down, rate_limit_per_second=RATE, rate_limit_burst=1
    ) as srv:
        _, key = srv.new_tenant()
        with srv.client(key) as c:
            assert [c.get("/v1/models").status_code for _ in range(6)] == [200] * 6
    warnings = [r for r in caplog.records if r.name == "api.limits" and r.levelno == logging.WARNING]
    # one warning, then Redis is left alone for a while (no request pays for a connection attempt)
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "letting requests through" in warnings[0].getMessage()


def test_limits_url_defaults() -> None:
    assert Settings(broker_url="redis://h:6379/3").limits_url == "redis://h:6379/3"
    assert Settings(broker_url="filesystem://").limits_url == ""
    assert Settings(broker_url="redis://h:6379/3", limits_url="memory://").limits_url == "memory://"
    assert Settings(broker_url="filesystem://", limits_url="redis://r/1").limits_url == "redis://r/1"
    with pytest.raises(ValidationError, match="limits_url"):
        Settings(limits_url="http://:secret@host")
    defaults = Settings()
    assert defaults.rate_limit_per_second > 0 and defaults.max_active_jobs_per_tenant > 0
    assert defaults.max_stored_bytes_per_tenant > 0


# -- quotas ----------------------------------------------------------------------------------------


def test_active_jobs_quota(tmp_path: Path, _migrated_postgres_url: str) -> None:
    with server(tmp_path, _migrated_postgres_url, max_active_jobs_per_tenant=2) as srv:
        _, key = srv.new_tenant()
        _, neighbour = srv.new_tenant()
        with srv.client(key) as c:
            model = c.post("/v1/models", files={"file": ("mlp.onnx", onnx_mlp())}).json()["id"]
            data = c.post("/v1/datasets", json={"builtin": "digits"}).json()["id"]
            body = {"model_id": model, "dataset_id": data, "target": {"compression": 10}}

            first = c.post("/v1/jobs", json=body, headers={"Idempotency-Key": "first"})
            second = c.post("/v1/jobs", json=body)
            assert first.status_code == second.status_code == 202
            first_id = uuid.UUID(first.json()["id"])
            with session_scope(srv.factory) as session:  # a running job holds its slot too
                attempt = jobstate.claim(session, first_id, "test-worker", 60)
            assert attempt is not None

            third = c.post("/v1/jobs", json=body)
            assert assert_limited(third, "quota_exceeded") == 30
            assert "quota is 2" in third.json()["detail"]
            replay = c.post("/v1/jobs", json=body, headers={"Idempotency-Key": "first"})
            assert replay.status_code == 200 and replay.json()["id"] == first.json()["id"]  # a replay takes no slot

            assert c.post(f"/v1/jobs/{second.json()['id']}/cancel").json()["state"] == "cancelled"
            assert c.post("/v1/jobs", json=body).status_code == 202

            # one slot left, four submits at once: exactly one gets it
            assert c.post(f"/v1/jobs/{first_id}/cancel").json()["cancel_requested"] is True
            assert assert_limited(c.post("/v1/jobs", json=body), "quota_exceeded")  # still running
            with session_scope(srv.factory) as session:  # its worker sees the flag and stops
                assert jobstate.transition(session, first_id, "running", "cancelled", attempt=attempt)
            start = threading.Barrier(4)

            def submit(_: int) -> int:
                with srv.client(key) as own:
                    start.wait()
                    return own.post("/v1/jobs", json=body).status_code

            with ThreadPoolExecutor(4) as pool:
                codes = sorted(pool.map(submit, range(4)))
            assert codes == [202, 429, 429, 429], codes
            active = [j for j in c.get("/v1/jobs").json()["items"] if j["state"] in ("queued", "running")]
            assert len(active) == 2
        with srv.client(neighbour) as other:  # per tenant: a neighbour still has all its slots
            model = other.post("/v1/models", files={"file": ("mlp.onnx", onnx_mlp())}).json()["id"]
            mine = body | {
                "model_id": model,
                "dataset_id": other.post("/v1/datasets", json={"builtin": "digits"}).json()["id"],
            }
            assert [other.post("/v1/jobs", json=mine).status_code for _ in range(3)] == [202, 202, 429]


def test_stored_bytes_quota(tmp_path: Path, _migrated_postgres_url: str) -> None:
    model = onnx_mlp()
    quota = len(model) + len(model) // 2  # room for one model
    with server(tmp_path, _migrated_postgres_url, max_stored_bytes_per_tenant=quota) as srv:
        _, key = srv.new_tenant()
        with srv.client(key) as c:

            def assert_refused_and_gone(r: httpx.Response, before: set[Path], *, unread: bool) -> None:
                assert_limited(r, "quota_exceeded")
                assert f"quota of {quota:,} bytes" in r.json()["detail"]
                # refused before the body was read: the connection closes, as for a 413
                assert (r.headers.get("connection") == "close") is unread, r.headers
                assert srv.stored_files() == before
                assert list(srv.upload_root.iterdir()) == []

            stored = c.post("/v1/models", files={"file": ("mlp.onnx", model)})
            assert stored.status_code == 201, stored.text
            before = srv.stored_files()

            # small enough that only its received size tells: refused after the body, before storing
            assert_refused_and_gone(c.post("/v1/models", files={"file": ("mlp.onnx", model)}), before, unread=False)
            npz = npz_bytes(inputs=np.zeros((4, 4), np.float32))
            assert_refused_and_gone(c.post("/v1/datasets", files={"file": ("d.npz", npz)}), before, unread=False)
            # Content-Length says it cannot fit: refused before a byte of it is read
            big = b"\x08" + b"\0" * (256 * 1024)
            assert_refused_and_gone(c.post("/v1/models", files={"file": ("big.onnx", big)}), before, unread=True)

            def chunked() -> Iterator[bytes]:  # no Content-Length: judged once received
                yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.onnx"\r\n\r\n'
                yield big
                yield b"\r\n--b--\r\n"

            r = c.post("/v1/models", content=chunked(), headers={"Content-Type": "multipart/form-data; boundary=b"})
            assert_refused_and_gone(r, before, unread=False)

            # a built-in data set stores nothing and passes; deleting the model makes room again
            assert c.post("/v1/datasets", json={"builtin": "digits"}).status_code == 201
            assert c.delete(f"/v1/models/{stored.json()['id']}").status_code == 204
            assert c.post("/v1/models", files={"file": ("mlp.onnx", model)}).status_code == 201
