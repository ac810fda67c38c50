"""The service's commands: ``serve`` (embedded: API + one worker), ``worker``, ``migrate``, ``admin``.

The service's packages (FastAPI, uvicorn, Celery, SQLAlchemy) load only when one of these commands
runs, so ``netsurgery compress`` never loads them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dns_core.defaults import ITERATIONS
from netsurgery.common import CliError, add_numerics, load_data, progress_bar

if TYPE_CHECKING:
    from netsurgery.common import Subcommands


def _settings() -> Any:
    from pydantic import ValidationError

    from service.settings import get_settings

    try:
        return get_settings()
    except ValidationError as e:
        raise CliError(f"bad NETSURGERY_* settings: {e}") from None


def _use_data_dir(folder: str | None) -> None:
    """``--data-dir``: this process's state folder, as ``NETSURGERY_DATA_DIR`` would set it (and for the
    worker it starts); the settings are read again."""
    if folder is None:
        return
    from service.settings import get_settings

    path = Path(folder).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["NETSURGERY_DATA_DIR"] = str(path)
    get_settings.cache_clear()


@contextlib.contextmanager
def _serving(data_dir: Path) -> Iterator[None]:
    """Hold the folder's serve lock: a second ``serve`` on the same folder is refused, naming the first."""
    import fcntl

    data_dir.mkdir(parents=True, exist_ok=True)
    lock = data_dir / "serve.lock"
    with open(lock, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise CliError(
                f"{data_dir} is already being served (by {holder}); stop that `netsurgery serve` or give this one "
                "another folder with --data-dir"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()


def _migrate(url: str) -> None:
    from sqlalchemy.exc import OperationalError

    from service.migrate import upgrade

    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        upgrade(url)
    except OperationalError as e:
        raise CliError(f"cannot reach the database {_redact(url)}: {e.orig}") from None


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
    from service.database import make_engine, make_session_factory, session_scope
    from service.repositories import tenants

    s = _settings()
    _migrate(s.database_url)
    engine = make_engine(s.database_url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            if tenants.get_tenant_by_name(session, name) is not None:
                raise CliError(f"tenant {name!r} exists already")
            _, key = tenants.create_tenant(session, name)
    finally:
        engine.dispose()
    return key


def cmd_admin(args: argparse.Namespace) -> int:
    _use_data_dir(args.data_dir)
    key = create_tenant(args.name)
    print(f"database: {_redact(_settings().database_url)}")
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


#: set by the embedded service on its worker: the pid of the process whose death stops the worker
PARENT_ENV = "NETSURGERY_PARENT_PID"
_PR_SET_PDEATHSIG = 1  # prctl(2)


def _die_with_parent() -> None:
    """Stop this worker when the embedded service that started it dies, however it dies (SIGKILL included).

    On Linux the kernel sends SIGKILL at the parent's death (``PR_SET_PDEATHSIG``): a killed worker is a
    crash the service already recovers from (the job's lease runs out and it resumes from its checkpoint),
    whereas an orphan would go on training for a service that is gone. Elsewhere nothing changes.
    """
    parent = os.environ.pop(PARENT_ENV, None)
    if parent is None or not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        print(f"netsurgery worker: prctl failed ({os.strerror(ctypes.get_errno())}); it may outlive its service",
              file=sys.stderr)  # fmt: skip
    if os.getppid() != int(parent):  # the service died before the request took effect
        raise SystemExit(0)


def cmd_worker(args: argparse.Namespace) -> int:
    _die_with_parent()
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


@contextlib.contextmanager
def embedded(host: str, port: int, *, with_worker: bool = True) -> Iterator[tuple[str, str, Any]]:
    """The embedded service: migrated database, the API under uvicorn (a thread), one worker process.

    Yields (url, api key, settings); stops everything on exit.
    """
    import threading

    import uvicorn

    from api.app import create_app

    s = _settings()
    _migrate(s.database_url)
    key = _embedded_key(Path(s.data_dir))
    worker = None
    if with_worker:
        log = open(Path(s.data_dir) / "worker.log", "ab")  # noqa: SIM115 - lives as long as the worker
        worker = subprocess.Popen(
            [sys.executable, "-m", "netsurgery", "worker", "--hostname", f"embedded@{os.uname().nodename}"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=os.environ | {"NETSURGERY_DATA_DIR": str(s.data_dir), PARENT_ENV: str(os.getpid())},
        )
    from api.server import JsonErrorsProtocol

    config = uvicorn.Config(create_app(s), host=host, port=port, log_level="warning", http=JsonErrorsProtocol)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    url = f"http://{host}:{port}"
    try:
        while not server.started:
            if not thread.is_alive():
                raise CliError(f"the API could not start on {host}:{port} (port in use?)")
            time.sleep(0.05)
        yield url, key, s
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGTERM)  # the worker and the API stop side by side
        server.should_exit = True
        thread.join(timeout=15)
        if worker is not None:
            try:
                worker.wait(timeout=15)
            except subprocess.TimeoutExpired:
                worker.kill()


def _stop_on_signals() -> None:
    """SIGTERM (what scripts and process managers send) and SIGINT (Ctrl-C) both stop ``serve``: the
    context manager's exit then stops the API and the worker instead of leaving the worker orphaned."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    # Python's own SIGINT handler, whatever this process inherited (a parent that ignores SIGINT passes that on)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def cmd_serve(args: argparse.Namespace) -> int:
    _stop_on_signals()
    _use_data_dir(args.data_dir)
    with _serving(Path(_settings().data_dir)), embedded(args.host, args.port, with_worker=not args.no_worker) as up:
        # from here on, Ctrl-C is a clean stop, even while the banner is being written
        try:
            url, key, s = up
            print(f"netsurgery is serving {url} (API docs at {url}/docs; data under {s.data_dir})")
            print(f"API key: {key}")
            print(f"one job, from another terminal:  netsurgery demo --url {url}   (or see the README)")
            if not args.no_worker:
                print(f"one worker is running (log: {Path(s.data_dir) / 'worker.log'}); Ctrl-C stops both")
            sys.stdout.flush()
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("stopping")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Start the embedded service (unless --url), run one compression job through its API, download it."""
    if args.url:
        key = args.key or os.environ.get("NETSURGERY_API_KEY") or _embedded_key(Path(_settings().data_dir))
        return _demo(args, args.url, key)
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    with embedded("127.0.0.1", port) as (url, key, _):
        print(f"started the embedded service at {url} with one worker")
        return _demo(args, url, key)


def _demo(args: argparse.Namespace, url: str, key: str) -> int:
    from dns_core.io import save_model
    from dns_core.reference import cached_reference
    from netsurgery.client import ApiError, Client

    args.data = "fashion-mnist"
    train, _, _ = load_data(args)
    print("a converged LeNet-300-100 reference (trained once, then cached)")
    model, _ = cached_reference("lenet-300-100", train, tag="fashion-mnist-cli")
    ref = Path(args.out) / "reference.safetensors"
    save_model(ref, model, "lenet-300-100")
    try:
        with Client(url, key) as c:
            uploaded = c.upload_model(ref, architecture="lenet-300-100", name="lenet-300-100 reference")
            data = c.builtin_data("fashion-mnist")
            job = c.submit(uploaded["id"], data["id"], compression=args.target, max_drop=args.max_drop,
                           iterations=args.iterations, seed=0)  # fmt: skip
            print(f"job {job['id']}: dns to {args.target}x within {args.max_drop} pp ({url}/v1/jobs/{job['id']})")
            with progress_bar() as bar:
                task = bar.add_task(job["state"], total=args.iterations, status="")

                def show(j: dict[str, Any]) -> None:
                    parts = [f"{j['compression']:.1f}x" if j.get("compression") else "",
                             f"val {j['val_accuracy']:.2f}%" if j.get("val_accuracy") is not None else ""]  # fmt: skip
                    bar.update(task, completed=j["iteration"], description=j["state"], status="  ".join(parts))

                job = c.wait(job["id"], callback=show)
            if job["state"] != "succeeded":
                print(f"job {job['state']}: {job.get('error') or ''}")
                return 1
            files = c.download(job["id"], args.out)
    except ApiError as e:
        raise CliError(str(e)) from None
    report = json.loads(files["report.json"].read_text())
    print(f"succeeded: {report['compression']:.1f}x ({report['nonzero_parameters']:,} of "
          f"{report['total_parameters']:,} parameters kept); test accuracy {report['reference_test_acc']:.2f}% → "
          f"{report['test_acc']:.2f}%")  # fmt: skip
    if report.get("verdict"):
        print(report["verdict"])
    elif report.get("budget_met") is False:
        print(f"note: validation accuracy {report['reference_val_acc']:.2f}% → {report['val_acc']:.2f}%: the "
              f"{args.max_drop} pp budget was not met")  # fmt: skip
    for path in files.values():
        print(f"  {path}  {path.stat().st_size:>10,} bytes  sha256 verified")
    return 0


def add_service_commands(sub: Subcommands) -> None:
    """Register serve, demo, worker, migrate and admin on the ``netsurgery`` subparsers."""
    s = sub.add_parser("serve", help="run the service on this machine: API, one worker, SQLite, local files")
    s.add_argument("--host", default="127.0.0.1", help="address the API listens on")
    s.add_argument("--port", type=int, default=8000, help="port the API listens on")
    s.add_argument("--no-worker", action="store_true", help="API only (start workers with `netsurgery worker`)")
    s.add_argument("--data-dir", default=None, metavar="DIR",
                   help="the state folder: database, broker folders, stored files, the worker's log (default: "
                        "$NETSURGERY_DATA_DIR, else ~/.local/share/netsurgery); one serve per folder")  # fmt: skip
    add_numerics(s)
    s.set_defaults(func=cmd_serve)

    d = sub.add_parser("demo", help="run one compression job through the service end to end and download it")
    d.add_argument("--url", default=None, help="a running service (default: start the embedded one for the job)")
    d.add_argument("--key", default=None, help="its API key (default: $NETSURGERY_API_KEY or the embedded key)")
    d.add_argument("--target", type=float, default=40.0, help="compression to ask for (x)")
    d.add_argument("--max-drop", type=float, default=0.5, help="accuracy budget, percentage points")
    d.add_argument("--iterations", type=int, default=ITERATIONS, help="training iterations of the job")
    d.add_argument("--out", default="out", help="folder the job's files are downloaded to")
    add_numerics(d, default="portable", default_help="portable where the CPU has AVX2 and no GPU trains, else native")
    d.set_defaults(func=cmd_demo)

    w = sub.add_parser("worker", help="run one Celery worker process (one per GPU: set CUDA_VISIBLE_DEVICES)")
    w.add_argument("--hostname", default=None, help="Celery node name (default: celery@<host>)")
    w.add_argument("--loglevel", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    add_numerics(w)
    w.set_defaults(func=cmd_worker)

    m = sub.add_parser("migrate", help="bring the database (NETSURGERY_DATABASE_URL) to the latest schema")
    m.set_defaults(func=cmd_migrate)

    a = sub.add_parser("admin", help="administration")
    asub = a.add_subparsers(dest="admin_command", required=True)
    t = asub.add_parser("create-tenant", help="create a tenant and print its API key")
    t.add_argument("name")
    t.add_argument("--data-dir", default=None, metavar="DIR",
                   help="the state folder whose database gets the tenant (default: as serve's); the database "
                        "used is printed")  # fmt: skip
    t.set_defaults(func=cmd_admin)


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
