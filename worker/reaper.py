"""The reaper: jobs whose worker died (lease expired) go back to the queue.

Postgres is the source of truth, the broker only a doorbell: a job whose lease ran out is moved
back to ``queued`` by one guarded update and enqueued again after the commit; the next claim
resumes it from its last checkpoint. A job ``queued`` for longer than a grace period whose message
is no longer in the broker (lost with a broker restart that kept nothing) is enqueued again too;
the broker's queue is read to tell, so a long but healthy queue gets no duplicates. A duplicate
would be harmless anyway: only one claim can win. Every worker runs the reaper in a thread; the guarded updates make
concurrent reapers safe.
"""

from __future__ import annotations

import logging
import threading
import uuid

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from service.database import session_scope
from service.queue import enqueue_job, pending_job_ids
from service.repositories import jobstate
from service.settings import Settings

log = logging.getLogger("netsurgery.reaper")


def reap(
    sessions: sessionmaker[Session], app: Celery, settings: Settings, *, stale_queued_seconds: float
) -> list[uuid.UUID]:
    """One pass: re-queue expired leases, re-send queued jobs whose message was lost; the ids sent."""
    with session_scope(sessions) as session:
        released = [job_id for job_id in jobstate.expired_leases(session) if jobstate.release_expired(session, job_id)]
    with session_scope(sessions) as session:
        waiting = jobstate.stale_queued(session, stale_queued_seconds)
    lost: list[uuid.UUID] = []
    if waiting:
        pending = pending_job_ids(app, settings)
        if pending is not None:
            lost = [job_id for job_id in waiting if str(job_id) not in pending and job_id not in released]
    sent = []
    for job_id in released + lost:
        try:
            enqueue_job(app, job_id)
            sent.append(job_id)
        except Exception:  # the broker is down: the job stays queued in Postgres; the next pass retries
            log.warning("reaper: could not enqueue job %s; will retry", job_id)
    if released or lost:
        log.info("reaper: re-queued %d expired lease(s), re-sent %d lost message(s)", len(released), len(lost))
    return sent


class Reaper(threading.Thread):
    """:func:`reap` every ``interval`` seconds until stopped."""

    def __init__(self, sessions: sessionmaker[Session], app: Celery, settings: Settings) -> None:
        super().__init__(name="reaper", daemon=True)
        self.sessions, self.app, self.settings = sessions, app, settings
        interval, stale_queued_seconds = settings.reaper_seconds, settings.requeue_after_seconds
        self.interval, self.stale_queued_seconds = interval, stale_queued_seconds
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                reap(self.sessions, self.app, self.settings, stale_queued_seconds=self.stale_queued_seconds)
            except Exception:
                log.exception("reaper pass failed; retrying next interval")

    def stop(self) -> None:
        self._stop_event.set()
