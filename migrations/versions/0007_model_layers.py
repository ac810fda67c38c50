"""``models.layers``: the names of a model's prunable layers, found at upload.

A job's ``layer_kept``, ``include``, ``exclude`` and ``crates`` name layers or glob patterns over
them; with the names at hand, ``POST /v1/jobs`` refuses one that matches no layer of the model (a
422 naming the layers) instead of failing when the job runs. Nullable: models uploaded before this
revision have none, and their jobs are checked by the worker as before.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05 01:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("layers", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.drop_column("layers")
