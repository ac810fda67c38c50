"""The HTTP routes: one router per resource, mounted under ``/v1`` by :func:`api.app.create_app`."""

from __future__ import annotations

from fastapi import APIRouter

from api.routes import artifacts, dashboard, datasets, docs, events, health, jobs, metrics, models

v1 = APIRouter(prefix="/v1")
v1.include_router(models.router)
v1.include_router(datasets.router)
v1.include_router(jobs.router)
v1.include_router(events.router)
v1.include_router(artifacts.router)

__all__ = ["dashboard", "docs", "health", "metrics", "v1"]
