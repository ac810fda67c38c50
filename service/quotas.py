"""Quotas per tenant, read from the database (the source of truth every API process shares).

- Active jobs (queued + running) per tenant, checked by :func:`check_job_quota` under a lock on the
  tenant's row taken in the transaction that inserts the job: two concurrent submits of one tenant
  are serialised, so they cannot both take the last slot.
- Stored bytes per tenant (models + data sets + job artifacts, as recorded), checked by
  :func:`check_storage_quota` before an upload's body is read (when its length is known) and again
  once it is received, before it is stored. No lock is held across the upload (it may take
  minutes), so concurrent uploads of one tenant may together pass the quota by at most their own
  sizes.

A refusal is a :class:`~service.errors.QuotaExceeded` (429 with ``Retry-After``).
"""

from __future__ import annotations

import uuid
from typing import Final

from sqlalchemy.orm import Session

from service.errors import QuotaExceeded
from service.repositories import jobs, stats, tenants
from service.settings import Settings

#: ``Retry-After`` of a refused job: jobs end or are cancelled on this scale.
JOB_QUOTA_RETRY_AFTER_S: Final = 30
#: ``Retry-After`` of a refused upload: space comes back only when the tenant deletes something.
STORAGE_QUOTA_RETRY_AFTER_S: Final = 60


def check_job_quota(session: Session, settings: Settings, tenant_id: uuid.UUID, idempotency_key: str | None) -> None:
    """:class:`QuotaExceeded` if the tenant already has ``max_active_jobs_per_tenant`` jobs queued or running.

    Locks the tenant's row first, in the session's transaction: call it in the transaction that then
    inserts the job, and commit that soon; a concurrent submit of the same tenant waits for the
    commit and then counts the new job. A repeated ``idempotency_key`` creates nothing and passes.
    """
    limit = settings.max_active_jobs_per_tenant
    if limit <= 0:
        return
    tenants.lock_tenant(session, tenant_id)
    if idempotency_key is not None and jobs.get_job_by_idempotency_key(session, tenant_id, idempotency_key):
        return
    active = stats.count_active_jobs(session, tenant_id)
    if active >= limit:
        raise QuotaExceeded(
            f"the tenant has {active} jobs queued or running, its quota is {limit}; wait for one to end or cancel one",
            retry_after=JOB_QUOTA_RETRY_AFTER_S,
        )


def check_storage_quota(
    session: Session, settings: Settings, tenant_id: uuid.UUID, incoming: int, *, body_unread: bool = False
) -> None:
    """:class:`QuotaExceeded` if the tenant's stored bytes plus ``incoming`` would pass ``max_stored_bytes_per_tenant``.

    Ends the read transaction it opens, so no connection is held while an upload streams in or is
    copied to storage. ``body_unread``: the request's body was not read, so the answer closes the
    connection (as a 413 before reading does).
    """
    limit = settings.max_stored_bytes_per_tenant
    if limit <= 0:
        return
    try:
        used = stats.stored_bytes(session, tenant_id)
    finally:
        session.commit()
    if used + incoming > limit:
        raise QuotaExceeded(
            f"storing {incoming:,} more bytes would pass the tenant's quota of {limit:,} bytes "
            f"({used:,} stored in models, data sets and job artifacts); delete some first",
            retry_after=STORAGE_QUOTA_RETRY_AFTER_S,
            headers={"Connection": "close"} if body_unread else None,
        )
