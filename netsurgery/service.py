"""The service's commands: ``serve`` (embedded: API + one worker), ``worker``, ``migrate``, ``admin``.

Imported only by those subcommands, so ``netsurgery compress`` never loads FastAPI or Celery.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


class ServiceError(Exception):
    """Printed as one line by the command line."""


def _settings() -> Any:
    from pydantic import ValidationError

    from api.settings import get_settings

    try:
        return get_settings()
    except ValidationError as e:
        raise ServiceError(f"bad NETSURGERY_* settings: {e}") from None


def _migrate(url: str) -> None:
    from sqlalchemy.exc import OperationalError

    from api.migrate import upgrade

    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        upgrade(url)
    except OperationalError as e:
        raise ServiceError(f"cannot reach the database {_redact(url)}: {e.orig}") from None


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<database url>"


def cmd_migrate(args: argparse.Namespace) -> int:
    s = _settings()
    _migrate(s.database_url)
    print(f"database {_redact(s.database_url)} is at the latest schema")
    return 0


def create_tenant(name: str) -> str:
    """A new tenant and its first API key (printed once; only its hash is stored)."""
    from api import repository
    from api.database import make_engine, make_session_factory, session_scope

    s = _settings()
    _migrate(s.database_url)
    engine = make_engine(s.database_url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            if repository.get_tenant_by_name(session, name) is not None:
                raise ServiceError(f"tenant {name!r} exists already")
            _, key = repository.create_tenant(session, name)
    finally:
        engine.dispose()
    return key


def cmd_admin(args: argparse.Namespace) -> int:
    key = create_tenant(args.name)
    print(f"tenant {args.name!r} created; its API key (shown once, stored only as a hash):")
    print(key)
    return 0


def worker_argv(concurrency: int = 1, hostname: str | None = None, loglevel: str = "INFO") -> list[str]:
    """Celery worker arguments: one job at a time per process (one process per GPU)."""
    argv = ["worker", "--pool", "solo" if concurrency == 1 else "prefork", "--concurrency", str(concurrency),
            "--queues", "jobs", "--loglevel", loglevel, "--without-gossip", "--without-mingle"]  # fmt: skip
    if hostname:
        argv += ["--hostname", hostname]
    return argv


def cmd_worker(args: argparse.Namespace) -> int:
    s = _settings()
    _migrate(s.database_url)
    from worker.tasks import app

    app.worker_main(worker_argv(hostname=args.hostname, loglevel=args.loglevel))
    return 0


def _embedded_key(data_dir: Path) -> str:
    """The embedded server's API key: made once for tenant ``default``, kept (0600) under ``data_dir``."""
    path = data_dir / "api-key"
    if path.exists():
        return path.read_text().strip()
    key = create_tenant("default")
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from api.app import create_app

    s = _settings()
    _migrate(s.database_url)
    key = _embedded_key(Path(s.data_dir))
    worker = None
    if not args.no_worker:
        log = open(Path(s.data_dir) / "worker.log", "ab")  # noqa: SIM115 - lives as long as the worker
        worker = subprocess.Popen(
            [sys.executable, "-m", "netsurgery", "worker", "--hostname", f"embedded@{os.uname().nodename}"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=os.environ | {"NETSURGERY_DATA_DIR": str(s.data_dir)},
        )
    url = f"http://{args.host}:{args.port}"
    print(f"netsurgery is serving {url} (API docs at {url}/docs, dashboard data in {s.data_dir})")
    print(f"API key: {key}")
    print("try:  curl -H 'Authorization: Bearer <key>' " + f"{url}/v1/jobs")
    if worker is not None:
        print(f"one worker is running (pid {worker.pid}; log {Path(s.data_dir) / 'worker.log'})")
    sys.stdout.flush()
    try:
        uvicorn.run(create_app(s), host=args.host, port=args.port, log_level="warning")
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=15)
            except subprocess.TimeoutExpired:
                worker.kill()
    return 0


def add_commands(sub: Any) -> None:
    s = sub.add_parser("serve", help="run the service on this machine: API, one worker, SQLite, local files")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--no-worker", action="store_true", help="API only (start workers with `netsurgery worker`)")
    s.set_defaults(func=lambda a: _run(cmd_serve, a))

    w = sub.add_parser("worker", help="run one Celery worker process (one per GPU: set CUDA_VISIBLE_DEVICES)")
    w.add_argument("--hostname", default=None, help="Celery node name (default: celery@<host>)")
    w.add_argument("--loglevel", default="INFO")
    w.set_defaults(func=lambda a: _run(cmd_worker, a))

    m = sub.add_parser("migrate", help="bring the database (NETSURGERY_DATABASE_URL) to the latest schema")
    m.set_defaults(func=lambda a: _run(cmd_migrate, a))

    a = sub.add_parser("admin", help="administration")
    asub = a.add_subparsers(dest="admin_command", required=True)
    t = asub.add_parser("create-tenant", help="create a tenant and print its API key")
    t.add_argument("name")
    t.set_defaults(func=lambda a: _run(cmd_admin, a))


def _run(fn: Any, args: argparse.Namespace) -> int:
    from netsurgery.cli import CliError

    try:
        return int(fn(args))
    except ServiceError as e:
        raise CliError(str(e)) from None


def wait_for_http(url: str, timeout: float = 30.0) -> None:
    """Block until ``url`` answers (used by tests and scripts that start ``serve``)."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
