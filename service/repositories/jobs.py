"""Jobs and what they accumulate: progress points, per-layer points, artifacts; and the change notices.

State changes are not here but in :mod:`service.repositories.jobstate`; the writes a worker makes
here (progress, layer points, artifacts) are fenced by its attempt through it.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, TypeVar

import psycopg
from sqlalchemy import ColumnElement, bindparam, case, cast, delete, exists, func, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from service.errors import Conflict, NotFound
from service.orm import (
    JOB_STATES,
    NAME_LENGTH,
    TERMINAL_STATES,
    Artifact,
    Dataset,
    Job,
    JobLog,
    LayerPoint,
    Model,
    ProgressPoint,
    utcnow,
)
from service.repositories import (
    MAX_PAGE,
    Page,
    check_page,
    datasets,
    deleted_any,
    insert_ignoring,
    jobstate,
    models,
    page,
)

#: A kind of point a job accumulates by iteration.
P = TypeVar("P", ProgressPoint, LayerPoint)


def create_job(
    session: Session,
    tenant_id: uuid.UUID,
    *,
    model_id: uuid.UUID,
    dataset_id: uuid.UUID,
    method: str,
    target: dict[str, Any],
    settings: dict[str, Any],
    total_iterations: int | None = None,
    idempotency_key: str | None = None,
    name: str | None = None,
    tags: Sequence[str] = (),
) -> tuple[Job, bool]:
    """A new queued job, and True; or, for an ``idempotency_key`` the tenant used before, that job and False.

    The model and dataset must be the tenant's (:class:`NotFound` otherwise). A repeated key returns
    the first job whatever the other arguments are; the caller may compare them. The insert is an
    ``INSERT … ON CONFLICT DO NOTHING``, so two concurrent requests with one key make one job.
    Enqueue the task only after the caller's commit.
    """
    if models.rows.get(session, tenant_id, model_id) is None:
        raise NotFound(f"model {model_id} not found")
    if datasets.rows.get(session, tenant_id, dataset_id) is None:
        raise NotFound(f"dataset {dataset_id} not found")
    values: dict[str, Any] = {
        "id": uuid.uuid4(),
        "tenant_id": tenant_id,
        "model_id": model_id,
        "dataset_id": dataset_id,
        "state": "queued",
        "method": method,
        "target": target,
        "settings": settings,
        "total_iterations": total_iterations,
        "idempotency_key": idempotency_key,
        "name": name,
        "tags": list(tags),
    }
    if idempotency_key is None:
        job = Job(**values)
        session.add(job)
        session.flush()
        return job, True
    stmt = insert_ignoring(session, Job, ["tenant_id", "idempotency_key"]).values(values).returning(Job.id)
    if session.execute(stmt).first() is not None:
        created = session.get(Job, values["id"])
        assert created is not None
        return created, True
    existing = session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == idempotency_key))
    assert existing is not None, "conflicting idempotency key vanished"
    return existing, False


#: The tenant's job as one plain row (every column, no ORM object), for :class:`service.database.Reader`;
#: parameters ``tenant_id`` and ``job_id``.
JOB_ROW: Final = select(*Job.__table__.columns).where(
    Job.id == bindparam("job_id"), Job.tenant_id == bindparam("tenant_id")
)


def get_job(session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID) -> Job | None:
    """The tenant's job ``job_id``; None if missing or another tenant's."""
    return session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id))


@dataclass(frozen=True, slots=True)
class JobFilter:
    """Which of a tenant's jobs to list: every field given must hold (``states``: any of them)."""

    states: Sequence[str] = ()
    method: str | None = None
    model_id: uuid.UUID | None = None
    dataset_id: uuid.UUID | None = None
    name: str | None = None  # a case-insensitive part of the name
    tag: str | None = None  # one of the job's tags, exactly


def _like_pattern(text: str) -> str:
    """``%text%`` with LIKE's wildcards in ``text`` taken literally (escape character ``\\``)."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _has_tag(session: Session, tag: str) -> ColumnElement[bool]:
    """The condition that a job's ``tags`` (a JSON list) holds ``tag``, on the session's database."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return cast(Job.tags, postgresql.JSONB).contains([tag])
    if dialect == "sqlite":
        element = func.json_each(Job.tags).table_valued("value")
        return exists(select(1).select_from(element).where(element.c.value == tag))
    raise NotImplementedError(f"tag filter on {dialect!r}")  # pragma: no cover


