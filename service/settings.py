"""Service settings: one pydantic-settings class read from ``NETSURGERY_*`` environment variables."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1024 * 1024
GIB = 1024 * MIB
#: ``limits_url`` value that asks for the in-process limiter even when the broker is Redis.
IN_PROCESS_LIMITS = "memory://"
#: URL schemes of a Redis ``limits_url``.
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
#: Default ``cpu_flops_per_second``: 3 × forward FLOPs (62.5 MFLOP an example) × batch ÷ seconds of SGD training
#: steps of ``ResNetSmall(in_channels=3, depth=3)`` on batches of 64 of 3×28×28 on 2 cores (torch 2.13, CPU): 22 to
#: 31 GFLOP/s, median 25, over ten rounds of 5 steps while the cores were not taken by other work; rounded down.
CPU_FLOPS_PER_SECOND = 20e9


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or "~/.local/share"
    return Path(base).expanduser() / "netsurgery"


class Settings(BaseSettings):
    """Everything the service and its workers read from the environment.

    Each field is set by ``NETSURGERY_<FIELD>`` (for example ``NETSURGERY_DATABASE_URL``). The
    defaults describe the embedded, one-machine set-up: a SQLite file, a filesystem broker and a
    local artifact folder, all under ``data_dir``. Production sets the database, broker and storage
    URLs to Postgres, Redis and an S3 bucket; nothing else changes.
    """

    model_config = SettingsConfigDict(env_prefix="NETSURGERY_", extra="ignore", frozen=True)

    data_dir: Path = Field(
        default_factory=_default_data_dir,
        description="Folder for the embedded defaults (SQLite file, broker folders, artifacts). "
        "Defaults to $XDG_DATA_HOME/netsurgery, else ~/.local/share/netsurgery.",
    )
    database_url: str = Field(
        default="",
        description="SQLAlchemy URL of the database, e.g. postgresql+psycopg://user@host/db. "
        "Empty means sqlite:///<data_dir>/netsurgery.db.",
    )
    broker_url: str = Field(
        default="filesystem://",
        description="Celery broker URL, e.g. redis://127.0.0.1:6379/0. The default is kombu's "
        "filesystem transport, whose folders live under <data_dir>/broker (see broker_dir).",
    )
    storage_url: str = Field(
        default="",
        description="Where models, datasets, checkpoints and artifacts are stored: a filesystem "
        "path, or an fsspec URL such as s3://bucket/prefix when API and workers run on different "
        "machines. Empty means <data_dir>/storage.",
    )
    max_upload_bytes: int = Field(
        default=512 * MIB,
        gt=0,
        description="Largest accepted upload (model or dataset) in bytes; larger bodies get a 413.",
    )
    max_model_memory_bytes: int = Field(
        default=48 * 1024 * MIB,
        gt=0,
        description="Memory a model may need on a worker (its parameters and the activations of one batch, "
        "estimated at upload from its shapes alone); a model past it is refused with the estimate (422).",
    )
    auth_cache_seconds: float = Field(
        default=5.0,
        ge=0,
        description="How long an API process trusts a verified key without asking the database again "
        "(a revoked key stops working within this time); 0 turns the cache off.",
    )
    job_cache_size: int = Field(
        default=10_000,
        ge=0,
        description="Jobs each API process keeps in memory for GET /v1/jobs/{id}, each dropped as soon as "
        "PostgreSQL announces a change to it (LISTEN/NOTIFY; see api/jobcache.py). 0 turns the cache off; "
        "on SQLite it is always off.",
    )
    lease_seconds: float = Field(
        default=120.0,
        gt=0,
        description="How long a worker's claim on a running job lasts without a heartbeat; after "
        "that the reaper re-queues the job and another worker may take it over.",
    )
    heartbeat_seconds: float = Field(
        default=20.0,
        gt=0,
        description="How often a worker renews its lease; must be well below lease_seconds.",
    )
    checkpoint_every: int = Field(
        default=1000,
        gt=0,
        description="Iterations between checkpoints; a resumed job loses at most this much work.",
    )
    device: str = Field(
        default="auto",
        description="Where workers train: 'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or 'cuda:N'. "
        "Run one worker process per GPU and choose it with CUDA_VISIBLE_DEVICES.",
    )
    default_iterations: int = Field(
        default=20_000,
        gt=0,
        description="Surgery iterations of a job that does not set its own.",
    )
    cpu_flops_per_second: float = Field(
        default=CPU_FLOPS_PER_SECOND,
        gt=0,
        description="Floating-point operations per second a CPU worker sustains in training, for the training-time "
        "estimate of a job at submit on a CPU-only deployment (3 × the forward FLOPs of one example, counted at "
        "upload, × batch size × iterations ÷ this). The default was measured on 2 cores (ResNetSmall, batches of "
        "64); set it from your workers' own figure.",
    )
    cpu_job_limit_seconds: float = Field(
        default=6 * 3600.0,
        ge=0,
        description="On a CPU-only deployment (device 'cpu', or 'auto' where the API process sees no CUDA device), "
        "a job whose estimated training time is over this is refused at submit with the estimate (422, "
        "exceeds_cpu_time_limit). 0 means no limit. Models uploaded before their FLOPs were recorded are never "
        "refused. The API process judges by its own device setting: where it runs without a GPU beside GPU "
        "workers, give it device 'cuda' as well, or it takes the deployment for CPU-only.",
    )
    reaper_seconds: float = Field(
        default=15.0,
        gt=0,
        description="How often each worker's reaper looks for expired leases and lost queue messages.",
    )
    requeue_after_seconds: float = Field(
        default=30.0,
        gt=0,
        description="A job queued for longer than this whose message is no longer in the broker (lost "
        "with a broker restart) is sent again.",
    )
    progress_flush_seconds: float = Field(
        default=1.0,
        gt=0,
        description="How often a worker writes buffered progress points to the database.",
    )
    rate_limit_per_second: float = Field(
        default=100.0,
        ge=0,
        description="Sustained requests per second each API key may make to the /v1 routes (a GCRA token "
        "bucket shared by all API processes through limits_url); past it the answer is a 429 with "
        "Retry-After. The default leaves room for a few dashboards polling many jobs with one key. "
        "0 turns the rate limit off.",
    )
    rate_limit_burst: int = Field(
        default=200,
        gt=0,
        description="Requests an API key may make at once (the size of its bucket); past that it is held to "
        "rate_limit_per_second.",
    )
    max_active_jobs_per_tenant: int = Field(
        default=20,
        ge=0,
        description="Jobs a tenant may have queued or running at once; one more is refused with a 429 "
        "(quota_exceeded) until one ends or is cancelled. 0 means no limit.",
    )
    max_stored_bytes_per_tenant: int = Field(
        default=20 * GIB,
        ge=0,
        description="Bytes a tenant may keep stored (models, data sets and job artifacts, as recorded in the "
        "database); an upload that would pass it is refused with a 429 (quota_exceeded). 0 means no limit.",
    )
    limits_url: str = Field(
        default="",
        description="Redis URL where API processes keep the shared rate-limit counters, e.g. "
        "redis://127.0.0.1:6379/0. Empty means the broker URL when that is Redis, else an in-process "
        f"limiter (right for the embedded one-process server); {IN_PROCESS_LIMITS!r} asks for the "
        "in-process limiter explicitly. If Redis cannot be reached, requests are let through (the rate "
        "limit fails open) and a warning is logged.",
    )

    @model_validator(mode="after")
    def _fill_defaults(self) -> Settings:
        # frozen=True: derived defaults are filled in once, here, through object.__setattr__.
        if not self.database_url:
            object.__setattr__(self, "database_url", f"sqlite:///{self.data_dir / 'netsurgery.db'}")
        if not self.storage_url:
            object.__setattr__(self, "storage_url", str(self.data_dir / "storage"))
        if not self.limits_url and self.broker_url.startswith(REDIS_SCHEMES):
            object.__setattr__(self, "limits_url", self.broker_url)
        if self.limits_url not in ("", IN_PROCESS_LIMITS) and not self.limits_url.startswith(REDIS_SCHEMES):
            raise ValueError(
                f"limits_url must be a Redis URL (redis://, rediss://, unix://), {IN_PROCESS_LIMITS!r} or empty, "
                f"got one starting {self.limits_url.split(':', 1)[0]!r}"
            )
        if self.heartbeat_seconds >= self.lease_seconds:
            raise ValueError(
                f"heartbeat_seconds ({self.heartbeat_seconds}) must be smaller than lease_seconds "
                f"({self.lease_seconds}), or every lease expires before it is renewed"
            )
        return self

    @property
    def broker_dir(self) -> Path:
        """Folder for the filesystem broker's queues (used only with ``broker_url='filesystem://'``)."""
        return self.data_dir / "broker"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment (``get_settings.cache_clear()`` to re-read)."""
    return Settings()
