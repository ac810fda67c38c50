"""Request dependencies, as named ``Annotated`` aliases.

Everything comes from ``request.app.state`` (filled by :func:`api.app.create_app`), so a test can
build an app from its own settings, or replace any of these through ``app.dependency_overrides``
(override the ``get_…`` function, e.g. ``app.dependency_overrides[get_storage] = lambda: store``).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from celery import Celery
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from api import repository
from api.errors import TooManyRequests, Unauthorized
from api.limits import RateLimiter
from api.settings import Settings
from api.storage import Storage


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_session_factory(request: Request) -> sessionmaker[Session]:
    factory: sessionmaker[Session] = request.app.state.session_factory
    return factory


def get_session(factory: Annotated[sessionmaker[Session], Depends(get_session_factory)]) -> Iterator[Session]:
    """The request's unit of work: committed when the route returns normally, rolled back when it raises.

    Routes whose side effects must follow the commit (enqueue a job, delete stored blobs) commit
    explicitly first. No connection is taken from the pool until the first query.
    """
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def get_storage(request: Request) -> Storage:
    storage: Storage = request.app.state.storage
    return storage


def get_celery(request: Request) -> Celery:
    celery: Celery = request.app.state.celery
    return celery


SettingsDep = Annotated[Settings, Depends(get_settings)]
# scope="function": the commit happens before the response is sent, so a client that got a 201
# finds the row, and a failed commit is the request's error
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
StorageDep = Annotated[Storage, Depends(get_storage)]
CeleryDep = Annotated[Celery, Depends(get_celery)]

_bearer = HTTPBearer(auto_error=False, description="An API key of your tenant: `Authorization: Bearer ns_…`.")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the tenant that owns the request's API key."""

    tenant_id: uuid.UUID
    tenant_name: str


def get_tenant(
    request: Request,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The tenant of the ``Authorization: Bearer`` key; 401 (with ``WWW-Authenticate``) if missing or not live.

    The key's request is then counted against its rate limit (:mod:`api.limits`): 429 with
    ``Retry-After`` past it. Only verified keys are counted. The lookup's read transaction ends here,
    so a long upload does not hold a database connection while its body streams in.
    """
    if credentials is None:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    cache: AuthCache | None = getattr(request.app.state, "auth_cache", None)
    digest = repository.hash_key(credentials.credentials)
    if cache is not None and (hit := cache.get(digest)) is not None:
        _rate_limit(request, digest)
        return hit
    tenant = repository.tenant_for_key(session, credentials.credentials)
    if tenant is None:
        session.rollback()
        raise Unauthorized("unknown or revoked API key")
    principal = Principal(tenant.id, tenant.name)
    session.commit()
    if cache is not None:
        cache.put(digest, principal)
    _rate_limit(request, digest)
    return principal


def _rate_limit(request: Request, digest: str) -> None:
    """Count one request of the key whose sha256 is ``digest``; :class:`TooManyRequests` past its limit."""
    limiter: RateLimiter | None = getattr(request.app.state, "rate_limiter", None)
    if limiter is None:
        return
    decision = limiter.hit(digest)
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
    """

    def __init__(self, ttl: float, size: int = 10_000) -> None:
        self.ttl, self.size = ttl, size
        self._entries: dict[str, tuple[float, Principal]] = {}
        self._lock = threading.Lock()

    def get(self, digest: str) -> Principal | None:
        entry = self._entries.get(digest)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def put(self, digest: str, principal: Principal) -> None:
        with self._lock:
            if len(self._entries) >= self.size:
                now = time.monotonic()
                self._entries = {k: v for k, v in self._entries.items() if v[0] >= now}
                if len(self._entries) >= self.size:
                    self._entries.clear()
            self._entries[digest] = (time.monotonic() + self.ttl, principal)


TenantDep = Annotated[Principal, Depends(get_tenant)]