def list_jobs(
    session: Session,
    tenant_id: uuid.UUID,
    *,
    state: str | None = None,
    where: JobFilter | None = None,
    limit: int = 50,
    offset: int = 0,
) -> Page[Job]:
    """The tenant's jobs, newest first: those in ``state`` if given, and those ``where`` selects."""
    where = where or JobFilter()
    states = list(where.states) + ([state] if state is not None else [])
    for s in states:
        if s not in JOB_STATES:
            raise ValueError(f"job state must be one of {JOB_STATES}, got {s!r}")
    conditions: list[ColumnElement[bool]] = [Job.tenant_id == tenant_id]
    if states:
        conditions.append(Job.state.in_(sorted(set(states))))
    if where.method is not None:
        conditions.append(Job.method == where.method)
    if where.model_id is not None:
        conditions.append(Job.model_id == where.model_id)
    if where.dataset_id is not None:
        conditions.append(Job.dataset_id == where.dataset_id)
    if where.name:
        conditions.append(Job.name.ilike(_like_pattern(where.name), escape="\\"))
    if where.tag:
        conditions.append(_has_tag(session, where.tag))
    return page(session, Job, conditions, [Job.created_at.desc(), Job.id.desc()], limit, offset)


def update_labels(session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID, changes: dict[str, Any]) -> Job | None:
    """Set the tenant's job's ``name`` and/or ``tags`` (only those keys); the job, or None if not the tenant's."""
    unknown = set(changes) - {"name", "tags"}
    if unknown:
        raise ValueError(f"only a job's name and tags can change, not {sorted(unknown)}")
    job = get_job(session, tenant_id, job_id)
    if job is None:
        return None
    for column, value in changes.items():
        setattr(job, column, value)
    session.flush()
    return job


def delete_job(session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID) -> bool:
    """Delete a finished job with its points and artifact rows; False if none, :class:`Conflict` if not finished."""
    result = session.execute(
        delete(Job)
        .where(Job.id == job_id, Job.tenant_id == tenant_id, Job.state.in_(sorted(TERMINAL_STATES)))
        .returning(Job.id)
    )
    if deleted_any(result):
        return True
    job = get_job(session, tenant_id, job_id)
    if job is not None:
        raise Conflict(f"job {job_id} is {job.state}; cancel it and wait for it to stop first")
    return False


# ------------------------------------------------------------------------------ progress (workers)


@dataclass(frozen=True, slots=True)
class ProgressSample:
    """One logged iteration, as a worker reports it. ``at`` defaults to the time of the write."""

    iteration: int
    loss: float | None = None
    val_accuracy: float | None = None
    compression: float | None = None
    at: datetime | None = None


@dataclass(frozen=True, slots=True)
class LayerSample:
    """Sparsity of one layer at one iteration: ``kept`` of ``total`` weights survive."""

    iteration: int
    layer: str
    kept: int
    total: int


def _latest(points: Sequence[ProgressSample], field: str) -> dict[str, Any]:
    """``{field: value}`` from the highest iteration that has a value for it, or ``{}``."""
    for point in sorted(points, key=lambda p: p.iteration, reverse=True):
        value = getattr(point, field)
        if value is not None:
            return {field: value}
    return {}


def add_progress(session: Session, job_id: uuid.UUID, attempt: int, points: Sequence[ProgressSample]) -> bool:
    """Record progress points of a live attempt and update the job's summary; False (nothing written) if stale.

    Points whose iteration the job already has are ignored (a resumed attempt repeats some). The
    summary (``iteration``, ``loss``, ``val_accuracy``, ``compression``) takes the latest value of
    each in the batch.
    """
    if not points:
        return jobstate.update_live(session, job_id, attempt)
    newest = max(p.iteration for p in points)
    # a resumed attempt repeats iterations since its checkpoint: the job's iteration never goes back
    summary: dict[str, Any] = {"iteration": case((Job.iteration > newest, Job.iteration), else_=newest)}
    for field in ("loss", "val_accuracy", "compression"):
        summary.update(_latest(points, field))
    if not jobstate.update_live(session, job_id, attempt, **summary):
        return False
    now = utcnow()
    rows = [
        {
            "job_id": job_id,
            "iteration": p.iteration,
            "attempt": attempt,
            "loss": p.loss,
            "val_accuracy": p.val_accuracy,
            "compression": p.compression,
            "at": p.at or now,
        }
        for p in points
    ]
    session.execute(insert_ignoring(session, ProgressPoint, ["job_id", "iteration"]), rows)
    return True


