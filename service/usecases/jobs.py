"""Jobs: create (commit, then enqueue), read, cancel, delete with their files.

Idempotency: a create with an ``idempotency_key`` the tenant used before returns the job that key
created, and enqueues nothing; the same key with a different request is a
:class:`~service.errors.Conflict`. Quota: a tenant may have
``Settings.max_active_jobs_per_tenant`` jobs queued or running
(:func:`service.quotas.check_job_quota`); a replayed key passes. CPU time: on a CPU-only deployment a
job whose estimated training time is over ``Settings.cpu_job_limit_seconds`` is refused before
anything is written (:mod:`service.estimates`); a replayed key passes.

Enqueueing happens only after the job row is committed. If the broker cannot take the message,
the job stays ``queued`` and the create still succeeds: the reaper re-sends queued jobs.
"""

from __future__ import annotations

import fnmatch
import logging
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from celery import Celery
from sqlalchemy.orm import Session

from service import estimates, keys, quotas
from service.errors import Conflict, InvalidRequest, NotFound
from service.orm import TERMINAL_STATES, Job, Model
from service.queue import enqueue_job
from service.repositories import jobs, jobstate, models
from service.settings import Settings
from service.storage import Storage
from service.usecases import found, remove_stored

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class JobRequest:
    """What a client asks to run: ``settings`` holds only the knobs it set (``iterations`` among them)."""

    model_id: uuid.UUID
    dataset_id: uuid.UUID
    method: str
    target: dict[str, Any]
    settings: dict[str, Any]
    name: str | None = None
    tags: tuple[str, ...] = ()


def create_job(
    session: Session,
    app: Celery,
    settings: Settings,
    tenant_id: uuid.UUID,
    request: JobRequest,
    idempotency_key: str | None = None,
    *,
    cpu_only: bool = False,
) -> tuple[Job, bool]:
    """Queue a job on one of the tenant's models and data sets: the job, and whether it was created now.

    :class:`~service.errors.NotFound` if the model or data set is not the tenant's,
    :class:`~service.errors.ExceedsCpuTimeLimit` when ``cpu_only`` (the deployment's workers train
    on CPUs, :func:`service.estimates.trains_on_cpu_only`) and the job's estimated training time is
    over ``Settings.cpu_job_limit_seconds``, :class:`~service.errors.QuotaExceeded` past the
    active-jobs quota. A new job is committed, then enqueued; a replayed ``idempotency_key`` returns
    the job it created (False), or :class:`Conflict` if this request differs from that one.
    """
    model = models.rows.get(session, tenant_id, request.model_id)  # None: not the tenant's (the insert says so)
    if model is not None:
        check_layer_names(model, request)
        if cpu_only:
            check_cpu_time(session, settings, tenant_id, model, request, idempotency_key)
    quotas.check_job_quota(session, settings, tenant_id, idempotency_key)
    total = request.settings.get("iterations")
    job, created = jobs.create_job(
        session, tenant_id, total_iterations=total, idempotency_key=idempotency_key, **asdict(request)
    )
    if not created:
        stored = JobRequest(
            job.model_id, job.dataset_id, job.method, job.target, job.settings, job.name, tuple(job.tags)
        )
        if stored != request:
            raise Conflict(f"Idempotency-Key {idempotency_key!r} was used for a different job request")
        return job, False
    session.commit()  # the task must find the row: enqueue only after the commit
    try:
        enqueue_job(app, job.id)
    except Exception:  # the broker is down: the job stays queued and the reaper sends it later
        log.warning("job %s committed but not enqueued; the reaper will re-send it", job.id, exc_info=True)
    return job, True


#: How many of a model's layer names a refusal lists before it points to ``GET /v1/models/{id}``.
LISTED_LAYERS = 24


