"""``/v1/jobs``: create (commit, then enqueue), read, list, progress and per-layer history, cancel, delete.

Idempotency: a ``POST /v1/jobs`` with an ``Idempotency-Key`` the tenant used before returns the
job that key created, with **200** (and ``Idempotent-Replayed: true``) instead of 202, and
enqueues nothing; the same key with a different body is a 409. Keys are per tenant, up to 255
characters.

Quota: a tenant may have ``Settings.max_active_jobs_per_tenant`` jobs queued or running; a create past
it is a 429 (``quota_exceeded``, ``Retry-After``), checked under a lock on the tenant's row in the
transaction that inserts the job (:func:`api.limits.check_job_quota`). A replayed key passes.

Enqueueing happens only after the job row is committed. If the broker cannot take the message,
the job stays ``queued`` and the answer is still 202: the reaper re-sends queued jobs.
"""

from __future__ import annotations

import logging
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response

from api import jobstate, repository
from api.database import Reader
from api.db import TERMINAL_STATES, Job
from api.deps import CeleryDep, JobCacheDep, SessionDep, SettingsDep, StorageDep, TenantDep
from api.errors import BadRequest, Conflict, NotFound, QuotaExceeded
from api.jobcache import JobCache
from api.limits import check_job_quota
from api.queue import enqueue_job
from api.routes.common import Limit, Offset, remove_blobs, responses
from api.schemas import (
    JobCreate,
    JobPage,
    JobRead,
    JobState,
    LayerHistoryRead,
    LayerKept,
    LayerSnapshot,
    ProgressPointRead,
    ProgressRead,
)

log = logging.getLogger(__name__)

router = APIRouter(prefix="/jobs", tags=["jobs"])

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        description="Repeat a create safely: the same key returns the job it created (200) instead of a new one.",
    ),
]
After = Annotated[int, Query(ge=-1, description="Cursor: return iterations after this one (-1: from the start).")]


def job_prefix(job_id: uuid.UUID) -> str:
    return f"jobs/{job_id}"


def _job(session: SessionDep, tenant: TenantDep, job_id: uuid.UUID) -> Job:
    job = repository.get_job(session, tenant.tenant_id, job_id)
    if job is None:
        raise NotFound(f"job {job_id} not found")
    return job


@router.post(
    "",
    status_code=202,
    response_model=JobRead,
    summary="Create a compression job",
    responses={
        200: {"model": JobRead, "description": "A repeated Idempotency-Key: the job that key created."},
        **responses(BadRequest, NotFound, Conflict, QuotaExceeded),
    },
)
def create_job(
    body: JobCreate,
    response: Response,
    tenant: TenantDep,
    session: SessionDep,
    celery: CeleryDep,
    app_settings: SettingsDep,
    idempotency_key: IdempotencyKey = None,
) -> JobRead:
    """Queue a job on one of the tenant's models and data sets (404 if either is not the tenant's).

    The answer (202) is the queued job; poll ``GET /v1/jobs/{id}``. 429 (``quota_exceeded``) while the
    tenant already has its quota of jobs queued or running.
    """
    check_job_quota(session, app_settings, tenant.tenant_id, idempotency_key)
    target: dict[str, Any] = body.target.model_dump(exclude_none=True) if body.target is not None else {}
    settings = body.settings.model_dump(exclude_none=True)
    job, created = repository.create_job(
        session,
        tenant.tenant_id,
        model_id=body.model_id,
        dataset_id=body.dataset_id,
        method=body.method,
        target=target,
        settings=settings,
        total_iterations=body.settings.iterations,
        idempotency_key=idempotency_key,
    )
    if not created:
        first = (job.model_id, job.dataset_id, job.method, job.target, job.settings)
        if first != (body.model_id, body.dataset_id, body.method, target, settings):
            raise Conflict(f"Idempotency-Key {idempotency_key!r} was used for a different job request")
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
    else:
        session.commit()  # the task must find the row: enqueue only after the commit
        try:
            enqueue_job(celery, job.id)
        except Exception:  # the broker is down: the job stays queued and the reaper sends it later
            log.warning("job %s committed but not enqueued; the reaper will re-send it", job.id, exc_info=True)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return JobRead.model_validate(job)


