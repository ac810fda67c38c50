"""Job state transitions, claims, leases and the attempt fence, on Postgres and SQLite."""

from __future__ import annotations

import itertools
import threading
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from service.database import session_scope
from service.orm import Job, ProgressPoint, utcnow
from service.repositories import jobs, jobstate
from service.repositories.jobs import ProgressSample
from service.repositories.jobstate import IllegalTransition
from tests.api.factories import new_job

LEASE = 30.0


def _job(factory: sessionmaker[Session], job_id: uuid.UUID) -> Job:
    with factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def _claim(factory: sessionmaker[Session], job_id: uuid.UUID, owner: str, **kw: object) -> int | None:
    with session_scope(factory) as session:
        return jobstate.claim(session, job_id, owner, LEASE, **kw)  # type: ignore[arg-type]


def test_allowed_transitions_follow_the_table(factory: sessionmaker[Session], tenant_id: uuid.UUID) -> None:
    paths = [
        ["queued", "running", "succeeded"],
        ["queued", "running", "failed"],
        ["queued", "running", "cancelled"],
        ["queued", "running", "queued", "running", "succeeded"],
        ["queued", "cancelled"],
        ["queued", "failed"],
    ]
    for path in paths:
        job_id = new_job(factory, tenant_id)
        for expected, new in itertools.pairwise(path):
            with session_scope(factory) as session:
                assert jobstate.transition(session, job_id, expected, new)
            assert _job(factory, job_id).state == new
        job = _job(factory, job_id)
        assert job.finished_at is not None and job.finished_at.tzinfo is not None
        assert job.lease_expires_at is None


def test_stale_expected_state_changes_nothing(factory: sessionmaker[Session], job_id: uuid.UUID) -> None:
    with session_scope(factory) as session:
        # the job is queued: a worker that believes it is running cannot finish it
        assert not jobstate.transition(session, job_id, "running", "succeeded", error="x")
    job = _job(factory, job_id)
    assert (job.state, job.error, job.finished_at) == ("queued", None, None)


def test_disallowed_transitions_raise(session: Session, job_id: uuid.UUID) -> None:
    for expected, new in [
        ("succeeded", "running"),
        ("cancelled", "queued"),
        ("failed", "succeeded"),
        ("queued", "succeeded"),
        ("queued", "queued"),
        ("running", "running"),
        ("bogus", "running"),
        ("queued", "bogus"),
    ]:
        with pytest.raises(IllegalTransition):
            jobstate.transition(session, job_id, expected, new)
    with pytest.raises(TypeError):
        jobstate.transition(session, job_id, "queued", "failed", attempt_count=3)
    with pytest.raises(TypeError):  # the attempt is the fence, never a field
        jobstate.transition(session, job_id, "queued", "failed", tenant_id=uuid.uuid4())
    session.rollback()
    assert session.get(Job, job_id).state == "queued"  # type: ignore[union-attr]


def test_state_check_constraint_refuses_unknown_states(session: Session, job_id: uuid.UUID) -> None:
    with pytest.raises(IntegrityError):
        session.execute(update(Job).where(Job.id == job_id).values(state="paused"))
        session.flush()
    session.rollback()


def test_claim_moves_to_running_and_counts_attempts(factory: sessionmaker[Session], job_id: uuid.UUID) -> None:
    now = utcnow()
    assert _claim(factory, job_id, "worker-a", now=now) == 1
    job = _job(factory, job_id)
    assert (job.state, job.attempt, job.lease_owner) == ("running", 1, "worker-a")
    assert job.lease_expires_at == now + timedelta(seconds=LEASE)
    assert job.started_at == now and job.heartbeat_at == now
    # a live lease cannot be claimed again
    assert _claim(factory, job_id, "worker-b", now=now + timedelta(seconds=1)) is None
    assert _job(factory, job_id).attempt == 1


def test_two_concurrent_claims_one_wins(factory: sessionmaker[Session], job_id: uuid.UUID) -> None:
    barrier = threading.Barrier(2)
    results: dict[str, int | None] = {}
    errors: list[BaseException] = []

    def claim(owner: str) -> None:
        try:
            with session_scope(factory) as session:
                barrier.wait(timeout=10)
                results[owner] = jobstate.claim(session, job_id, owner, LEASE)
        except BaseException as exc:  # reported below; a thread's exception is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=claim, args=(f"worker-{i}",)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors
    assert sorted(results.values(), key=lambda v: v is None) == [1, None]
    winner = next(owner for owner, attempt in results.items() if attempt == 1)
    job = _job(factory, job_id)
    assert (job.state, job.attempt, job.lease_owner) == ("running", 1, winner)