def check_layer_names(model: Model, request: JobRequest) -> None:
    """:class:`~service.errors.InvalidRequest` if a layer name or pattern of the job matches no layer of its model.

    ``layer_kept`` (target), ``include``, ``exclude`` and ``crates`` (settings) name layers or glob
    patterns over them; each must match at least one of the prunable layers the upload found
    (``models.layers``). A model uploaded before the names were recorded passes: the worker checks
    the names when it runs.
    """
    if not model.layers:
        return
    layers = [str(name) for name in model.layers]
    given: list[tuple[str, str, str]] = []  # (part of the body, field, pattern)
    given += [("target", "layer_kept", p) for p in request.target.get("layer_kept") or {}]
    given += [("settings", key, p) for key in ("include", "exclude") for p in request.settings.get(key) or []]
    given += [("settings", "crates", p) for p in request.settings.get("crates") or {}]
    unknown = [(part, key, p) for part, key, p in given if not any(fnmatch.fnmatchcase(n, p) for n in layers)]
    if not unknown:
        return
    shown = ", ".join(layers[:LISTED_LAYERS])
    if len(layers) > LISTED_LAYERS:
        shown += f" … and {len(layers) - LISTED_LAYERS} more (GET /v1/models/{model.id} lists them all)"
    fields = [
        {
            "loc": ["body", part, key],
            "msg": f"{p!r} matches no prunable layer of the model; its layers: {shown}",
            "type": "unknown_layer",
        }
        for part, key, p in unknown
    ]
    names = ", ".join(repr(p) for _, _, p in unknown)
    raise InvalidRequest(
        f"{names} {'matches' if len(unknown) == 1 else 'match'} no prunable layer of model {model.name!r}; "
        f"its layers: {shown}",
        extra={"fields": fields},
    )


def check_cpu_time(
    session: Session,
    settings: Settings,
    tenant_id: uuid.UUID,
    model: Model,
    request: JobRequest,
    idempotency_key: str | None,
) -> None:
    """:class:`~service.errors.ExceedsCpuTimeLimit` if the job would train for longer than the CPU limit.

    Reads only: call it before anything is written. A model without a FLOPs count passes; so does a
    replayed ``idempotency_key``, which returns the job it created whatever the limit is now.
    """
    limit = settings.cpu_job_limit_seconds
    if limit <= 0 or model.flops_per_example is None:
        return
    estimate = estimates.TrainingEstimate.of(settings, model.flops_per_example, request.settings)
    if estimate.seconds <= limit:
        return
    if idempotency_key is not None and jobs.get_job_by_idempotency_key(session, tenant_id, idempotency_key):
        return
    estimates.check_cpu_time(estimate, limit)


def get_job(session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID) -> Job:
    """The tenant's job; :class:`NotFound` if missing or another tenant's."""
    return found(jobs.get_job(session, tenant_id, job_id), "job", job_id)


def update_labels(session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID, changes: dict[str, Any]) -> Job:
    """Set the tenant's job's name and/or tags (committed); :class:`NotFound` if not the tenant's."""
    job = found(jobs.update_labels(session, tenant_id, job_id, changes), "job", job_id)
    session.commit()
    session.refresh(job)
    return job


def cancel_job(session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID) -> Job:
    """Ask the tenant's job to stop (committed); the job as it is then.

    A queued job is cancelled at once; a running one is flagged (``cancel_requested``) and stops at
    its worker's next check. :class:`Conflict` if the job already finished.
    """
    job = get_job(session, tenant_id, job_id)
    if job.state in TERMINAL_STATES:
        raise Conflict(f"job {job_id} is already {job.state}")
    state = jobstate.request_cancel(session, job_id)
    if state is None:
        raise NotFound(f"job {job_id} not found")
    if state in TERMINAL_STATES and state != "cancelled":
        raise Conflict(f"job {job_id} is already {state}")
    session.commit()
    session.refresh(job)
    return job


def delete_job(session: Session, storage: Storage, tenant_id: uuid.UUID, job_id: uuid.UUID) -> None:
    """Delete a finished job with its history (committed), then its artifacts and checkpoint.

    :class:`Conflict` while the job is queued or running.
    """
    if not jobs.delete_job(session, tenant_id, job_id):
        raise NotFound(f"job {job_id} not found")
    session.commit()
    remove_stored(storage, keys.job_prefix(job_id))  # every artifact and the checkpoint live under it
