"""Hugging Face folders as a model format, image-folder archives as a data set kind.

``models.format`` takes ``hf`` (a Hugging Face folder, stored as one zip bundle) beside ``onnx``
and ``safetensors``; ``datasets.kind`` takes ``images`` (a zip or tar of class folders of PNG/JPEG).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04 13:10:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_MODEL_FORMATS = ("onnx", "safetensors")
_DATASET_KINDS = ("builtin", "npz", "safetensors", "idx")


def _in(column: str, values: Sequence[str]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def _set(model_formats: Sequence[str], dataset_kinds: Sequence[str]) -> None:
    with op.batch_alter_table("models") as batch:
        batch.drop_constraint(op.f("ck_models_format"), type_="check")
        batch.create_check_constraint(op.f("ck_models_format"), _in("format", model_formats))
    with op.batch_alter_table("datasets") as batch:
        batch.drop_constraint(op.f("ck_datasets_kind"), type_="check")
        batch.create_check_constraint(op.f("ck_datasets_kind"), _in("kind", dataset_kinds))


def upgrade() -> None:
    _set((*_MODEL_FORMATS, "hf"), (*_DATASET_KINDS, "images"))


def downgrade() -> None:
    _set(_MODEL_FORMATS, _DATASET_KINDS)
