"""``GET /metrics`` over real HTTP: latency by route template, upload and download byte counters, and the
figures read from the database (jobs by state, queue depth, iterations per second per worker)."""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from api.app import create_app
from api.metrics import STALE_SECONDS, iteration_rate
from service.database import session_scope
from service.orm import Job, utcnow
from service.queue import QUEUE
from service.repositories import jobs, jobstate
from service.repositories.jobs import ProgressSample
from tests.api.conftest import LiveServer, closed_port, http_settings, serve
from tests.api.test_http_jobs import Account, job_body, new_account
from tests.api.test_http_uploads import npz_bytes, onnx_mlp

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
LATENCY = "netsurgery_http_request_duration_seconds"


def scrape(url: str, **headers: str) -> Samples:
    r = httpx.get(f"{url}/metrics", headers=headers)  # no API key
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def eventually(check: Callable[[], bool], seconds: float = 3.0) -> bool:
    """Whether ``check`` holds within ``seconds`` (a streamed download is counted as its chunks go out)."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture(scope="module")
def account(live: LiveServer) -> Account:
    return new_account(live)


def test_request_latency_and_byte_counters(live: LiveServer, account: Account) -> None:
    before = scrape(live.url)
    with live.client(account.key) as c:
        model = onnx_mlp()
        # the account's own model again: a duplicate (200, nothing stored), whose bytes were received all the same
        assert c.post("/v1/models", files={"file": ("m.onnx", model)}).status_code == 200
        data = npz_bytes(inputs=np.zeros((4, 1, 2, 2), np.float32))
        assert c.post("/v1/datasets", files={"file": ("d.npz", data)}).status_code == 201
        assert c.post("/v1/models", files={"file": ("x.onnx", b"not onnx")}).status_code in (415, 422)

        job_id = c.post("/v1/jobs", json=job_body(account)).json()["id"]
        with session_scope(live.factory) as session:
            attempt = jobstate.claim(session, uuid.UUID(job_id), "metrics-test", 60)
            assert attempt is not None
        content = bytes(range(256)) * 40
        key = f"jobs/{job_id}/weights.bin"
        with live.app.state.storage.writer(key) as f:
            f.write(content)
        with session_scope(live.factory) as session:
            assert jobs.put_artifact(
                session, uuid.UUID(job_id), attempt, name="weights.bin", kind="sparse", uri=key,
                size_bytes=len(content), sha256=hashlib.sha256(content).hexdigest(),
            )  # fmt: skip
        url = f"/v1/jobs/{job_id}/artifacts/weights.bin"
        assert c.get(url).content == content
        assert c.get(url, headers={"Range": "bytes=10-19"}).content == content[10:20]
        for _ in range(3):
            assert c.get(f"/v1/jobs/{job_id}").status_code == 200
        assert c.get(f"/v1/jobs/{uuid.uuid4()}").status_code == 404
        assert c.get(f"/v1/nothing/{uuid.uuid4()}").status_code == 404

        def downloaded() -> float:
            return value(scrape(live.url), "netsurgery_download_bytes_total", kind="sparse")

        start = value(before, "netsurgery_download_bytes_total", kind="sparse")
        assert eventually(lambda: downloaded() - start == len(content) + 10), downloaded() - start

        # an event stream is timed when it starts, not when it ends
        with c.stream("GET", f"/v1/jobs/{job_id}/events", timeout=10) as r:
            assert r.status_code == 200
            assert next(r.iter_lines()).startswith("id:")
            during = scrape(live.url)
    after = scrape(live.url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # uploads count what was stored, refused ones nothing
    assert delta("netsurgery_upload_bytes_total", kind="model") == len(model)
    assert delta("netsurgery_upload_bytes_total", kind="dataset") == len(data)

    # latency by route template (never a raw path with an id), method and status
    assert delta(f"{LATENCY}_count", method="GET", route="/v1/jobs/{job_id}", status="200") == 3
    assert delta(f"{LATENCY}_count", method="GET", route="/v1/jobs/{job_id}", status="404") == 1
    assert delta(f"{LATENCY}_count", method="POST", route="/v1/models", status="200") == 1
    assert delta(f"{LATENCY}_count", method="GET", route="/v1/jobs/{job_id}/artifacts/{name}", status="206") == 1
    assert delta(f"{LATENCY}_count", method="GET", route="<unmatched>", status="404") == 1
    events = {"method": "GET", "route": "/v1/jobs/{job_id}/events", "status": "200"}
    assert value(during, f"{LATENCY}_count", **events) - value(before, f"{LATENCY}_count", **events) == 1
    assert value(after, f"{LATENCY}_bucket", **events, le="+Inf") == value(after, f"{LATENCY}_count", **events)
    assert value(after, f"{LATENCY}_sum", **events) > 0
    for name, labels in after:
        assert not any(UUID.search(v) for _, v in labels), (name, labels)


def test_figures_from_the_database(live: LiveServer, account: Account, redis_queue: redis.Redis) -> None:
    worker = f"worker-{uuid.uuid4().hex[:8]}"
    with live.client(account.key) as c:
        queued = c.post("/v1/jobs", json=job_body(account)).json()["id"]
        running = c.post("/v1/jobs", json=job_body(account)).json()["id"]
    with session_scope(live.factory) as session:
        attempt = jobstate.claim(session, uuid.UUID(running), worker, 60)
        assert attempt is not None
        # five flushes a second apart, 25 iterations each: 25 iterations per second
        now = utcnow()
        points = [ProgressSample(25 * k, loss=1.0, at=now - timedelta(seconds=4 - k)) for k in range(5)]
        assert jobs.add_progress(session, uuid.UUID(running), attempt, points)

    samples = scrape(live.url)
    with live.factory() as session:
        states: dict[str, int] = {s: n for s, n in session.execute(select(Job.state, func.count()).group_by(Job.state))}
    for state in ("queued", "running", "succeeded", "failed", "cancelled"):
        assert value(samples, "netsurgery_jobs", state=state) == states.get(state, 0), state
    assert value(samples, "netsurgery_jobs", state="queued") >= 1 and queued
    assert value(samples, "netsurgery_queue_depth") == states["queued"]
    assert value(samples, "netsurgery_broker_queue_depth") == redis_queue.llen(QUEUE) >= 2
    assert value(samples, "netsurgery_worker_iterations_per_second", worker=worker) == pytest.approx(25.0)
    assert value(samples, "netsurgery_worker_running_jobs", worker=worker) == 1
    assert value(samples, "netsurgery_metrics_source_up", source="database") == 1
    assert value(samples, "netsurgery_metrics_source_up", source="broker") == 1

    r = httpx.get(f"{live.url}/metrics", headers={"Accept": "application/openmetrics-text"})
    assert r.headers["content-type"].startswith("application/openmetrics-text")
    assert r.text.endswith("# EOF\n") and "netsurgery_jobs{" in r.text
    assert "_created" not in r.text and "_created" not in httpx.get(f"{live.url}/metrics").text


def test_finished_jobs_their_run_times_and_iterations(live: LiveServer, account: Account) -> None:
    with live.client(account.key) as c:
        job_id = c.post("/v1/jobs", json=job_body(account, method="agp")).json()["id"]
    before = scrape(live.url)
    with session_scope(live.factory) as session:
        attempt = jobstate.claim(session, uuid.UUID(job_id), "w", 60)
        assert attempt is not None
        assert jobs.add_progress(session, uuid.UUID(job_id), attempt, [ProgressSample(300, loss=1.0)])
        assert jobstate.transition(session, uuid.UUID(job_id), "running", "failed", attempt=attempt, error="x")
        job = session.get(Job, uuid.UUID(job_id))
        assert job is not None and job.started_at is not None
        job.finished_at = job.started_at + timedelta(seconds=42)
    after = scrape(live.url)
    name = "netsurgery_job_duration_seconds"
    labels = {"method": "agp", "outcome": "failed"}
    assert value(after, f"{name}_count", **labels) == value(before, f"{name}_count", **labels) + 1
    assert value(after, f"{name}_sum", **labels) == pytest.approx(value(before, f"{name}_sum", **labels) + 42)
    for le, more in (("30.0", 0), ("60.0", 1), ("+Inf", 1)):
        bucket = f"{name}_bucket"
        assert value(after, bucket, le=le, **labels) == value(before, bucket, le=le, **labels) + more
    finished = "netsurgery_jobs_finished_total"
    assert value(after, finished, state="failed") == value(before, finished, state="failed") + 1
    trained = "netsurgery_iterations_total"
    assert value(after, trained, method="agp") == value(before, trained, method="agp") + 300


def test_database_and_broker_down(tmp_path: Path) -> None:
    """Unreachable sources leave their figures out; the scrape itself still answers."""
    dead = f"postgresql+psycopg://postgres@127.0.0.1:{closed_port()}/x"
    settings = http_settings(tmp_path, dead, f"redis://127.0.0.1:{closed_port()}/0")
    with serve(create_app(settings)) as url:
        first = scrape(url)
        samples = scrape(url)
    assert value(first, f"{LATENCY}_count", method="GET", route="/metrics", status="200") == 0
    assert value(samples, "netsurgery_metrics_source_up", source="database") == 0
    assert value(samples, "netsurgery_metrics_source_up", source="broker") == 0
    assert not any(name.startswith(("netsurgery_jobs", "netsurgery_queue_depth")) for name, _ in samples)
    assert value(samples, f"{LATENCY}_count", method="GET", route="/metrics", status="200") == 1


def test_iteration_rate() -> None:
    t0 = utcnow()

    # a worker writes its points in batches that share one timestamp
    batches = [(0, t0), (50, t0), (100, t0 + timedelta(seconds=2)), (150, t0 + timedelta(seconds=2))]
    assert iteration_rate(batches, t0 + timedelta(seconds=2)) == 50.0
    assert iteration_rate(batches[:2], t0) == 0.0  # one batch: no rate yet
    assert iteration_rate([], t0) == 0.0
    stalled = t0 + timedelta(seconds=STALE_SECONDS + 3)
    assert iteration_rate(batches, stalled) == 0.0
