"""``/healthz`` (the process answers) and ``/readyz`` (the database and the broker answer too)."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Depends
from sqlalchemy.orm import Session, sessionmaker

from api.deps import CeleryDep, get_session_factory
from api.routes.common import responses
from api.schemas import Health, Readiness
from service.errors import ServiceUnavailable
from service.queue import broker_reachable
from service.repositories import ping

log = logging.getLogger(__name__)

router = APIRouter(tags=["health"])

BROKER_TIMEOUT_S = 1.0


def database_reachable(factory: sessionmaker[Session]) -> bool:
    try:
        with factory() as session:
            ping(session)
        return True
    except Exception as e:  # any failure to run SELECT 1 means "not ready"
        log.warning("readiness: database unreachable: %s", e)
        return False


@router.get("/healthz", response_model=Health, summary="Liveness")
async def healthz() -> Health:
    """200 whenever the process can answer; checks nothing else."""
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Readiness",
    responses={503: responses(ServiceUnavailable)[503]},
)
def readyz(factory: Annotated[sessionmaker[Session], Depends(get_session_factory)], celery: CeleryDep) -> Readiness:
    """200 when the database answers ``SELECT 1`` and the broker accepts a connection; else 503 naming
    which failed (``database`` / ``broker`` false in the body).
    """
    database = database_reachable(factory)
    broker = broker_reachable(celery, timeout=BROKER_TIMEOUT_S)
    if not (database and broker):
        failed = [name for name, ok in (("database", database), ("broker", broker)) if not ok]
        raise ServiceUnavailable(
            f"not ready: {' and '.join(failed)} unreachable", extra={"database": database, "broker": broker}
        )
    return Readiness(status="ok", database=True, broker=True)