@router.get("", response_model=JobPage, summary="List jobs", responses=responses())
def list_jobs(
    tenant: TenantDep,
    session: SessionDep,
    state: Annotated[JobState | None, Query(description="Only jobs in this state.")] = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> JobPage:
    """The tenant's jobs, newest first."""
    page = repository.list_jobs(session, tenant.tenant_id, state=state, limit=limit, offset=offset)
    return JobPage(items=[JobRead.model_validate(j) for j in page.items], total=page.total, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=JobRead, summary="Get a job", responses=responses(NotFound))
async def get_job(job_id: uuid.UUID, tenant: TenantDep, request: Request) -> JobRead:
    """State, iteration of total, latest loss, validation accuracy, compression and per-layer kept/total."""
    # the route clients poll: served from memory until the row changes (api.jobcache), else one read
    # on the event loop (api.database.Reader); no session, no thread. Cache and reader come straight
    # from app.state: as dependencies they cost ~7% of this route's rate in a closed loop.
    cache: JobCache | None = request.app.state.job_cache
    reader: Reader = request.app.state.reader
    if cache is not None and (hit := cache.get(job_id, tenant.tenant_id)) is not None:
        answer: JobRead = hit
        return answer
    token = cache.token() if cache is not None else 0
    row = await reader.first(repository.JOB_ROW, tenant_id=tenant.tenant_id, job_id=job_id)
    if row is None:
        raise NotFound(f"job {job_id} not found")
    answer = JobRead.model_validate(row)
    if cache is not None:
        cache.put(job_id, tenant.tenant_id, answer, token)
    return answer


@router.get(
    "/{job_id}/progress", response_model=ProgressRead, summary="Progress history", responses=responses(NotFound)
)
def get_progress(
    job_id: uuid.UUID,
    tenant: TenantDep,
    session: SessionDep,
    after: After = -1,
    limit: Annotated[int, Query(ge=1, le=repository.MAX_PAGE, description="Points per page.")] = 500,
) -> ProgressRead:
    """Logged iterations after ``after``, oldest first; poll with ``after=next_after`` for new ones."""
    _job(session, tenant, job_id)
    points = repository.list_progress(session, job_id, after_iteration=after, limit=limit)
    return ProgressRead(
        items=[ProgressPointRead.model_validate(p) for p in points],
        next_after=points[-1].iteration if points else after,
    )


@router.get(
    "/{job_id}/layers", response_model=LayerHistoryRead, summary="Per-layer history", responses=responses(NotFound)
)
def get_layers(
    job_id: uuid.UUID,
    tenant: TenantDep,
    session: SessionDep,
    after: After = -1,
    limit: Annotated[int, Query(ge=1, le=repository.MAX_PAGE, description="Iterations per page.")] = 100,
) -> LayerHistoryRead:
    """Per-layer kept/total at each logged iteration after ``after``; a page never splits an iteration."""
    _job(session, tenant, job_id)
    snapshots: list[LayerSnapshot] = []
    for p in repository.list_layer_history(session, job_id, after_iteration=after, iterations=limit):
        if not snapshots or snapshots[-1].iteration != p.iteration:
            snapshots.append(LayerSnapshot(iteration=p.iteration, layers=[]))
        snapshots[-1].layers.append(LayerKept(layer=p.layer, kept=p.kept, total=p.total))
    return LayerHistoryRead(items=snapshots, next_after=snapshots[-1].iteration if snapshots else after)


@router.post(
    "/{job_id}/cancel",
    status_code=202,
    response_model=JobRead,
    summary="Cancel a job",
    responses=responses(NotFound, Conflict),
)
def cancel_job(job_id: uuid.UUID, tenant: TenantDep, session: SessionDep, cache: JobCacheDep) -> JobRead:
    """A queued job is cancelled at once; a running one is flagged (``cancel_requested``) and stops at its
    worker's next check. 409 if the job already finished.
    """
    job = _job(session, tenant, job_id)
    if job.state in TERMINAL_STATES:
        raise Conflict(f"job {job_id} is already {job.state}")
    state = jobstate.request_cancel(session, job_id)
    if state is None:
        raise NotFound(f"job {job_id} not found")
    if state in TERMINAL_STATES and state != "cancelled":
        raise Conflict(f"job {job_id} is already {state}")
    session.commit()
    if cache is not None:  # the database's notice follows within milliseconds; this one is at once
        cache.invalidate(job_id)
    session.refresh(job)
    return JobRead.model_validate(job)


@router.delete("/{job_id}", status_code=204, summary="Delete a job", responses=responses(NotFound, Conflict))
def delete_job(
    job_id: uuid.UUID, tenant: TenantDep, session: SessionDep, storage: StorageDep, cache: JobCacheDep
) -> Response:
    """Delete a finished job, its history and its artifacts (409 while it is queued or running)."""
    keys = [a.uri for a in repository.list_artifacts(session, tenant.tenant_id, job_id)]
    if not repository.delete_job(session, tenant.tenant_id, job_id):
        raise NotFound(f"job {job_id} not found")
    session.commit()
    if cache is not None:
        cache.invalidate(job_id)
    for key in keys:
        try:
            storage.delete(key)
        except (ValueError, OSError):
            log.warning("could not remove artifact %s of deleted job %s", key, job_id, exc_info=True)
    remove_blobs(storage, job_prefix(job_id))
    return Response(status_code=204)
