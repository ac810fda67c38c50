"""``/v1/jobs``: create (commit, then enqueue), read, list, progress and per-layer history, cancel, delete.

Idempotency: a ``POST /v1/jobs`` with an ``Idempotency-Key`` the tenant used before returns the
job that key created, with **200** (and ``Idempotent-Replayed: true``) instead of 202, and
enqueues nothing; the same key with a different body is a 409. Keys are per tenant, up to 255
characters.

Quota: a tenant may have ``Settings.max_active_jobs_per_tenant`` jobs queued or running; a create past
it is a 429 (``quota_exceeded``, ``Retry-After``), checked under a lock on the tenant's row in the
transaction that inserts the job (:func:`service.quotas.check_job_quota`). A replayed key passes.

CPU time: on a CPU-only deployment a job whose estimated training time is over
``Settings.cpu_job_limit_seconds`` is a 422 (``exceeds_cpu_time_limit``) with the estimate, before
anything is written (:mod:`service.estimates`). A replayed key passes.

Enqueueing happens only after the job row is committed. If the broker cannot take the message,
the job stays ``queued`` and the answer is still 202: the reaper re-sends queued jobs
(:func:`service.usecases.jobs.create_job`).
"""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request, Response

from api.deps import CeleryDep, CpuOnlyDep, JobCacheDep, SessionDep, SettingsDep, StorageDep, TenantDep
from api.jobcache import JobCache
from api.routes.common import Limit, Offset, responses
from api.schemas import (
    PRINTABLE,
    FrontierRead,
    JobCreate,
    JobPage,
    JobRead,
    JobState,
    JobUpdate,
    LayerHistoryRead,
    LayerKept,
    LayerSnapshot,
    LogLineRead,
    LogRead,
    ProgressPointRead,
    ProgressRead,
    Tag,
)
from dns_core.defaults import SEARCH_METHODS, SEARCH_METHODS_TEXT, Method
from service.database import Reader
from service.errors import BadRequest, Conflict, ExceedsCpuTimeLimit, NotFound, QuotaExceeded
from service.orm import NAME_LENGTH, Job
from service.repositories import MAX_PAGE
from service.repositories import jobs as repository
from service.usecases import jobs

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
PointLimit = Annotated[int, Query(ge=1, le=MAX_PAGE, description="Points per page.")]
IterationLimit = Annotated[int, Query(ge=1, le=MAX_PAGE, description="Iterations per page.")]


def get_tenant_job(job_id: uuid.UUID, tenant: TenantDep, session: SessionDep) -> Job:
    """The tenant's job named by the path; 404 if missing or another tenant's."""
    return jobs.get_job(session, tenant.tenant_id, job_id)


JobDep = Annotated[Job, Depends(get_tenant_job)]


_CREATE_RESPONSES = {
    200: {"model": JobRead, "description": "A repeated Idempotency-Key: the job that key created."},
    **responses(BadRequest, NotFound, Conflict, ExceedsCpuTimeLimit, QuotaExceeded),
}


@router.post("", status_code=202, summary="Create a compression job", responses=_CREATE_RESPONSES)
def create_job(
    body: JobCreate,
    response: Response,
    tenant: TenantDep,
    session: SessionDep,
    celery: CeleryDep,
    app_settings: SettingsDep,
    cpu_only: CpuOnlyDep,
    idempotency_key: IdempotencyKey = None,
) -> JobRead:
    """Queue a job on one of the tenant's models and data sets (404 if either is not the tenant's).

    The answer (202) is the queued job; poll ``GET /v1/jobs/{id}``. 429 (``quota_exceeded``) while the
    tenant already has its quota of jobs queued or running. 422 (``exceeds_cpu_time_limit``) on a
    deployment that trains on CPUs only when the job's estimated training time (from the model's
    FLOPs, counted at upload, the iterations and the batch size) is over its limit.
    """
    job, created = jobs.create_job(
        session, celery, app_settings, tenant.tenant_id, body.request(), idempotency_key, cpu_only=cpu_only
    )
    if not created:
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return JobRead.model_validate(job)


