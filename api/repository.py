"""The repository: every query the service makes, apart from job state changes (:mod:`api.jobstate`).

Functions take the caller's ``Session`` and flush at most; the request or task scope commits.
Reads of tenant-owned rows take the ``tenant_id`` and return None for another tenant's row, the
same as for a missing one. Functions that read a job's children by ``job_id`` alone (progress,
layer points) expect the caller to have read the job through :func:`get_job` first.

Deletes: deleting a tenant removes everything it owns (``ON DELETE CASCADE``); deleting a job
removes its progress, layer points and artifact rows, and is refused (:class:`~api.errors.Conflict`)
while the job is queued or running; deleting a model or dataset that a job uses is refused. Stored
files are not touched here: callers read the URIs first and remove the objects after the commit.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Generic, TypeVar

from sqlalchemy import ColumnElement, Insert, Select, bindparam, case, delete, exists, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from api import jobstate
from api.db import (
    DATASET_KINDS,
    JOB_STATES,
    MODEL_FORMATS,
    TERMINAL_STATES,
    ApiKey,
    Artifact,
    Dataset,
    Job,
    LayerPoint,
    Model,
    ProgressPoint,
    Tenant,
    utcnow,
)
from api.errors import Conflict, NotFound

T = TypeVar("T")

API_KEY_PREFIX: Final = "ns_"
# characters of a key kept in clear to tell keys apart in listings ("ns_" and 7 more)
DISPLAY_PREFIX_LENGTH: Final = 10
# longer than any key we issue; refuse to hash arbitrarily long header values
MAX_KEY_LENGTH: Final = 128
MAX_PAGE: Final = 1000


# ---------------------------------------------------------------------------------------- paging


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a listing and the number of rows across all pages."""

    items: list[T]
    total: int
    limit: int
    offset: int


def _check_page(limit: int, offset: int) -> None:
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit must be within 1..{MAX_PAGE}, got {limit}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")


def _page(
    session: Session,
    entity: type[T],
    conditions: Sequence[ColumnElement[bool]],
    order_by: Sequence[Any],
    limit: int,
    offset: int,
) -> Page[T]:
    _check_page(limit, offset)
    total = session.scalar(select(func.count()).select_from(entity).where(*conditions)) or 0
    stmt: Select[T] = select(entity).where(*conditions).order_by(*order_by).limit(limit).offset(offset)
    return Page(items=list(session.scalars(stmt)), total=total, limit=limit, offset=offset)


# ------------------------------------------------------------------------------- tenants and keys


def hash_key(key: str) -> str:
    """The stored form of an API key: SHA-256, hex. (Keys are 256-bit random, so no salt or KDF is needed.)"""
    return hashlib.sha256(key.encode()).hexdigest()


def create_api_key(session: Session, tenant_id: uuid.UUID) -> tuple[ApiKey, str]:
    """A new API key for the tenant: the row and the plaintext key, which is shown once and never stored."""
    key = API_KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(tenant_id=tenant_id, prefix=key[:DISPLAY_PREFIX_LENGTH], key_hash=hash_key(key))
    session.add(row)
    session.flush()
    return row, key


def create_tenant(session: Session, name: str) -> tuple[Tenant, str]:
    """A new tenant with one API key: the tenant and the plaintext key. :class:`Conflict` if the name is taken."""
    if session.scalar(select(Tenant.id).where(Tenant.name == name)) is not None:
        raise Conflict(f"a tenant named {name!r} exists")
    tenant = Tenant(name=name)
    session.add(tenant)
    session.flush()
    _, key = create_api_key(session, tenant.id)
    return tenant, key


def get_tenant_by_name(session: Session, name: str) -> Tenant | None:
    """The tenant called ``name``, if any (for the admin command)."""
    return session.scalar(select(Tenant).where(Tenant.name == name))


def revoke_api_key(session: Session, tenant_id: uuid.UUID, key_id: uuid.UUID) -> bool:
    """Revoke one of the tenant's keys; False if there is no such live key."""
    row = session.scalar(
        select(ApiKey).where(ApiKey.id == key_id, ApiKey.tenant_id == tenant_id, ApiKey.revoked_at.is_(None))
    )
    if row is None:
        return False
    row.revoked_at = utcnow()
    session.flush()
    return True


def tenant_for_key(session: Session, key: str) -> Tenant | None:
    """The tenant that owns the live API key ``key``; None for an unknown, malformed or revoked key."""
    if not key.startswith(API_KEY_PREFIX) or len(key) > MAX_KEY_LENGTH:
        return None
    digest = hash_key(key)
    row = session.execute(
        select(Tenant, ApiKey.key_hash)
        .join(ApiKey, ApiKey.tenant_id == Tenant.id)
        .where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None))
    ).first()
    # the index lookup found the row by hash; compare again in constant time all the same
    if row is None or not hmac.compare_digest(row[1], digest):
        return None
    tenant: Tenant = row[0]
    return tenant


