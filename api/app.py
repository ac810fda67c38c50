"""The FastAPI application: :func:`create_app` builds it, and everything it uses, from the settings.

Routes live under ``/v1`` (one router per resource, :mod:`api.routes`), the OpenAPI description at
``/openapi.json``, its pages at ``/docs`` and ``/redoc`` (served offline, :mod:`api.routes.docs`),
probes at ``/healthz`` and ``/readyz``, Prometheus metrics at ``/metrics`` (:mod:`api.metrics`), the web
dashboard at ``/dashboard/`` (``/`` redirects there; :mod:`api.routes.dashboard`). The engine, session factory,
blob store, Celery app, upload folder and whether the deployment trains on CPUs only
(``cpu_only``, :func:`service.estimates.trains_on_cpu_only`) are settled here and kept on ``app.state``; the
dependencies in :mod:`api.deps` read them from there, so tests build an app from their own
settings (or override a dependency) and nothing is a module-level global.

Errors: every failure a client can act on is an :class:`~service.errors.AppError` and is rendered by
:func:`render_error` as ``{"error": code, "detail": message}``. Request validation errors, HTTP
errors from routing (404, 405) and a database that cannot be reached (503) are turned into the
same shape there; anything else is a 500 with the same shape (and a logged traceback).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

import torch
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import dns_core
from api.deps import AuthCache
from api.jobcache import JobCache
from api.limits import make_rate_limiter
from api.metrics import Metrics, RequestMetrics
from api.routes import dashboard, docs, health, metrics, v1
from api.uploads import remove_stale
from service.database import Reader, libpq_conninfo, make_engine, make_session_factory
from service.errors import AppError, InvalidRequest, PayloadTooLarge, ServiceUnavailable
from service.estimates import trains_on_cpu_only
from service.queue import make_celery
from service.settings import Settings, get_settings
from service.storage import Storage

log = logging.getLogger(__name__)

#: Seconds to wait for a Postgres connection before the request fails with a 503.
DB_CONNECT_TIMEOUT_S: Final = 3
#: Seconds to wait for a free pooled connection before the request fails with a 503.
DB_POOL_TIMEOUT_S: Final = 10
#: Largest body of a request that is not an upload (job creation JSON …).
MAX_JSON_BODY: Final = 1024 * 1024
#: Routes that stream their body themselves, under ``Settings.max_upload_bytes``.
#: The OpenAPI description's groups, one per resource, in the order the docs pages show them.
OPENAPI_TAGS: Final = [
    {"name": "models", "description": "Upload models (ONNX, safetensors weights of an architecture, Hugging Face "
     "folders), list and delete them."},
    {"name": "datasets", "description": "Upload data (npz, safetensors, IDX, image folders) or register a built-in "
     "set; list and delete them."},
    {"name": "jobs", "description": "Create compression jobs, follow them (poll, progress, per-layer history, "
     "frontier, log, live events), name and tag them, cancel and delete them."},
    {"name": "artifacts", "description": "A finished job's files: compressed weights, report, candidates; "
     "downloads are sha256-checked."},
    {"name": "health", "description": "Liveness and readiness probes, Prometheus metrics."},
]  # fmt: skip

UPLOAD_ROUTES: Final = frozenset({("POST", "/v1/models"), ("POST", "/v1/datasets")})

_HTTP_CODES: Final = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_format",
}


def _engine_options(url: str) -> dict[str, Any]:
    if make_url(url).get_backend_name() == "postgresql":
        return {"connect_args": {"connect_timeout": DB_CONNECT_TIMEOUT_S}, "pool_timeout": DB_POOL_TIMEOUT_S}
    return {}


def create_app(settings: Settings | None = None) -> FastAPI:
    """The application for ``settings`` (default: the environment's, :func:`service.settings.get_settings`)."""
    settings = settings or get_settings()
    engine = make_engine(settings.database_url, **_engine_options(settings.database_url))
    celery = make_celery(settings)
    upload_root = settings.data_dir / "upload-tmp"
    upload_root.mkdir(parents=True, exist_ok=True)
    remove_stale(upload_root)
    rate_limiter = make_rate_limiter(settings)
    postgres = make_url(settings.database_url).get_backend_name() == "postgresql"
    job_cache = JobCache(settings.job_cache_size) if postgres and settings.job_cache_size > 0 else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # What is loaded by now (the modules, torch among them: ~280K objects) lives as long as the
        # process. Frozen, it is out of the collector's reach: otherwise every full collection walks
        # all of it, stalling every request in flight for 100-200 ms on a small machine.
        gc.collect()
        gc.freeze()
        await app.state.reader.start()
        listener = None
        if job_cache is not None:
            listener = asyncio.create_task(job_cache.run(libpq_conninfo(settings.database_url), DB_CONNECT_TIMEOUT_S))
        yield
        if listener is not None:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
        await app.state.reader.close()
        celery.close()
        engine.dispose()
        if rate_limiter is not None:
            await rate_limiter.aclose()

    app = FastAPI(
        title="netsurgery",
        version=dns_core.__version__,
        summary="Compress neural networks with Dynamic Network Surgery.",
        description="Upload a model (ONNX, or safetensors weights of a built-in architecture) and data, create "
        "a compression job, follow its progress, download the compressed weights. Authenticate with "
        '`Authorization: Bearer <api key>`. Errors are JSON `{"error": code, "detail": message}`.',
        lifespan=lifespan,
        docs_url=None,  # api.routes.docs serves /docs and /redoc with local files instead of a CDN's
        redoc_url=None,
        openapi_tags=OPENAPI_TAGS,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = make_session_factory(engine)
    app.state.reader = Reader(settings.database_url, app.state.session_factory, connect_timeout=DB_CONNECT_TIMEOUT_S)
    app.state.storage = Storage(settings.storage_url)
    app.state.celery = celery
    app.state.upload_root = upload_root
    app.state.auth_cache = AuthCache(settings.auth_cache_seconds) if settings.auth_cache_seconds > 0 else None
    app.state.rate_limiter = rate_limiter
    app.state.job_cache = job_cache
    app.state.metrics = Metrics(settings, app.state.session_factory)
    # whether the deployment's workers train on CPUs (then jobs over cpu_job_limit_seconds are refused at
    # submit): device 'cpu', or 'auto' and no CUDA device here; asked once, and only for 'auto'
    auto = settings.device.strip().lower() == "auto"
    app.state.cpu_only = trains_on_cpu_only(settings.device, auto and torch.cuda.is_available())

    for exc_class in (
        AppError,
        RequestValidationError,
        StarletteHTTPException,
        sa_exc.OperationalError,
        sa_exc.DBAPIError,
        sa_exc.TimeoutError,
        Exception,
    ):
        app.add_exception_handler(exc_class, render_error)
    app.add_middleware(BodyLimit, limit=MAX_JSON_BODY, exempt=UPLOAD_ROUTES)
    # outside BodyLimit, so its refusals are timed too
    app.add_middleware(RequestMetrics, metrics=app.state.metrics)
    app.include_router(v1)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(dashboard.router)
    app.include_router(docs.router)
    return app


# -------------------------------------------------------------------------------------------- errors


def as_app_error(exc: Exception) -> AppError | None:
    """The :class:`AppError` for ``exc``, or None for an unexpected failure (a 500)."""
    if isinstance(exc, AppError):
        return exc
    if isinstance(exc, RequestValidationError):
        fields = jsonable_encoder([{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()])
        summary = "; ".join(f"{'.'.join(str(p) for p in f['loc'])}: {f['msg']}" for f in fields[:5])
        return InvalidRequest(f"invalid request: {summary}", extra={"fields": fields})
    if _database_unreachable(exc):
        return ServiceUnavailable.database()
    return None


def _database_unreachable(exc: Exception) -> bool:
    if isinstance(exc, sa_exc.OperationalError | sa_exc.TimeoutError):
        return True
    return isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated


def _allowed_methods(request: Request) -> list[str]:
    """Every method the API serves at the request's path, from its OpenAPI paths (built once)."""
    table: list[tuple[re.Pattern[str], set[str]]] | None = getattr(request.app.state, "allow_table", None)
    if table is None:
        table = []
        for template, operations in request.app.openapi().get("paths", {}).items():
            pattern = re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template))
            table.append((re.compile(f"^{pattern}/?$"), {m.upper() for m in operations}))
        request.app.state.allow_table = table
    path = request.url.path
    return sorted({m for pattern, methods in table if pattern.match(path) for m in methods})


async def render_error(request: Request, exc: Exception) -> JSONResponse:
    """The one error handler: ``{"error": code, "detail": message, …}`` with the error's status and headers."""
    if isinstance(exc, StarletteHTTPException):
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # FastAPI has one route per method: Starlette names only the first
            allowed = _allowed_methods(request)  # from the OpenAPI paths; static routes are not in them
            if allowed:
                headers["Allow"] = ", ".join(allowed)
        return JSONResponse({"error": code, "detail": str(exc.detail)}, status_code=exc.status_code, headers=headers)
    error = as_app_error(exc)
    if error is None:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"error": "internal", "detail": "internal server error"}, status_code=500)
    if isinstance(error, ServiceUnavailable) and error is not exc:
        log.warning("%s %s: %s", request.method, request.url.path, exc)
    body = {"error": error.code, "detail": error.detail, **error.extra}
    return JSONResponse(body, status_code=error.status_code, headers=error.headers or None)


# ---------------------------------------------------------------------------------------- body limit


class BodyLimit:
    """Refuse (413) request bodies over ``limit`` bytes, except on routes that stream their own uploads.

    FastAPI reads a JSON body whole before the route (and its authentication) runs; this caps what
    it can be made to hold. The body is read here, checked, and replayed to the application.
    """

    def __init__(self, app: ASGIApp, limit: int, exempt: frozenset[tuple[str, str]]) -> None:
        self.app = app
        self.limit = limit
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"].rstrip("/")) in self.exempt:
            await self.app(scope, receive, send)
            return
        too_large = PayloadTooLarge(
            f"the request body is larger than {self.limit:,} bytes", headers={"Connection": "close"}
        )
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send, too_large)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left; nothing to answer
                return
            body += message.get("body", b"")
            if len(body) > self.limit:
                await self._refuse(scope, receive, send, too_large)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, error: AppError) -> None:
        response = JSONResponse(
            {"error": error.code, "detail": error.detail}, status_code=error.status_code, headers=error.headers
        )
        await response(scope, receive, send)
