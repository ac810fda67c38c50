"""Request dependencies, as named ``Annotated`` aliases.

Everything comes from ``request.app.state`` (filled by :func:`api.app.create_app`), so a test can
build an app from its own settings, or replace any of these through ``app.dependency_overrides``
(override the ``get_…`` function, e.g. ``app.dependency_overrides[get_storage] = lambda: store``).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Annotated

from celery import Celery
from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from api.jobcache import JobCache
from api.limits import RateLimiter
from service.database import session_scope
from service.errors import TooManyRequests, Unauthorized
from service.repositories import tenants
from service.settings import Settings
from service.storage import Storage

# The small dependencies below are ``async def`` although they do no I/O: FastAPI runs a plain
# ``def`` dependency in its thread pool, and each such hop costs more than the work itself.


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_session_factory(request: Request) -> sessionmaker[Session]:
    factory: sessionmaker[Session] = request.app.state.session_factory
    return factory


def get_session(factory: Annotated[sessionmaker[Session], Depends(get_session_factory)]) -> Iterator[Session]:
    """The request's unit of work: committed when the route returns normally, rolled back when it raises.

    Routes whose side effects must follow the commit (enqueue a job, delete stored blobs) commit
    explicitly first. No connection is taken from the pool until the first query.
    """
    with session_scope(factory) as session:
        yield session


async def get_job_cache(request: Request) -> JobCache | None:
    cache: JobCache | None = getattr(request.app.state, "job_cache", None)
    return cache


async def get_storage(request: Request) -> Storage:
    storage: Storage = request.app.state.storage
    return storage


async def get_celery(request: Request) -> Celery:
    celery: Celery = request.app.state.celery
    return celery


async def get_cpu_only(request: Request) -> bool:
    """Whether the deployment's workers train on CPUs only (settled once by :func:`api.app.create_app`)."""
    return bool(getattr(request.app.state, "cpu_only", False))


SettingsDep = Annotated[Settings, Depends(get_settings)]
CpuOnlyDep = Annotated[bool, Depends(get_cpu_only)]
# scope="function": the commit happens before the response is sent, so a client that got a 201
# finds the row, and a failed commit is the request's error
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
StorageDep = Annotated[Storage, Depends(get_storage)]
CeleryDep = Annotated[Celery, Depends(get_celery)]
JobCacheDep = Annotated[JobCache | None, Depends(get_job_cache)]

_bearer = HTTPBearer(auto_error=False, description="An API key of your tenant: `Authorization: Bearer ns_…`.")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the tenant that owns the request's API key."""

    tenant_id: uuid.UUID
    tenant_name: str


async def get_tenant(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal:
    """The tenant of the ``Authorization: Bearer`` key; 401 (with ``WWW-Authenticate``) if missing or not live.

    The key's request is then counted against its rate limit (:mod:`api.limits`): 429 with
    ``Retry-After`` past it. Only verified keys are counted. A key found in the :class:`AuthCache`
    costs no database round trip and no hop to the thread pool; otherwise it is looked up in a
    short transaction of its own on a pool thread, so a long upload does not hold a database
    connection while its body streams in.
    """
    if credentials is None:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    cache: AuthCache | None = getattr(request.app.state, "auth_cache", None)
    digest = tenants.hash_key(credentials.credentials)
    factory = await get_session_factory(request)

    async def lookup() -> Principal | None:
        return await run_in_threadpool(_lookup_key, factory, credentials.credentials)

    principal = await (cache.resolve(digest, lookup) if cache is not None else lookup())
    if principal is None:
        raise Unauthorized("unknown or revoked API key")
    await _rate_limit(request, digest)
    return principal


def _lookup_key(factory: sessionmaker[Session], key: str) -> Principal | None:
    with factory() as session:
        tenant = tenants.tenant_for_key(session, key)
        return None if tenant is None else Principal(tenant.id, tenant.name)


async def _rate_limit(request: Request, digest: str) -> None:
    """Count one request of the key whose sha256 is ``digest``; :class:`TooManyRequests` past its limit."""
    limiter: RateLimiter | None = getattr(request.app.state, "rate_limiter", None)
    if limiter is None:
        return
    decision = await limiter.ahit(digest)
    if not decision.allowed:
        raise TooManyRequests(
            f"too many requests with this API key (at most {limiter.burst} at once and "
            f"{limiter.rate:g} per second sustained)",
            retry_after=decision.retry_after,
        )


class AuthCache:
    """Recently verified keys (by hash) -> their tenant, for ``ttl`` seconds.

    Polling clients call the API many times a second; the cache saves a database round trip per
    call. A revoked key keeps working in one API process for at most ``ttl`` seconds. Only keys
    that verified are kept, so unknown keys cannot fill it; it holds at most ``size`` entries.
    Used on the application's event loop only (:func:`get_tenant`), so it needs no lock.
    """

    def __init__(self, ttl: float, size: int = 10_000) -> None:
        self.ttl, self.size = ttl, size
        self._entries: dict[str, tuple[float, Principal]] = {}
        self._pending: dict[str, asyncio.Future[Principal | None]] = {}

    async def resolve(self, digest: str, lookup: Callable[[], Awaitable[Principal | None]]) -> Principal | None:
        """The cached tenant of the key, else ``lookup()``'s answer (kept when not None).

        Lookups of one key are shared: when an entry expires under load, every request of that key
        in flight would otherwise miss at the same moment and each ask the database (50 lookups on
        the thread pool at once stalled a closed loop of 50 clients for ~100 ms every ``ttl``). The
        first starts the lookup; the others wait for its answer.
        """
        hit = self.get(digest)
        if hit is not None:
            return hit
        pending = self._pending.get(digest)
        if pending is None:
            pending = self._pending[digest] = asyncio.ensure_future(lookup())
            pending.add_done_callback(lambda _: self._pending.pop(digest, None))
        principal = await asyncio.shield(pending)  # a waiter that is cancelled leaves it to the others
        if principal is not None:
            self.put(digest, principal)
        return principal

    def get(self, digest: str) -> Principal | None:
        entry = self._entries.get(digest)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def put(self, digest: str, principal: Principal) -> None:
        if len(self._entries) >= self.size:
            now = time.monotonic()
            self._entries = {k: v for k, v in self._entries.items() if v[0] >= now}
            if len(self._entries) >= self.size:
                self._entries.clear()
        self._entries[digest] = (time.monotonic() + self.ttl, principal)


TenantDep = Annotated[Principal, Depends(get_tenant)]