def test_expired_lease_is_taken_over_and_the_stale_attempt_is_fenced(
    factory: sessionmaker[Session], job_id: uuid.UUID
) -> None:
    t0 = utcnow()
    assert _claim(factory, job_id, "worker-a", now=t0) == 1
    later = t0 + timedelta(seconds=LEASE + 1)
    with factory() as session:
        assert job_id in jobstate.expired_leases(session, later)
        assert job_id not in jobstate.expired_leases(session, t0)

    assert _claim(factory, job_id, "worker-b", now=later) == 2
    job = _job(factory, job_id)
    assert (job.state, job.attempt, job.lease_owner, job.started_at) == ("running", 2, "worker-b", t0)

    with session_scope(factory) as session:
        # worker-a wakes up: every write it tries is refused and changes nothing
        assert not jobstate.heartbeat(session, job_id, 1, "worker-a", LEASE, now=later)
        assert not jobs.add_progress(session, job_id, 1, [ProgressSample(iteration=5, loss=9.0)])
        assert not jobstate.transition(session, job_id, "running", "succeeded", attempt=1)
        assert not jobs.put_artifact(
            session, job_id, 1, name="weights", kind="sparse", uri="file:///a", size_bytes=1, sha256="a" * 64
        )
    with factory() as session:
        assert session.scalar(select(func.count()).where(ProgressPoint.job_id == job_id)) == 0
        assert jobs.list_artifacts(session, _job(factory, job_id).tenant_id, job_id) == []
    job = _job(factory, job_id)
    assert (job.state, job.iteration, job.loss, job.lease_owner) == ("running", 0, None, "worker-b")
    assert job.heartbeat_at == later

    with session_scope(factory) as session:  # the live attempt goes on
        assert jobstate.heartbeat(session, job_id, 2, "worker-b", LEASE, now=later + timedelta(seconds=5))
        assert jobs.add_progress(session, job_id, 2, [ProgressSample(iteration=5, loss=1.0)])
        assert jobstate.transition(session, job_id, "running", "succeeded", attempt=2, compression=41.0)
    job = _job(factory, job_id)
    assert (job.state, job.iteration, job.loss, job.compression) == ("succeeded", 5, 1.0, 41.0)


def test_heartbeat_extends_the_lease_and_needs_the_owner(factory: sessionmaker[Session], job_id: uuid.UUID) -> None:
    t0 = utcnow()
    assert _claim(factory, job_id, "worker-a", now=t0) == 1
    t1 = t0 + timedelta(seconds=20)
    with session_scope(factory) as session:
        assert not jobstate.heartbeat(session, job_id, 1, "worker-b", LEASE, now=t1)
        assert jobstate.heartbeat(session, job_id, 1, "worker-a", LEASE, now=t1)
    assert _job(factory, job_id).lease_expires_at == t1 + timedelta(seconds=LEASE)
    # t0 + LEASE + 1 would have expired the first lease, but not the renewed one
    assert _claim(factory, job_id, "worker-b", now=t0 + timedelta(seconds=LEASE + 1)) is None


def test_reaper_requeues_an_expired_job_and_a_new_claim_resumes_it(
    factory: sessionmaker[Session], job_id: uuid.UUID
) -> None:
    t0 = utcnow()
    assert _claim(factory, job_id, "worker-a", now=t0) == 1
    with session_scope(factory) as session:
        assert not jobstate.release_expired(session, job_id, now=t0 + timedelta(seconds=1))  # lease still live
        assert jobstate.release_expired(session, job_id, now=t0 + timedelta(seconds=LEASE + 1))
    job = _job(factory, job_id)
    assert (job.state, job.attempt, job.lease_owner, job.lease_expires_at) == ("queued", 1, None, None)
    with session_scope(factory) as session:  # worker-a is fenced although the attempt number is unchanged
        assert not jobs.add_progress(session, job_id, 1, [ProgressSample(iteration=1)])
        assert not jobstate.heartbeat(session, job_id, 1, "worker-a", LEASE)
    assert _claim(factory, job_id, "worker-b") == 2


def test_request_cancel(factory: sessionmaker[Session], tenant_id: uuid.UUID) -> None:
    queued = new_job(factory, tenant_id)
    running = new_job(factory, tenant_id)
    assert _claim(factory, running, "worker-a") == 1
    with session_scope(factory) as session:
        assert jobstate.request_cancel(session, queued) == "cancelled"
        assert jobstate.request_cancel(session, running) == "running"
        assert jobstate.request_cancel(session, uuid.uuid4()) is None
        assert jobstate.request_cancel(session, queued) == "cancelled"  # finished: left as it is
    assert _job(factory, queued).cancel_requested and _job(factory, queued).finished_at is not None
    job = _job(factory, running)
    assert job.state == "running" and job.cancel_requested
    with session_scope(factory) as session:  # the worker sees the flag and stops
        assert jobstate.transition(session, running, "running", "cancelled", attempt=1)
    assert _job(factory, running).state == "cancelled"