def add_layer_points(session: Session, job_id: uuid.UUID, attempt: int, points: Sequence[LayerSample]) -> bool:
    """Record per-layer sparsity of a live attempt; False (nothing written) if stale.

    Duplicates of (job, iteration, layer) are ignored. The job's ``layers`` summary becomes the
    batch's latest iteration.
    """
    if not points:
        return jobstate.update_live(session, job_id, attempt)
    latest = max(p.iteration for p in points)
    layers = {
        "iteration": latest,
        "layers": [{"layer": p.layer, "kept": p.kept, "total": p.total} for p in points if p.iteration == latest],
    }
    if not jobstate.update_live(session, job_id, attempt, layers=layers):
        return False
    rows = [
        {"job_id": job_id, "iteration": p.iteration, "layer": p.layer, "kept": p.kept, "total": p.total} for p in points
    ]
    session.execute(insert_ignoring(session, LayerPoint, ["job_id", "iteration", "layer"]), rows)
    return True


def list_progress(
    session: Session, job_id: uuid.UUID, *, after_iteration: int = -1, limit: int = MAX_PAGE
) -> list[ProgressPoint]:
    """Progress points of a job with iteration > ``after_iteration``, in order (for polling and streaming)."""
    return _points_after(session, ProgressPoint, job_id, after_iteration, limit, ProgressPoint.iteration)


def list_layer_points(
    session: Session, job_id: uuid.UUID, *, after_iteration: int = -1, limit: int = MAX_PAGE
) -> list[LayerPoint]:
    """Per-layer points of a job with iteration > ``after_iteration``, by iteration then layer."""
    return _points_after(session, LayerPoint, job_id, after_iteration, limit, LayerPoint.iteration, LayerPoint.layer)


def _points_after(
    session: Session, entity: type[P], job_id: uuid.UUID, after_iteration: int, limit: int, *order_by: Any
) -> list[P]:
    check_page(limit, 0)
    stmt = (
        select(entity)
        .where(entity.job_id == job_id, entity.iteration > after_iteration)
        .order_by(*order_by)
        .limit(limit)
    )
    return list(session.scalars(stmt))


# -------------------------------------------------------------------------------------- artifacts


def put_artifact(
    session: Session,
    job_id: uuid.UUID,
    attempt: int,
    *,
    name: str,
    kind: str,
    uri: str,
    size_bytes: int,
    sha256: str,
) -> bool:
    """Record (or replace, by name) an artifact of a live attempt; False (nothing written) if stale.

    Replacing lets an attempt that resumed after a crash rewrite an artifact its predecessor
    recorded before dying.
    """
    if not jobstate.update_live(session, job_id, attempt):
        return False
    row = {
        "id": uuid.uuid4(),
        "job_id": job_id,
        "name": name,
        "kind": kind,
        "uri": uri,
        "size_bytes": size_bytes,
        "sha256": sha256,
        "created_at": utcnow(),
    }
    replace = ("kind", "uri", "size_bytes", "sha256", "created_at")
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        pg_stmt = postgresql.insert(Artifact).values(row)
        pg_stmt = pg_stmt.on_conflict_do_update(
            index_elements=["job_id", "name"], set_={c: pg_stmt.excluded[c] for c in replace}
        )
        session.execute(pg_stmt)
    elif dialect == "sqlite":
        lite_stmt = sqlite.insert(Artifact).values(row)
        lite_stmt = lite_stmt.on_conflict_do_update(
            index_elements=["job_id", "name"], set_={c: lite_stmt.excluded[c] for c in replace}
        )
        session.execute(lite_stmt)
    else:  # pragma: no cover
        raise NotImplementedError(f"upsert on {dialect!r}")
    return True


def get_artifact(session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID, name: str) -> Artifact | None:
    """Artifact ``name`` of the tenant's job ``job_id``; None if missing or another tenant's."""
    return session.scalar(
        select(Artifact)
        .join(Job, Job.id == Artifact.job_id)
        .where(Artifact.job_id == job_id, Artifact.name == name, Job.tenant_id == tenant_id)
    )


def list_artifacts(session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID) -> list[Artifact]:
    """Artifacts of the tenant's job ``job_id`` by name (empty for another tenant's job)."""
    return list(
        session.scalars(
            select(Artifact)
            .join(Job, Job.id == Artifact.job_id)
            .where(Artifact.job_id == job_id, Job.tenant_id == tenant_id)
            .order_by(Artifact.name)
        )
    )


