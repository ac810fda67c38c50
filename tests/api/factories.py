"""Rows the service tests build on: tenants and queued jobs, committed."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from service.database import session_scope
from service.repositories import StoredUpload, datasets, jobs, models, tenants


def new_tenant(factory: sessionmaker[Session]) -> uuid.UUID:
    """A committed tenant with a unique name."""
    with session_scope(factory) as session:
        tenant, _ = tenants.create_tenant(session, f"tenant-{uuid.uuid4().hex[:12]}")
        return tenant.id


def new_job(factory: sessionmaker[Session], tenant_id: uuid.UUID, **job: Any) -> uuid.UUID:
    """A committed queued job of ``tenant_id``, on a new ONNX model and built-in dataset."""
    with session_scope(factory) as session:
        stored = StoredUpload(uuid.uuid4(), "lenet", 1_066_000, "0" * 64, "file:///tmp/model.onnx")
        model = models.create_model(session, tenant_id, stored, models.ModelFacts("onnx", 266_610))
        dataset = datasets.create_builtin_dataset(session, tenant_id, "digits", "digits")
        created, _ = jobs.create_job(
            session,
            tenant_id,
            model_id=model.id,
            dataset_id=dataset.id,
            **({"method": "dns", "target": {"compression": 40.0}, "settings": {"iterations": 100}} | job),
        )
        return created.id
