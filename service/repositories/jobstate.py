"""Job state: the one module that changes ``jobs.state``, the lease and the attempt number.

Every change is a single guarded ``UPDATE jobs … WHERE id = :id AND state = :expected`` (plus an
attempt fence where a worker writes), so two actors racing on one job cannot both win: the loser
matches no row and is told so. Nothing here commits; the caller's session scope does.

States and the allowed moves (:data:`ALLOWED_TRANSITIONS`)::

    queued  -> running                       (claim)
    queued  -> cancelled | failed            (cancel before start; refused at enqueue)
    running -> succeeded | failed | cancelled
    running -> queued                        (the reaper re-queues a job whose lease expired)

A worker that takes over a running job whose lease expired (:func:`claim`) keeps the state
``running`` and gets a new attempt number; the old worker's writes are then fenced out.

The reads that decide a job's fate live here too: a running attempt asks :func:`attempt_status`
whether to go on, and the reaper scans :func:`expired_leases` and :func:`stale_queued`.

Times are the application's clock in UTC (``now`` may be passed in, which the tests do); hosts
are expected to keep their clocks in sync (NTP) to well within a lease.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any, Final, Literal

from sqlalchemy import ColumnElement, and_, func, literal, or_, select, update
from sqlalchemy.orm import Session

from service.orm import JOB_STATES, TERMINAL_STATES, Job, UTCDateTime, utcnow

ALLOWED_TRANSITIONS: Final[Mapping[str, frozenset[str]]] = MappingProxyType(
    {
        "queued": frozenset({"running", "cancelled", "failed"}),
        "running": frozenset({"succeeded", "failed", "cancelled", "queued"}),
        "succeeded": frozenset(),
        "failed": frozenset(),
        "cancelled": frozenset(),
    }
)
assert set(ALLOWED_TRANSITIONS) == set(JOB_STATES)

# what a worker may write while its attempt is live (update_live): the job's progress summary
_SUMMARY_FIELDS: Final = frozenset(
    {"iteration", "total_iterations", "loss", "val_accuracy", "compression", "layers", "frontier"}
)
# what may be set together with a transition; identity, ownership, inputs, state and the attempt
# number are never set this way
_TRANSITION_FIELDS: Final = _SUMMARY_FIELDS | frozenset(
    {
        "error",
        "cancel_requested",
        "finished_at",
        "lease_owner",
        "lease_expires_at",
        "heartbeat_at",
        "started_at",
        "result",
    }
)
assert _TRANSITION_FIELDS.issubset(c.key for c in Job.__table__.columns)


class IllegalTransition(ValueError):
    """A state change the table does not allow (a programming error, not a lost race)."""


def check_transition(expected: str, new: str) -> None:
    """Raise :class:`IllegalTransition` unless ``expected -> new`` is in :data:`ALLOWED_TRANSITIONS`."""
    if expected not in ALLOWED_TRANSITIONS:
        raise IllegalTransition(f"unknown job state {expected!r}")
    if new not in ALLOWED_TRANSITIONS[expected]:
        raise IllegalTransition(f"job state {expected!r} cannot become {new!r}")


def _check_fields(fields: Mapping[str, Any], allowed: frozenset[str]) -> None:
    unknown = set(fields) - allowed
    if unknown:
        raise TypeError(f"cannot set job field(s) {sorted(unknown)} here; allowed: {sorted(allowed)}")


def _guarded_update(session: Session, conditions: list[ColumnElement[bool]], values: Mapping[str, Any]) -> bool:
    """``UPDATE jobs SET … WHERE <conditions>``; True when a row matched.

    RETURNING (Postgres, SQLite >= 3.35) tells whether the row matched without relying on the
    driver's rowcount; ``fetch`` refreshes any loaded ``Job`` in the session.
    """
    stmt = (
        update(Job)
        .where(*conditions)
        .values(dict(values))
        .returning(Job.id)
        .execution_options(synchronize_session="fetch")
    )
    return session.execute(stmt).first() is not None


def transition(
    session: Session,
    job_id: uuid.UUID,
    expected: str,
    new: str,
    *,
    attempt: int | None = None,
    **fields: Any,
) -> bool:
    """Move job ``job_id`` from ``expected`` to ``new``; True if it moved, False if it was not in ``expected``.

    ``attempt`` (for worker-made moves) also requires the job's attempt to match, so a worker whose
    lease was taken over cannot finish someone else's run. ``fields`` are other columns to set in
    the same statement (``error=…``, ``compression=…``). Entering a terminal state sets
    ``finished_at`` and clears the lease expiry; ``running -> queued`` clears the lease. Raises
    :class:`IllegalTransition` for a move the table does not allow and ``TypeError`` for a field
    that may not be set this way.
    """
    check_transition(expected, new)
    _check_fields(fields, _TRANSITION_FIELDS)
    values: dict[str, Any] = {}
    if new in TERMINAL_STATES:
        values.update(finished_at=utcnow(), lease_expires_at=None)
    if expected == "running" and new == "queued":
        values.update(lease_owner=None, lease_expires_at=None, heartbeat_at=None)
    values.update(fields)
    values["state"] = new
    conditions = [Job.id == job_id, Job.state == expected]
    if attempt is not None:
        conditions.append(Job.attempt == attempt)
    return _guarded_update(session, conditions, values)


def claim(
    session: Session,
    job_id: uuid.UUID,
    owner: str,
    lease_seconds: float,
    *,
    now: datetime | None = None,
) -> int | None:
    """Take job ``job_id`` for worker ``owner``; the new attempt number, or None if it is not claimable.

    Claimable: ``queued``, or ``running`` with a lease that expired before ``now`` (its worker is
    presumed dead). One statement moves it to ``running``, adds one to ``attempt`` and sets the
    lease (owner, expiry, heartbeat) and ``started_at`` (kept from the first claim), so of two
    concurrent claims exactly one gets a number. A cancel request does not stop a claim: the worker
    sees the flag and finishes the job as cancelled.
    """
    check_transition("queued", "running")
    now = now or utcnow()
    claimable = or_(
        Job.state == "queued",
        and_(Job.state == "running", Job.lease_expires_at < now),
    )
    stmt = (
        update(Job)
        .where(Job.id == job_id, claimable)
        .values(
            state="running",
            attempt=Job.attempt + 1,
            lease_owner=owner,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            heartbeat_at=now,
            started_at=func.coalesce(Job.started_at, literal(now, UTCDateTime())),
        )
        .returning(Job.attempt)
        .execution_options(synchronize_session="fetch")
    )
    row = session.execute(stmt).first()
    return None if row is None else int(row[0])


def heartbeat(
    session: Session,
    job_id: uuid.UUID,
    attempt: int,
    owner: str,
    lease_seconds: float,
    *,
    now: datetime | None = None,
) -> bool:
    """Renew the lease of a live attempt; False if the job is no longer running under ``attempt`` by ``owner``.

    A worker that gets False has lost the job (taken over, re-queued, finished or cancelled) and
    must stop without writing anything more.
    """
    now = now or utcnow()
    return _guarded_update(
        session,
        [live(job_id, attempt), Job.lease_owner == owner],
        {"heartbeat_at": now, "lease_expires_at": now + timedelta(seconds=lease_seconds)},
    )


def live(job_id: uuid.UUID, attempt: int) -> ColumnElement[bool]:
    """The condition "job ``job_id`` is running under ``attempt``": the fence of every worker write."""
    return and_(Job.id == job_id, Job.attempt == attempt, Job.state == "running")


def update_live(session: Session, job_id: uuid.UUID, attempt: int, **fields: Any) -> bool:
    """Set summary columns (iteration, loss, layers …) only while ``attempt`` is the live one; True if set.

    The UPDATE also takes the job's row lock until commit, so inserts that follow in the same
    transaction (progress points, artifacts) cannot interleave with a claim that would supersede
    ``attempt``. With no ``fields`` it only checks and locks.
    """
    _check_fields(fields, _SUMMARY_FIELDS)
    # a no-op assignment still locks the row (Postgres) / takes the write lock (SQLite)
    values = dict(fields) if fields else {"attempt": Job.attempt}
    return _guarded_update(session, [live(job_id, attempt)], values)


def expired_leases(session: Session, now: datetime | None = None) -> list[uuid.UUID]:
    """Ids of running jobs whose lease expired before ``now``, oldest expiry first (the reaper's scan)."""
    now = now or utcnow()
    stmt = select(Job.id).where(Job.state == "running", Job.lease_expires_at < now).order_by(Job.lease_expires_at)
    return list(session.scalars(stmt))


def stale_queued(session: Session, seconds: float, *, now: datetime | None = None) -> list[uuid.UUID]:
    """Ids of jobs queued for longer than ``seconds``, oldest first (the reaper's scan for lost messages)."""
    cutoff = (now or utcnow()) - timedelta(seconds=seconds)
    stmt = select(Job.id).where(Job.state == "queued", Job.created_at < cutoff).order_by(Job.created_at)
    return list(session.scalars(stmt))


def release_expired(session: Session, job_id: uuid.UUID, *, now: datetime | None = None) -> bool:
    """Re-queue a running job whose lease is (still) expired; False if a heartbeat or claim got there first.

    The reaper calls this for each id from :func:`expired_leases` and enqueues the task again after
    its commit. The attempt number stays; the next claim increments it.
    """
    now = now or utcnow()
    check_transition("running", "queued")
    return _guarded_update(
        session,
        [Job.id == job_id, Job.state == "running", Job.lease_expires_at < now],
        {"state": "queued", "lease_owner": None, "lease_expires_at": None, "heartbeat_at": None},
    )


def request_cancel(session: Session, job_id: uuid.UUID) -> str | None:
    """Ask job ``job_id`` to stop; its state afterwards, or None if there is no such job.

    A queued job becomes ``cancelled`` at once. A running job gets ``cancel_requested`` and stays
    ``running`` until its worker, which checks the flag every few iterations, stops and moves it to
    ``cancelled``. A finished job is left as it is (its state is returned). The caller checks that
    the job belongs to the tenant first.
    """
    for _ in range(3):  # the state can change between the read and the guarded write; re-read then
        state = session.scalar(select(Job.state).where(Job.id == job_id))
        if state is None or state in TERMINAL_STATES:
            return state
        if state == "queued":
            if transition(session, job_id, "queued", "cancelled", cancel_requested=True):
                return "cancelled"
        elif _guarded_update(session, [Job.id == job_id, Job.state == "running"], {"cancel_requested": True}):
            return "running"
    raise RuntimeError(f"job {job_id}: state kept changing while a cancel was requested")


def ended_by(session: Session, job_id: uuid.UUID, attempt: int) -> bool:
    """Whether the job has ended (succeeded, failed or cancelled) under ``attempt``: that attempt finished it,
    so a heartbeat it still sends is late, not a lost lease."""
    row = session.execute(select(Job.state, Job.attempt).where(Job.id == job_id)).first()
    return row is not None and row.state in TERMINAL_STATES and row.attempt == attempt


def attempt_status(session: Session, job_id: uuid.UUID, attempt: int) -> Literal["live", "cancel", "lost"]:
    """What a running attempt should do: go on (``live``), stop as cancelled (``cancel``: a cancel was
    requested), or stop without writing anything more (``lost``: the job is gone, or no longer running
    under ``attempt``).
    """
    row = session.execute(select(Job.cancel_requested, Job.state, Job.attempt).where(Job.id == job_id)).first()
    if row is None or row.state != "running" or row.attempt != attempt:
        return "lost"
    return "cancel" if row.cancel_requested else "live"