def delete_tenant(session: Session, tenant_id: uuid.UUID) -> bool:
    """Delete a tenant and everything it owns (keys, models, datasets, jobs and their points)."""
    return _deleted(session.execute(delete(Tenant).where(Tenant.id == tenant_id).returning(Tenant.id)))


def _deleted(result: Iterable[Any]) -> bool:
    return next(iter(result), None) is not None


# ---------------------------------------------------------------------------------------- models


def create_model(
    session: Session,
    tenant_id: uuid.UUID,
    *,
    name: str,
    format: str,
    parameter_count: int,
    size_bytes: int,
    sha256: str,
    uri: str,
    architecture: str | None = None,
    config: dict[str, Any] | None = None,
    model_id: uuid.UUID | None = None,
) -> Model:
    """Record an uploaded model. ``model_id`` lets the caller pick the id it already used for the stored object."""
    if format not in MODEL_FORMATS:
        raise ValueError(f"model format must be one of {MODEL_FORMATS}, got {format!r}")
    model = Model(
        id=model_id or uuid.uuid4(),
        tenant_id=tenant_id,
        name=name,
        format=format,
        architecture=architecture,
        config=config,
        parameter_count=parameter_count,
        size_bytes=size_bytes,
        sha256=sha256,
        uri=uri,
    )
    session.add(model)
    session.flush()
    return model


def get_model(session: Session, tenant_id: uuid.UUID, model_id: uuid.UUID) -> Model | None:
    """The tenant's model ``model_id``; None if missing or another tenant's."""
    return session.scalar(select(Model).where(Model.id == model_id, Model.tenant_id == tenant_id))


def list_models(session: Session, tenant_id: uuid.UUID, *, limit: int = 50, offset: int = 0) -> Page[Model]:
    """The tenant's models, newest first."""
    return _page(
        session, Model, [Model.tenant_id == tenant_id], [Model.created_at.desc(), Model.id.desc()], limit, offset
    )


def delete_model(session: Session, tenant_id: uuid.UUID, model_id: uuid.UUID) -> bool:
    """Delete the tenant's model; False if there is none, :class:`Conflict` while a job refers to it."""
    result = session.execute(
        delete(Model)
        .where(Model.id == model_id, Model.tenant_id == tenant_id, ~exists().where(Job.model_id == model_id))
        .returning(Model.id)
    )
    if _deleted(result):
        return True
    if get_model(session, tenant_id, model_id) is not None:
        raise Conflict(f"model {model_id} is used by a job; delete the job first")
    return False


# -------------------------------------------------------------------------------------- datasets


def create_dataset(
    session: Session,
    tenant_id: uuid.UUID,
    *,
    name: str,
    kind: str,
    builtin_name: str | None = None,
    n_examples: int | None = None,
    input_shape: list[int] | None = None,
    has_targets: bool = True,
    size_bytes: int | None = None,
    sha256: str | None = None,
    uri: str | None = None,
    dataset_id: uuid.UUID | None = None,
) -> Dataset:
    """Record a dataset: a built-in one (``kind='builtin'`` and ``builtin_name``) or an upload (``uri``)."""
    if kind not in DATASET_KINDS:
        raise ValueError(f"dataset kind must be one of {DATASET_KINDS}, got {kind!r}")
    if (kind == "builtin") != (builtin_name is not None) or (kind == "builtin") == (uri is not None):
        raise ValueError("a built-in dataset has builtin_name and no uri; an uploaded one has uri and no builtin_name")
    dataset = Dataset(
        id=dataset_id or uuid.uuid4(),
        tenant_id=tenant_id,
        name=name,
        kind=kind,
        builtin_name=builtin_name,
        n_examples=n_examples,
        input_shape=input_shape,
        has_targets=has_targets,
        size_bytes=size_bytes,
        sha256=sha256,
        uri=uri,
    )
    session.add(dataset)
    session.flush()
    return dataset


def get_dataset(session: Session, tenant_id: uuid.UUID, dataset_id: uuid.UUID) -> Dataset | None:
    """The tenant's dataset ``dataset_id``; None if missing or another tenant's."""
    return session.scalar(select(Dataset).where(Dataset.id == dataset_id, Dataset.tenant_id == tenant_id))


def list_datasets(session: Session, tenant_id: uuid.UUID, *, limit: int = 50, offset: int = 0) -> Page[Dataset]:
    """The tenant's datasets, newest first."""
    return _page(
        session,
        Dataset,
        [Dataset.tenant_id == tenant_id],
        [Dataset.created_at.desc(), Dataset.id.desc()],
        limit,
        offset,
    )


