"""PostgreSQL only: every update or delete of a job sends ``NOTIFY netsurgery_jobs, '<job id>'``.

API processes listen on that channel to drop a job from their in-memory cache when it changes
(``api/jobcache.py``). A trigger rather than a call in the code that writes, so that no writer
(worker, reaper, API, an operator's SQL) can forget it. SQLite has no ``NOTIFY``: nothing to do there.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 15:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        """
        CREATE FUNCTION netsurgery_job_changed() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'DELETE' THEN
                PERFORM pg_notify('netsurgery_jobs', OLD.id::text);
            ELSE
                PERFORM pg_notify('netsurgery_jobs', NEW.id::text);
            END IF;
            RETURN NULL;
        END
        $$
        """
    )
    op.execute(
        "CREATE TRIGGER jobs_notify_change AFTER UPDATE OR DELETE ON jobs "
        "FOR EACH ROW EXECUTE FUNCTION netsurgery_job_changed()"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER IF EXISTS jobs_notify_change ON jobs")
    op.execute("DROP FUNCTION IF EXISTS netsurgery_job_changed()")
