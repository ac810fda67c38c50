"""Outages of the services the product talks to, through TCP proxies that go down and come back:
Postgres away for a few seconds (the API answers 503, never 500 or a hang, and recovers by itself;
workers retry), and a Redis restart that loses every queued message (every accepted job still ends)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
import redis

from service.migrate import upgrade
from tests.api.conftest import _postgres_database
from tests.e2e.conftest import REDIS_URL, Service, _redis, running_service
from tests.e2e.proxy import Proxy
from tests.e2e.test_service import _zoo_file, upload, wait_for_state

pytestmark = pytest.mark.slow
TERMINAL = {"succeeded", "failed", "cancelled"}


def _via(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


@dataclass
class Proxied:
    service: Service
    db: Proxy
    broker: Proxy
    redis: redis.Redis


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxied]:
    client = _redis()
    assert isinstance(client, redis.Redis)
    client.flushdb()
    folder = tmp_path_factory.mktemp("outages")
    with _postgres_database() as db_url:
        upgrade(db_url)
        real = urlsplit(db_url)
        db = Proxy(real.hostname or "127.0.0.1", real.port or 5432)
        rurl = urlsplit(REDIS_URL)
        broker = Proxy(rurl.hostname or "127.0.0.1", rurl.port or 6379)
        try:
            with running_service(folder, _via(db_url, db.port), _via(REDIS_URL, broker.port), "outage", None) as svc:
                yield Proxied(svc, db, broker, client)
        finally:
            db.close()
            broker.close()
            client.flushdb()


def _inputs(c: httpx.Client, folder: Path) -> tuple[str, str]:
    model = upload(c, "/v1/models", _zoo_file(folder / "m.safetensors"), architecture="lenet-300-100")
    return model["id"], c.post("/v1/datasets", json={"builtin": "digits"}).json()["id"]


def _submit(c: httpx.Client, model: str, data: str, iterations: int) -> str:
    r = c.post("/v1/jobs", json={"model_id": model, "dataset_id": data, "method": "dns",
                                 "target": {"compression": 5}, "settings": {"iterations": iterations}})  # fmt: skip
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def test_postgres_away_for_seconds_gives_503_then_recovers(proxied: Proxied, tmp_path: Path) -> None:
    svc = proxied.service
    svc.start_worker("pg-w1")
    with svc.client() as c:
        model, data = _inputs(c, tmp_path)
        job = _submit(c, model, data, 4000)
        deadline = time.monotonic() + 120
        while c.get(f"/v1/jobs/{job}").json()["iteration"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proxied.db.down()
        statuses, slowest = [], 0.0
        outage_end = time.monotonic() + 4
        try:
            while time.monotonic() < outage_end:
                t = time.monotonic()
                statuses.append(c.get(f"/v1/jobs/{job}").status_code)
                slowest = max(slowest, time.monotonic() - t)
                time.sleep(0.1)
        finally:
            proxied.db.up()
        assert statuses and set(statuses) == {503}, statuses  # never a 500, never a hang
        assert slowest < 5  # answered within the connect timeout
        recovered = time.monotonic()
        while c.get(f"/v1/jobs/{job}").status_code != 200:
            assert time.monotonic() - recovered < 15, "the API did not recover by itself"
            time.sleep(0.1)
        print(f"FIGURE postgres away 4 s: {len(statuses)} requests, statuses {sorted(set(statuses))}, slowest "
              f"{slowest:.2f} s, recovered {time.monotonic() - recovered:.2f} s after")  # fmt: skip
        final = wait_for_state(c, job, TERMINAL, timeout=180)
    assert final["state"] == "succeeded", final  # the worker retried its writes
    print(f"FIGURE postgres away: the running job ended {final['state']} (attempt {final['attempt']})")
    svc.stop("pg-w1")


def test_a_redis_restart_that_loses_the_queue_loses_no_job(proxied: Proxied, tmp_path: Path) -> None:
    svc = proxied.service
    svc.start_worker("redis-w1")
    with svc.client() as c:
        model, data = _inputs(c, tmp_path)
        running = _submit(c, model, data, 3000)
        deadline = time.monotonic() + 120
        while c.get(f"/v1/jobs/{running}").json()["state"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        queued = [_submit(c, model, data, 200) for _ in range(3)]
        # the restart: every connection cut, and the queue's contents gone (no persistence)
        proxied.broker.down()
        proxied.redis.flushdb()
        during = _submit(c, model, data, 200)  # accepted while the broker is away (stays queued in Postgres)
        time.sleep(2)
        proxied.broker.up()
        jobs = [running, *queued, during]
        finals = {job: wait_for_state(c, job, TERMINAL, timeout=240)["state"] for job in jobs}
    assert set(finals.values()) == {"succeeded"}, finals
    svc.stop("redis-w1")
    # the queued messages really were lost, and the reaper sent them again from Postgres
    log = (svc.folder / "redis-w1.log").read_text()
    assert "lost message(s)" in log
    print(f"FIGURE redis restart: {len(finals)} accepted jobs, {list(finals.values()).count('succeeded')} succeeded; "
          + "; ".join(line.split("reaper: ")[1] for line in log.splitlines() if "reaper: " in line))  # fmt: skip