def delete_dataset(session: Session, tenant_id: uuid.UUID, dataset_id: uuid.UUID) -> bool:
    """Delete the tenant's dataset; False if there is none, :class:`Conflict` while a job refers to it."""
    result = session.execute(
        delete(Dataset)
        .where(
            Dataset.id == dataset_id,
            Dataset.tenant_id == tenant_id,
            ~exists().where(Job.dataset_id == dataset_id),
        )
        .returning(Dataset.id)
    )
    if _deleted(result):
        return True
    if get_dataset(session, tenant_id, dataset_id) is not None:
        raise Conflict(f"dataset {dataset_id} is used by a job; delete the job first")
    return False


# ------------------------------------------------------------------------------------------- jobs


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
) -> tuple[Job, bool]:
    """A new queued job, and True; or, for an ``idempotency_key`` the tenant used before, that job and False.

    The model and dataset must be the tenant's (:class:`NotFound` otherwise). A repeated key returns
    the first job whatever the other arguments are; the caller may compare them. The insert is an
    ``INSERT … ON CONFLICT DO NOTHING``, so two concurrent requests with one key make one job.
    Enqueue the task only after the caller's commit.
    """
    if get_model(session, tenant_id, model_id) is None:
        raise NotFound(f"model {model_id} not found")
    if get_dataset(session, tenant_id, dataset_id) is None:
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
    }
    if idempotency_key is None:
        job = Job(**values)
        session.add(job)
        session.flush()
        return job, True
    stmt = _insert_ignoring(session, Job, ["tenant_id", "idempotency_key"]).values(values).returning(Job.id)
    if session.execute(stmt).first() is not None:
        created = session.get(Job, values["id"])
        assert created is not None
        return created, True
    existing = session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == idempotency_key))
    assert existing is not None, "conflicting idempotency key vanished"
    return existing, False


#: The tenant's job as one plain row (every column, no ORM object), for :class:`api.database.Reader`;
#: parameters ``tenant_id`` and ``job_id``.
JOB_ROW: Final = select(*Job.__table__.columns).where(
    Job.id == bindparam("job_id"), Job.tenant_id == bindparam("tenant_id")
)


def get_job(session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID) -> Job | None:
    """The tenant's job ``job_id``; None if missing or another tenant's."""
    return session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id))


def list_jobs(
    session: Session,
    tenant_id: uuid.UUID,
    *,
    state: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> Page[Job]:
    """The tenant's jobs, newest first, optionally only those in ``state``."""
    conditions = [Job.tenant_id == tenant_id]
    if state is not None:
        if state not in JOB_STATES:
            raise ValueError(f"job state must be one of {JOB_STATES}, got {state!r}")
        conditions.append(Job.state == state)
    return _page(session, Job, conditions, [Job.created_at.desc(), Job.id.desc()], limit, offset)


def delete_job(session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID) -> bool:
    """Delete a finished job with its points and artifact rows; False if none, :class:`Conflict` if not finished."""
    result = session.execute(
        delete(Job)
        .where(Job.id == job_id, Job.tenant_id == tenant_id, Job.state.in_(sorted(TERMINAL_STATES)))
        .returning(Job.id)
    )
    if _deleted(result):
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
    session.execute(_insert_ignoring(session, ProgressPoint, ["job_id", "iteration"]), rows)
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
    session.execute(_insert_ignoring(session, LayerPoint, ["job_id", "iteration", "layer"]), rows)
    return True


def list_progress(
    session: Session, job_id: uuid.UUID, *, after_iteration: int = -1, limit: int = MAX_PAGE
) -> list[ProgressPoint]:
    """Progress points of a job with iteration > ``after_iteration``, in order (for polling and streaming)."""
    _check_page(limit, 0)
    stmt = (
        select(ProgressPoint)
        .where(ProgressPoint.job_id == job_id, ProgressPoint.iteration > after_iteration)
        .order_by(ProgressPoint.iteration)
        .limit(limit)
    )
    return list(session.scalars(stmt))


def list_layer_points(
    session: Session, job_id: uuid.UUID, *, after_iteration: int = -1, limit: int = MAX_PAGE
) -> list[LayerPoint]:
    """Per-layer points of a job with iteration > ``after_iteration``, by iteration then layer."""
    _check_page(limit, 0)
    stmt = (
        select(LayerPoint)
        .where(LayerPoint.job_id == job_id, LayerPoint.iteration > after_iteration)
        .order_by(LayerPoint.iteration, LayerPoint.layer)
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


# ------------------------------------------------------------------------------------- internals


def _insert_ignoring(session: Session, entity: type[Any], keys: list[str]) -> Insert:
    """``INSERT INTO entity … ON CONFLICT (keys) DO NOTHING`` in the session's dialect."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(entity).on_conflict_do_nothing(index_elements=keys)
    if dialect == "sqlite":
        return sqlite.insert(entity).on_conflict_do_nothing(index_elements=keys)
    raise NotImplementedError(f"insert-or-ignore on {dialect!r}")  # pragma: no cover


def list_layer_history(
    session: Session, job_id: uuid.UUID, *, after_iteration: int = -1, iterations: int = 100
) -> list[LayerPoint]:
    """Per-layer points of the first ``iterations`` logged iterations after ``after_iteration``, whole.

    Unlike :func:`list_layer_points`, a page never ends in the middle of an iteration, so the last
    iteration returned is a safe cursor for the next call.
    """
    _check_page(iterations, 0)
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


# ---------------------------------------------------------------------------------------- quotas

#: Job states that hold a slot of the tenant's active-jobs quota.
ACTIVE_STATES: Final = tuple(s for s in JOB_STATES if s not in TERMINAL_STATES)


def lock_tenant(session: Session, tenant_id: uuid.UUID) -> bool:
    """Lock the tenant's row until the transaction ends, serialising quota checks of one tenant; False if none.

    Postgres: ``SELECT … FOR NO KEY UPDATE``, which excludes a second such lock but not the key-share
    locks that inserts of the tenant's other rows take for their foreign key, so only other quota
    checks of this tenant wait. SQLite has no row locks: a no-op ``UPDATE`` of the row takes the
    database's write lock instead (the embedded server has one process, and writes are serial there).
    """
    if session.get_bind().dialect.name == "sqlite":
        result = session.execute(
            update(Tenant).where(Tenant.id == tenant_id).values(name=Tenant.name).returning(Tenant.id)
        )
        return _deleted(result)
    stmt = select(Tenant.id).where(Tenant.id == tenant_id).with_for_update(key_share=True)
    return session.scalar(stmt) is not None


def count_active_jobs(session: Session, tenant_id: uuid.UUID) -> int:
    """How many of the tenant's jobs are queued or running."""
    stmt = select(func.count()).select_from(Job).where(Job.tenant_id == tenant_id, Job.state.in_(ACTIVE_STATES))
    return session.scalar(stmt) or 0


def get_job_by_idempotency_key(session: Session, tenant_id: uuid.UUID, idempotency_key: str) -> Job | None:
    """The tenant's job created with ``idempotency_key``, if any."""
    return session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == idempotency_key))


