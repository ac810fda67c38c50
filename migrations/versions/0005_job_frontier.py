"""``jobs.frontier``: a budget-only job's frontier (the compressions it reached and their accuracy).

A job whose target is only ``max_accuracy_drop`` searches for the highest compression within it
(:mod:`dns_core.search`). The worker writes each judged point here as the run goes, and the whole
frontier with the chosen point and the candidates when the job ends; ``GET /v1/jobs/{id}/frontier``
reads it. Nullable: jobs with a compression target have none.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 22:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("frontier", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("frontier")
