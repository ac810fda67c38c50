"""Counts the quotas and the service's figures read: active jobs, stored bytes, jobs by state, running progress."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from sqlalchemy import ColumnElement, case, func, select
from sqlalchemy.orm import Session

from service.orm import JOB_STATES, TERMINAL_STATES, Artifact, Dataset, Job, Model, ProgressPoint
from service.repositories import MAX_PAGE, check_page

#: Job states that hold a slot of the tenant's active-jobs quota.
ACTIVE_STATES: Final = tuple(s for s in JOB_STATES if s not in TERMINAL_STATES)


def count_active_jobs(session: Session, tenant_id: uuid.UUID) -> int:
    """How many of the tenant's jobs are queued or running."""
    stmt = select(func.count()).select_from(Job).where(Job.tenant_id == tenant_id, Job.state.in_(ACTIVE_STATES))
    return session.scalar(stmt) or 0


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
class Durations:
    """Run times of finished jobs of one method and outcome: count, sum and cumulative bucket counts."""

    method: str
    state: str
    count: int
    total_seconds: float
    #: jobs whose run time is at most each bound, in the order of the bounds asked for
    at_most: list[int]


def _seconds(session: Session) -> ColumnElement[Any]:
    """A finished job's run time in seconds, from started_at to finished_at, in the database's own SQL."""
    if session.get_bind().dialect.name == "postgresql":
        return func.extract("epoch", Job.finished_at - Job.started_at)
    return (func.julianday(Job.finished_at) - func.julianday(Job.started_at)) * 86400.0


def job_durations(session: Session, bounds: tuple[float, ...]) -> list[Durations]:
    """For ``/metrics``: run times of the jobs that ended (started and finished), by method and state, as
    histogram buckets counted in one query (no row is read into Python)."""
    seconds = _seconds(session)
    columns = [func.sum(case((seconds <= bound, 1), else_=0)) for bound in bounds]
    stmt = (
        select(Job.method, Job.state, func.count(), func.coalesce(func.sum(seconds), 0.0), *columns)
        .where(Job.state.in_(TERMINAL_STATES), Job.started_at.is_not(None), Job.finished_at.is_not(None))
        .group_by(Job.method, Job.state)
    )
    return [
        Durations(str(method), str(state), int(n), float(total), [int(c or 0) for c in counts])
        for method, state, n, total, *counts in session.execute(stmt)
    ]


def iterations_by_method(session: Session) -> dict[str, int]:
    """Training iterations the jobs of each method have run (their ``iteration``), for ``/metrics``."""
    stmt = select(Job.method, func.coalesce(func.sum(Job.iteration), 0)).group_by(Job.method)
    return {str(method): int(total) for method, total in session.execute(stmt)}


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
    check_page(points, 0)
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
