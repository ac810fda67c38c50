"""Real processes for the end-to-end tests: Postgres, Redis, the API under uvicorn, a Celery worker.

Nothing is mocked: the API and the worker are separate processes started the way an operator
starts them (``uvicorn --factory api.app:create_app``, ``netsurgery worker``), talking through a
fresh Postgres database and a Redis database index of their own.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.migrate import upgrade
from tests.api.conftest import _postgres_database

REDIS_URL = os.environ.get("NETSURGERY_TEST_REDIS", "redis://127.0.0.1:6379/12")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _redis(url: str = REDIS_URL) -> Any:
    """A client of the test's Redis database; skips the test with a reason when Redis is unreachable."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=2)
    try:
        client.ping()
    except redis.exceptions.ConnectionError as e:
        pytest.skip(f"Redis unreachable at {url} (set NETSURGERY_TEST_REDIS): {e}")
    return client


def wait_until_up(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not up after {timeout}s:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


@dataclass
class Service:
    url: str
    key: str
    env: dict[str, str]
    folder: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=30)

    def start_worker(self, name: str = "w1") -> subprocess.Popen[bytes]:
        log = open(self.folder / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [sys.executable, "-m", "netsurgery", "worker", "--hostname", f"{name}@%h", "--loglevel", "INFO"],
            env=self.env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.procs[name] = proc
        return proc

    def worker_ready(self, name: str) -> bool:
        """Whether worker ``name`` has started consuming (Celery logs ``<hostname> ready.``)."""
        log = self.folder / f"{name}.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        return re.search(rf"\b{re.escape(name)}@\S+ ready\.", text) is not None

    def stop(self, name: str, sig: int = 15) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(sig)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def service_env(folder: Path, database_url: str) -> dict[str, str]:
    return os.environ | {
        "NETSURGERY_DATA_DIR": str(folder),
        "NETSURGERY_DATABASE_URL": database_url,
        "NETSURGERY_BROKER_URL": REDIS_URL,
        "NETSURGERY_STORAGE_URL": str(folder / "store"),
        "NETSURGERY_DEVICE": "cpu",
        "NETSURGERY_LEASE_SECONDS": "6",
        "NETSURGERY_HEARTBEAT_SECONDS": "1",
        "NETSURGERY_REAPER_SECONDS": "1",
        "NETSURGERY_REQUEUE_AFTER_SECONDS": "5",
        "NETSURGERY_CHECKPOINT_EVERY": "100",
        "NETSURGERY_PROGRESS_FLUSH_SECONDS": "0.2",
        "PYTHONUNBUFFERED": "1",
    }


@contextmanager
def running_service(
    folder: Path,
    database_url: str,
    broker_url: str,
    tenant: str,
    worker: str | None = "w1",
    env: dict[str, str] | None = None,
) -> Iterator[Service]:
    """The API under uvicorn and (unless ``worker`` is None) one worker process, on a migrated
    database; a tenant ``tenant`` made with ``netsurgery admin``; ``env`` adds to or overrides the
    settings. Stops every process on exit."""
    env = service_env(folder, database_url) | {"NETSURGERY_BROKER_URL": broker_url} | (env or {})
    made = subprocess.run(
        [sys.executable, "-m", "netsurgery", "admin", "create-tenant", tenant],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    port = free_port()
    svc = Service(f"http://127.0.0.1:{port}", made.stdout.strip().splitlines()[-1], env, folder)
    log = open(folder / "api.log", "ab")  # noqa: SIM115 - closed with the process
    svc.procs["api"] = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "api.app:create_app", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    if worker is not None:
        svc.start_worker(worker)
    try:
        wait_until_up(f"{svc.url}/healthz", svc.procs["api"], folder / "api.log")
        yield svc
    finally:
        for name in list(svc.procs):
            svc.stop(name)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """API + one worker on a fresh Postgres database and Redis; torn down after the module."""
    client = _redis()
    client.flushdb()
    folder = tmp_path_factory.mktemp("service")
    with _postgres_database() as db_url:
        upgrade(db_url)
        try:
            with running_service(folder, db_url, REDIS_URL, "e2e") as svc:
                yield svc
        finally:
            client.flushdb()
