"""``models.flops_per_example``: the FLOPs of one example's forward pass, counted at upload.

A CPU-only deployment turns it into a job's estimated training time at submit and refuses a job
over ``Settings.cpu_job_limit_seconds``. Nullable: models uploaded before this revision have no
count (they are never refused), nor has a model whose forward pass could not be counted.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04 16:05:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("flops_per_example", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.drop_column("flops_per_example")