def stored_bytes(session: Session, tenant_id: uuid.UUID) -> int:
    """Bytes the tenant keeps in storage, as recorded: its models, uploaded data sets and job artifacts.

    A job's checkpoint (one file per job, removed with the job) is not recorded in the database and
    so not counted.
    """
    models = select(func.coalesce(func.sum(Model.size_bytes), 0)).where(Model.tenant_id == tenant_id)
    datasets = select(func.coalesce(func.sum(Dataset.size_bytes), 0)).where(Dataset.tenant_id == tenant_id)
    artifacts = (
        select(func.coalesce(func.sum(Artifact.size_bytes), 0))
        .join(Job, Job.id == Artifact.job_id)
        .where(Job.tenant_id == tenant_id)
    )
    total = session.scalar(select(models.scalar_subquery() + datasets.scalar_subquery() + artifacts.scalar_subquery()))
    return int(total or 0)


# ------------------------------------------------------------------------------ service figures


def count_jobs_by_state(session: Session) -> dict[str, int]:
    """Jobs of all tenants in each state (every state present, 0 where none), for ``/metrics``."""
    counts = dict.fromkeys(JOB_STATES, 0)
    for state, n in session.execute(select(Job.state, func.count()).group_by(Job.state)):
        counts[state] = n
    return counts


@dataclass(frozen=True, slots=True)
class RunningProgress:
    """A running job, the worker holding its lease, and its newest progress points of the live attempt."""

    job_id: uuid.UUID
    lease_owner: str | None
    #: ``(iteration, at)``, newest iteration first
    points: list[tuple[int, datetime]]


def running_jobs_progress(session: Session, *, points: int = 200, max_jobs: int = MAX_PAGE) -> list[RunningProgress]:
    """Each running job (at most ``max_jobs``) with the ``points`` newest progress points of its live attempt.

    One index range scan (the points' primary key, backwards) per job; running jobs are as many as
    busy workers.
    """
    _check_page(points, 0)
    running = session.execute(
        select(Job.id, Job.lease_owner, Job.attempt).where(Job.state == "running").order_by(Job.id).limit(max_jobs)
    ).all()
    out = []
    for job_id, owner, attempt in running:
        rows = session.execute(
            select(ProgressPoint.iteration, ProgressPoint.at)
            .where(ProgressPoint.job_id == job_id, ProgressPoint.attempt == attempt)
            .order_by(ProgressPoint.iteration.desc())
            .limit(points)
        )
        out.append(RunningProgress(job_id, owner, [(iteration, at) for iteration, at in rows]))
    return out