@router.get("", response_model=JobPage, summary="List jobs", responses=responses())
def list_jobs(
    tenant: TenantDep,
    session: SessionDep,
    state: Annotated[
        list[JobState] | None, Query(description="Only jobs in one of these states (repeat the parameter).")
    ] = None,
    method: Annotated[Method | None, Query(description="Only jobs of this method.")] = None,
    model_id: Annotated[uuid.UUID | None, Query(description="Only jobs on this model.")] = None,
    dataset_id: Annotated[uuid.UUID | None, Query(description="Only jobs on this data set.")] = None,
    name: Annotated[
        str | None,
        Query(max_length=NAME_LENGTH, pattern=PRINTABLE, description="Only jobs whose name holds this (any case)."),
    ] = None,
    tag: Annotated[Tag | None, Query(description="Only jobs with this tag.")] = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> JobPage:
    """The tenant's jobs, newest first, with ``total`` across all pages; every filter given must hold."""
    where = repository.JobFilter(
        states=state or (), method=method, model_id=model_id, dataset_id=dataset_id, name=name, tag=tag
    )
    page = repository.list_jobs(session, tenant.tenant_id, where=where, limit=limit, offset=offset)
    return JobPage(items=[JobRead.model_validate(j) for j in page.items], total=page.total, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=JobRead, summary="Get a job", responses=responses(NotFound))
async def get_job(job_id: uuid.UUID, tenant: TenantDep, request: Request) -> JobRead:
    """State, iteration of total, latest loss, validation accuracy, compression and per-layer kept/total."""
    # the route clients poll: served from memory until the row changes (api.jobcache), else one read
    # on the event loop (service.database.Reader); no session, no thread. Cache and reader come straight
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


@router.patch("/{job_id}", response_model=JobRead, summary="Rename or retag a job", responses=responses(NotFound))
def update_job(
    job_id: uuid.UUID, body: JobUpdate, tenant: TenantDep, session: SessionDep, cache: JobCacheDep
) -> JobRead:
    """Set the job's ``name`` and/or ``tags`` (the fields sent replace the old values), in any state."""
    job = jobs.update_labels(session, tenant.tenant_id, job_id, body.changes())
    if cache is not None:
        cache.invalidate(job_id)
    return JobRead.model_validate(job)


@router.get("/{job_id}/logs", response_model=LogRead, summary="Job log", responses=responses(NotFound))
def get_logs(
    job: JobDep,
    session: SessionDep,
    after: Annotated[int, Query(ge=0, description="Cursor: lines after this id (0: from the start).")] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="Lines per page.")] = 500,
) -> LogRead:
    """The log lines the worker wrote while it ran the job, oldest first; a failed job's traceback is
    among them. Poll with ``after=next_after`` for new lines.
    """
    lines = repository.list_logs(session, job.id, after=after, limit=limit)
    return LogRead(
        items=[LogLineRead.model_validate(line) for line in lines], next_after=lines[-1].id if lines else after
    )


@router.get(
    "/{job_id}/progress", response_model=ProgressRead, summary="Progress history", responses=responses(NotFound)
)
def get_progress(job: JobDep, session: SessionDep, after: After = -1, limit: PointLimit = 500) -> ProgressRead:
    """Logged iterations after ``after``, oldest first; poll with ``after=next_after`` for new ones."""
    points = repository.list_progress(session, job.id, after_iteration=after, limit=limit)
    return ProgressRead(
        items=[ProgressPointRead.model_validate(p) for p in points],
        next_after=points[-1].iteration if points else after,
    )


@router.get(
    "/{job_id}/frontier",
    response_model=FrontierRead,
    summary="Budget search frontier",
    responses=responses(NotFound),
)
def get_frontier(job: JobDep) -> FrontierRead:
    """A dns, agp or han job with an accuracy budget climbs a ladder of compressions, each judged on validation at
    a rung's end: up to the highest within the budget, or up to the asked compression when one was given.
    Each rung's compression and accuracy (validation, and test when the data has it), the chosen point and
    the downloadable candidates. 404 for a job without a budget, with per-layer kept fractions, or of
    another method.
    """
    budget = job.target.get("max_accuracy_drop")
    if budget is None or job.target.get("layer_kept") is not None or job.method not in SEARCH_METHODS:
        raise NotFound(
            f"job {job.id} has no frontier: only {SEARCH_METHODS_TEXT} jobs with an accuracy budget "
            "(and an overall compression, if any) climb one"
        )
    stored = job.frontier or {}
    return FrontierRead(
        job_id=job.id,
        state=job.state,  # type: ignore[arg-type]
        max_accuracy_drop=float(budget),
        reference_val_acc=stored.get("reference_val_acc"),
        points=stored.get("points", []),
        chosen=stored.get("chosen"),
        candidates=stored.get("candidates", []),
        verdict=stored.get("verdict"),
    )


@router.get(
    "/{job_id}/layers", response_model=LayerHistoryRead, summary="Per-layer history", responses=responses(NotFound)
)
def get_layers(job: JobDep, session: SessionDep, after: After = -1, limit: IterationLimit = 100) -> LayerHistoryRead:
    """Per-layer kept/total at each logged iteration after ``after``; a page never splits an iteration."""
    snapshots: list[LayerSnapshot] = []
    for p in repository.list_layer_history(session, job.id, after_iteration=after, iterations=limit):
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
    job = jobs.cancel_job(session, tenant.tenant_id, job_id)
    if cache is not None:  # the database's notice follows within milliseconds; this one is at once
        cache.invalidate(job_id)
    return JobRead.model_validate(job)


@router.delete("/{job_id}", status_code=204, summary="Delete a job", responses=responses(NotFound, Conflict))
def delete_job(
    job_id: uuid.UUID, tenant: TenantDep, session: SessionDep, storage: StorageDep, cache: JobCacheDep
) -> Response:
    """Delete a finished job, its history and its artifacts (409 while it is queued or running)."""
    jobs.delete_job(session, storage, tenant.tenant_id, job_id)
    if cache is not None:
        cache.invalidate(job_id)
    return Response(status_code=204)
