"""The Celery side of the worker: a thin task around :func:`worker.runner.run_job`.

Start a worker with ``netsurgery worker`` (one process per GPU; choose the GPU with
``CUDA_VISIBLE_DEVICES``). CUDA is initialised only inside the task, when the first job trains.
"""

from __future__ import annotations

import logging
import uuid
from functools import lru_cache

from celery import Celery
from celery.signals import worker_process_init, worker_ready, worker_shutdown

from dns_core import numerics
from service.queue import RUN_JOB, make_celery
from service.settings import get_settings
from worker.reaper import Reaper
from worker.runner import WorkerContext, run_job

log = logging.getLogger("netsurgery.worker")

app: Celery = make_celery(get_settings())


@lru_cache(maxsize=1)
def context() -> WorkerContext:
    return WorkerContext.from_settings(get_settings())


@app.task(name=RUN_JOB, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job_task(job_id: str) -> str:
    try:
        parsed = uuid.UUID(job_id)
    except (ValueError, TypeError, AttributeError):
        log.error("ignoring a task with a bad job id %r", job_id)
        return "bad-id"
    return run_job(context(), parsed)


_reaper: Reaper | None = None


@worker_process_init.connect
def _fresh_connections(**_: object) -> None:
    context.cache_clear()  # a forked child must not share the parent's database connections
    numerics.check()  # a forked child starts with the machine's thread count: pin it again under portable numerics


@worker_ready.connect
def _start_reaper(**_: object) -> None:
    global _reaper
    s = get_settings()
    _reaper = Reaper(context().sessions, app, s)
    _reaper.start()


@worker_shutdown.connect
def _stop_reaper(**_: object) -> None:
    if _reaper is not None:
        _reaper.stop()
