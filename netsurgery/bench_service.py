"""``netsurgery bench service``: the service's figures, measured in one run on this machine.

Starts the API (uvicorn with :data:`API_WORKERS` processes, as docker-compose.yml runs it) and one
worker as separate processes on a fresh Postgres database and a Redis database index, then
measures, from this (second) process over loopback:

1. **submit → running**: with the worker idle, the time from a job's creation to its claim
   (``started_at − created_at``, both stamped by the service), over several jobs;
2. **iterations per second** of LeNet-300-100 surgery inside a service job against the bare
   engine loop (:func:`dns_core.compress.compress` in this process), alternated, same settings,
   rate taken from progress timestamps between the first and the last report;
3. **GET /v1/jobs/{id} latency** at 50 concurrent clients (p50, p99): 50 pollers each asking every
   0.5 s, as watching clients do; and, as a stress figure, 50 connections in a closed loop with
   wrk (each asks again as soon as it has its answer), when wrk is installed; the closed loop again
   on an API of one process, with the job cache off (:mod:`api.jobcache`: every answer read from
   Postgres) and with the per-key rate limit on (one Redis round trip per request), as
   :data:`CLOSED_LOOP_VARIANTS`;
4. **API resident memory** (all its processes) while a 200 MB model upload streams in (peak growth
   over the idle RSS).

The last output line is one JSON object with every figure; ``netsurgery bench service`` also writes
it, with the command line, versions and machine, to a results file (``docs/results/service.json``
unless ``--results`` says otherwise) through :func:`dns_core.bench.write_results`.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

ADMIN_URL = os.environ.get("NETSURGERY_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("NETSURGERY_BENCH_REDIS", "redis://127.0.0.1:6379/11")
#: uvicorn processes of the API, as docker-compose.yml runs it (one per core on these 2-core machines)
API_WORKERS = 2


@contextmanager
def _database() -> Iterator[str]:
    import psycopg
    from psycopg import sql

    admin = psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=3)
    name = f"ns_bench_{secrets.token_hex(4)}"
    info = psycopg.conninfo.conninfo_to_dict(ADMIN_URL)
    url = f"postgresql+psycopg://{info.get('user', 'postgres')}@{info.get('host', '127.0.0.1')}:" \
          f"{info.get('port', '5432')}/{name}"  # fmt: skip
    admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield url
    finally:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        admin.close()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rss_kib(pid: int) -> int:
    """Resident memory of ``pid`` and its children (uvicorn's worker processes), KiB."""
    total = 0
    children = Path(f"/proc/{pid}/task/{pid}/children")
    for child in children.read_text().split() if children.exists() else ():
        total += _rss_kib(int(child))
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return total + int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def _wait_state(c: httpx.Client, job_id: str, states: set[str], timeout: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = c.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in states:
            return dict(job)
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {job['state']}")
        time.sleep(0.02)


def _rate(points: list[tuple[int, float]]) -> float:
    """Iterations per second between the first and the last progress report."""
    (i0, t0), (i1, t1) = points[0], points[-1]
    return (i1 - i0) / (t1 - t0)


def _job_spec(iterations: int) -> dict[str, Any]:
    """What both sides run: the service job's JSON, which the bare engine maps as the worker does."""
    return {"method": "dns", "target": {"compression": 8, "max_accuracy_drop": 100},
            "settings": {"iterations": iterations, "seed": 0}}  # fmt: skip


def _bare_rate(iterations: int) -> float:
    import torch

    from dns_core import models
    from dns_core.data import load_builtin
    from dns_core.spec import CompressSpec
    from dns_core.train import Callbacks

    train, valid, _ = load_builtin("digits")
    torch.manual_seed(0)
    model = models.build("lenet-300-100")
    points: list[tuple[int, float]] = []
    spec = CompressSpec.from_json(_job_spec(iterations), device="cpu", checkpoint_every=1000)  # the worker's settings
    callbacks = Callbacks(on_progress=lambda p: points.append((p.iteration, time.time())))
    with tempfile.TemporaryDirectory() as tmp:
        spec.compress(model, train, valid, callbacks=callbacks, checkpoint=Path(tmp) / "c.ckpt")
    return _rate(points)


def _service_rate(c: httpx.Client, model_id: str, data_id: str, iterations: int) -> tuple[float, str]:
    r = c.post("/v1/jobs", json={"model_id": model_id, "dataset_id": data_id, **_job_spec(iterations)})
    job = _wait_state(c, r.json()["id"], {"succeeded", "failed", "cancelled"})
    if job["state"] != "succeeded":
        raise RuntimeError(f"service job {job['state']}: {job.get('error')}")
    items = c.get(f"/v1/jobs/{job['id']}/progress", params={"limit": 1000}).json()["items"]
    return _rate([(p["iteration"], _ts(p["at"])) for p in items]), job["id"]


async def _paced_latency(url: str, key: str, path: str, clients: int, interval: float, seconds: float) -> list[float]:
    """``clients`` pollers, each asking every ``interval`` seconds (as `netsurgery watch` or a dashboard does)."""
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, limits=limits,
                                 timeout=30) as c:  # fmt: skip
        end = time.monotonic() + seconds

        async def poller(offset: float) -> None:
            await asyncio.sleep(offset)  # spread the clients over the interval
            while (start := time.monotonic()) < end:
                r = await c.get(path)
                latencies.append(time.monotonic() - start)
                r.raise_for_status()
                await asyncio.sleep(max(0.0, interval - (time.monotonic() - start)))

        await asyncio.gather(*(poller(i * interval / clients) for i in range(clients)))
    return latencies


def _wrk_latency(url: str, key: str, clients: int, seconds: int) -> dict[str, Any] | None:
    """Closed loop: ``clients`` connections asking as fast as answers come (wrk, from Debian's ``wrk``)."""
    import re
    import shutil

    if shutil.which("wrk") is None:
        return None
    out = subprocess.run(
        ["wrk", "-t2", f"-c{clients}", f"-d{seconds}s", "--latency", "-H", f"Authorization: Bearer {key}", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    def ms(label: str) -> float:
        m = re.search(rf"{label}%\s+([\d.]+)(us|ms|s)", out)
        assert m is not None, out
        return round(float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)], 2)

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    return {
        "clients": clients,
        "p50": ms("50"),
        "p99": ms("99"),
        "requests_per_second": float(rps.group(1)) if rps else None,
    }


def _upload_rss(url: str, key: str, api_pid: int, folder: Path, megabytes: int) -> dict[str, Any]:
    import torch
    from safetensors.torch import save_file

    in_features = (megabytes * 1024 * 1024 // 4) // 300  # lenet-300-100's fc1 dominates: in_features × 300
    path = folder / "big.safetensors"
    from dns_core import models

    model = models.build("lenet-300-100", in_features=in_features)
    state = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    del model
    save_file(state, str(path), metadata={"netsurgery.arch": "lenet-300-100",
                                          "netsurgery.config": json.dumps({"in_features": in_features})})  # fmt: skip
    del state
    size = path.stat().st_size
    before = _rss_kib(api_pid)
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_kib(api_pid))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t = time.perf_counter()
    with open(path, "rb") as f, httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"},
                                             timeout=300) as c:  # fmt: skip
        r = c.post("/v1/models", files={"file": ("big.safetensors", f)})
    seconds = time.perf_counter() - t
    time.sleep(0.2)
    done.set()
    sampler.join()
    path.unlink()
    if r.status_code != 201:
        raise RuntimeError(f"upload answered {r.status_code}: {r.text[:300]}")
    return {
        "upload_bytes": size,
        "upload_seconds": round(seconds, 2),
        "api_rss_before_mib": round(before / 1024, 1),
        "api_rss_peak_mib": round(peak / 1024, 1),
        "api_rss_growth_mib": round((peak - before) / 1024, 1),
    }