def list_layer_history(
    session: Session, job_id: uuid.UUID, *, after_iteration: int = -1, iterations: int = 100
) -> list[LayerPoint]:
    """Per-layer points of the first ``iterations`` logged iterations after ``after_iteration``, whole.

    Unlike :func:`list_layer_points`, a page never ends in the middle of an iteration, so the last
    iteration returned is a safe cursor for the next call.
    """
    check_page(iterations, 0)
    chosen = (
        select(LayerPoint.iteration)
        .where(LayerPoint.job_id == job_id, LayerPoint.iteration > after_iteration)
        .group_by(LayerPoint.iteration)
        .order_by(LayerPoint.iteration)
        .limit(iterations)
    )
    stmt = (
        select(LayerPoint)
        .where(LayerPoint.job_id == job_id, LayerPoint.iteration.in_(chosen))
        .order_by(LayerPoint.iteration, LayerPoint.layer)
    )
    return list(session.scalars(stmt))


def get_job_by_idempotency_key(session: Session, tenant_id: uuid.UUID, idempotency_key: str) -> Job | None:
    """The tenant's job created with ``idempotency_key``, if any."""
    return session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == idempotency_key))


def get_job_inputs(session: Session, job_id: uuid.UUID) -> tuple[Job, Model, Dataset] | None:
    """Job ``job_id`` (of any tenant) with its model and data set, for the worker that claimed it; None if gone."""
    job = session.get(Job, job_id)
    if job is None:
        return None
    model, dataset = session.get(Model, job.model_id), session.get(Dataset, job.dataset_id)
    assert model is not None and dataset is not None, "the foreign keys keep a job's model and data set"
    return job, model, dataset


# ------------------------------------------------------------------------------------------- logs


@dataclass(frozen=True, slots=True)
class LogLine:
    """One log record of a job, as a worker captured it."""

    level: str
    logger: str
    message: str
    at: datetime | None = None


#: The longest log line kept, in characters (a longer one keeps its start and end).
MAX_LOG_LINE: Final = 16_384
#: The most log lines kept per job; past it, lines are dropped but the last attempt's failure is kept.
MAX_LOG_LINES: Final = 10_000


def _clip(message: str) -> str:
    if len(message) <= MAX_LOG_LINE:
        return message
    half = MAX_LOG_LINE // 2
    return f"{message[:half]}\n… {len(message) - 2 * half:,} characters left out …\n{message[-half:]}"


def add_logs(
    session: Session, job_id: uuid.UUID, attempt: int, lines: Sequence[LogLine], *, fenced: bool = True
) -> bool:
    """Append log lines of an attempt; False (nothing written) if ``fenced`` and the attempt is stale.

    A job keeps at most :data:`MAX_LOG_LINES` lines: later ones are dropped, except lines at ERROR or
    above, so a failure's traceback is always there. ``fenced=False`` writes for an attempt that has
    already ended (its last lines, the failure among them).
    """
    if fenced and not jobstate.update_live(session, job_id, attempt):
        return False
    if not lines:
        return True
    kept = session.scalar(select(func.count()).select_from(JobLog).where(JobLog.job_id == job_id)) or 0
    room = max(0, MAX_LOG_LINES - kept)
    now = utcnow()
    rows = []
    for line in lines:
        if room <= 0 and line.level not in ("ERROR", "CRITICAL"):
            continue
        room -= 1
        rows.append(
            {
                "job_id": job_id,
                "attempt": attempt,
                "at": line.at or now,
                "level": line.level[:16],
                "logger": line.logger[:NAME_LENGTH],
                "message": _clip(line.message),
            }
        )
    if rows:
        session.execute(insert(JobLog), rows)
    return True


def list_logs(session: Session, job_id: uuid.UUID, *, after: int = 0, limit: int = MAX_PAGE) -> list[JobLog]:
    """The job's log lines with id > ``after``, oldest first."""
    check_page(limit, 0)
    stmt = select(JobLog).where(JobLog.job_id == job_id, JobLog.id > after).order_by(JobLog.id).limit(limit)
    return list(session.scalars(stmt))


# --------------------------------------------------------------------------------- change notices

#: The channel the trigger of migration 0002 announces each changed job's id on (``NOTIFY``).
JOB_CHANNEL: Final = "netsurgery_jobs"


async def connect_listener(conninfo: str, connect_timeout: float) -> psycopg.AsyncConnection[tuple[Any, ...]]:
    """A PostgreSQL connection of its own (autocommit) for :func:`listen_to_job_changes`."""
    timeout = max(1, int(connect_timeout))
    return await psycopg.AsyncConnection.connect(conninfo, autocommit=True, connect_timeout=timeout)


async def listen_to_job_changes(connection: psycopg.AsyncConnection[Any]) -> None:
    """``LISTEN`` on :data:`JOB_CHANNEL`: ``connection.notifies()`` then yields each changed job's id."""
    await connection.execute(f"LISTEN {JOB_CHANNEL}")
