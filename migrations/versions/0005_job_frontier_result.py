"""``jobs.frontier`` and ``jobs.result``: a budget search's frontier, and every finished job's verdict.

A job whose target is only ``max_accuracy_drop`` searches for the highest compression within it
(:mod:`dns_core.search`). The worker writes each judged point here as the run goes, and the whole
frontier with the chosen point and the candidates when the job ends; ``GET /v1/jobs/{id}/frontier``
reads it. Nullable: jobs with a compression target have none.

``result`` is what a job that succeeded delivered, from its report: compression by parameters and
by bytes, validation and test accuracy before and after, the drop, whether the budget held, the
file sizes and the verdict. ``GET /v1/jobs/{id}`` shows it. Nullable: unfinished, failed and
cancelled jobs have none.

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
        batch.add_column(sa.Column("result", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("result")
        batch.drop_column("frontier")