#: Closed loops on other APIs: (result key, what differs, environment, uvicorn processes or 0 for as many
#: as the main API).
CLOSED_LOOP_VARIANTS: tuple[tuple[str, str, dict[str, str], int], ...] = (
    ("get_job_latency_closed_loop_one_process_ms", "one process", {}, 1),
    ("get_job_latency_closed_loop_uncached_ms", "with the job cache off (every answer read from Postgres)",
     {"NETSURGERY_JOB_CACHE_SIZE": "0"}, 0),
    ("get_job_latency_closed_loop_rate_limited_ms", "with the per-key rate limit on (Redis), set above the load",
     {"NETSURGERY_RATE_LIMIT_PER_SECOND": "1000000", "NETSURGERY_RATE_LIMIT_BURST": "1000000"}, 0),
)  # fmt: skip


def _api(env: dict[str, str], port: int, logs: Any, workers: int) -> subprocess.Popen[bytes]:
    """The API (uvicorn with ``workers`` processes) on ``port`` with the settings in ``env``."""
    argv = [sys.executable, "-m", "uvicorn", "--factory", "api.app:create_app", "--http",
            "api.server:JsonErrorsProtocol", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
            "--workers", str(workers)]  # fmt: skip
    return subprocess.Popen(argv, env=env, stdout=logs, stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def run(*, rounds: int = 2, iterations: int = 3000, clients: int = 50, poll_interval: float = 0.5,
        poll_seconds: float = 20.0, upload_mb: int = 200, api_workers: int = API_WORKERS,
        log: Any = print) -> dict[str, Any]:  # fmt: skip
    import redis

    from dns_core import models
    from dns_core.io import save_model
    from service.database import make_engine, make_session_factory, session_scope
    from service.migrate import upgrade
    from service.repositories import tenants as repository

    broker = redis.Redis.from_url(REDIS_URL)
    broker.flushdb()
    result: dict[str, Any] = {"api_processes": api_workers}
    with _database() as db_url, tempfile.TemporaryDirectory(prefix="netsurgery-bench-") as tmp:
        folder = Path(tmp)
        upgrade(db_url)
        engine = make_engine(db_url)
        with session_scope(make_session_factory(engine)) as s:
            _, key = repository.create_tenant(s, "bench")
        engine.dispose()
        env = os.environ | {"NETSURGERY_DATA_DIR": str(folder), "NETSURGERY_DATABASE_URL": db_url,
                            "NETSURGERY_BROKER_URL": REDIS_URL, "NETSURGERY_STORAGE_URL": str(folder / "store"),
                            "NETSURGERY_DEVICE": "cpu", "NETSURGERY_MAX_UPLOAD_BYTES": str(1 << 30),
                            # capacity is measured here, not the per-key limit (that has its own tests)
                            "NETSURGERY_RATE_LIMIT_PER_SECOND": "0"}  # fmt: skip
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        logs = open(folder / "procs.log", "ab")  # noqa: SIM115
        api = _api(env, port, logs, api_workers)
        worker = subprocess.Popen([sys.executable, "-m", "netsurgery", "worker", "--loglevel", "WARNING"], env=env,
                                  stdout=logs, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            from netsurgery.service_cli import wait_for_http

            wait_for_http(f"{url}/healthz", timeout=60)
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
                import torch

                torch.manual_seed(0)
                save_model(folder / "lenet.safetensors", models.build("lenet-300-100"), "lenet-300-100")
                with open(folder / "lenet.safetensors", "rb") as f:
                    model_id = c.post("/v1/models", files={"file": ("lenet.safetensors", f)},
                                      data={"architecture": "lenet-300-100"}).json()["id"]  # fmt: skip
                data_id = c.post("/v1/datasets", json={"builtin": "digits"}).json()["id"]
                _service_rate(c, model_id, data_id, 100)  # warm the worker (imports, first CPU work)

                log("submit -> running, idle worker")
                waits = []
                for _ in range(8):
                    r = c.post(
                        "/v1/jobs",
                        json={
                            "model_id": model_id,
                            "dataset_id": data_id,
                            "method": "dns",
                            "target": {"compression": 4},
                            "settings": {"iterations": 50},
                        },
                    )
                    job = _wait_state(c, r.json()["id"], {"succeeded", "failed", "cancelled"})
                    waits.append(_ts(job["started_at"]) - _ts(job["created_at"]))
                    time.sleep(0.3)  # the worker is idle again
                result["submit_to_running_s"] = {"median": round(statistics.median(waits), 3),
                                                 "max": round(max(waits), 3), "n": len(waits)}  # fmt: skip

                log(f"iterations per second: bare engine vs service job, {rounds} rounds of {iterations}")
                bare, service = [], []
                last_job = ""
                for _ in range(rounds):
                    bare.append(_bare_rate(iterations))
                    rate, last_job = _service_rate(c, model_id, data_id, iterations)
                    service.append(rate)
                result["iterations_per_second"] = {
                    "bare": [round(x, 1) for x in bare], "service": [round(x, 1) for x in service],
                    "ratio": round(statistics.median(service) / statistics.median(bare), 3),
                }  # fmt: skip

                log(f"GET /v1/jobs/{{id}}: {clients} clients polling every {poll_interval} s for {poll_seconds} s")
                lat = asyncio.run(
                    _paced_latency(url, key, f"/v1/jobs/{last_job}", clients, poll_interval, poll_seconds)
                )
                lat.sort()
                result["get_job_latency_ms"] = {
                    "clients": clients, "poll_interval_s": poll_interval, "requests": len(lat),
                    "p50": round(1000 * lat[len(lat) // 2], 2), "p99": round(1000 * lat[int(len(lat) * 0.99) - 1], 2),
                    "max": round(1000 * lat[-1], 2),
                }  # fmt: skip
                log(f"GET /v1/jobs/{{id}}: {clients} connections in a closed loop (wrk), 10 s")
                result["get_job_latency_closed_loop_ms"] = _wrk_latency(f"{url}/v1/jobs/{last_job}", key, clients, 10)
                for name, what, extra, workers in CLOSED_LOOP_VARIANTS:
                    log(f"the same closed loop on another API, {what}")
                    other_port = free_port()
                    other = _api(env | extra, other_port, logs, workers or api_workers)
                    try:
                        wait_for_http(f"http://127.0.0.1:{other_port}/healthz", timeout=60)
                        result[name] = _wrk_latency(
                            f"http://127.0.0.1:{other_port}/v1/jobs/{last_job}", key, clients, 10
                        )
                    finally:
                        _stop(other)

            log(f"API memory during a {upload_mb} MB model upload")
            result["upload"] = _upload_rss(url, key, api.pid, folder, upload_mb)
        finally:
            for proc in (api, worker):
                _stop(proc)
            broker.flushdb()
    return result
