"""The Celery application both sides share: the API sends tasks by name, the worker runs them.

Policy, on purpose:

- JSON only, both ways (``accept_content=["json"]``): a worker never unpickles a message.
- ``task_acks_late`` + ``worker_prefetch_multiplier=1`` + ``task_reject_on_worker_lost``: a message
  is acknowledged only after its job finished, a worker holds one job at a time, and a worker
  killed mid-job puts its message back. Postgres, not the broker, decides whether a delivery still
  has work to do (the job's state and lease), so a duplicate delivery is harmless.
- ``visibility_timeout`` (Redis): how long an unacknowledged message stays invisible before the
  broker hands it out again. It is set above the longest job we expect (``job_visibility_seconds``,
  default 24 h) so that a long job is not delivered twice while it runs; a dead worker's job is
  recovered sooner by the reaper, which re-queues jobs whose lease (heartbeat) expired.
- Nothing here imports the training code: ``send_task`` names the task.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from celery import Celery

from service.settings import Settings

RUN_JOB = "netsurgery.run_job"
QUEUE = "jobs"
JOB_VISIBILITY_SECONDS = 24 * 3600


def broker_options(settings: Settings) -> dict[str, Any]:
    if settings.broker_url.startswith("filesystem://"):
        folder = Path(settings.broker_dir)
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),  # kombu's default is ./control in the working directory
            "store_processed": False,
        }
    return {"visibility_timeout": JOB_VISIBILITY_SECONDS}


def make_celery(settings: Settings) -> Celery:
    app = Celery("netsurgery", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=QUEUE,
        broker_transport_options=broker_options(settings),
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app


def enqueue_job(app: Celery, job_id: uuid.UUID) -> None:
    """Send the job to the workers; call only after the job row is committed."""
    app.send_task(RUN_JOB, args=[str(job_id)], queue=QUEUE)


def broker_reachable(app: Celery, timeout: float = 1.0) -> bool:
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout)
        return True
    except Exception:
        return False


def _job_id_of(raw: bytes | str) -> str | None:
    """The job id a raw Celery message (as stored by kombu's Redis or filesystem transport) carries."""
    import base64
    import json

    try:
        msg = json.loads(raw)
        if isinstance(msg, list):  # Redis "unacked" entries: [message, exchange, routing_key]
            msg = msg[0]
        body = msg["body"]
        if msg.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return str(args[0]) if args else None
    except (ValueError, KeyError, TypeError, IndexError):
        return None


def pending_job_ids(app: Celery, settings: Settings) -> set[str] | None:
    """Job ids with a message waiting in the broker, or delivered to a worker in the last
    ``requeue_after_seconds`` and not acknowledged yet.

    A message delivered longer ago and still unacknowledged belongs to a worker that died with it (a
    live worker claims a queued job within milliseconds of receiving it, and a running job is not
    the reaper's concern): Redis would give it back only after its visibility timeout, an hour, so
    it does not count as pending, and the job's message counts as lost.

    None when the broker cannot be inspected (an unknown transport, or unreachable): the caller then
    does not know which messages were lost and must not guess.
    """
    url = settings.broker_url
    try:
        if url.startswith(("redis://", "rediss://")):
            import redis

            client = redis.Redis.from_url(url, socket_timeout=2)
            try:
                since = time.time() - settings.requeue_after_seconds
                # kombu's Redis transport: "unacked" maps delivery tags to messages, "unacked_index" scores
                # each tag with its delivery time
                delivered: list[tuple[bytes, float]] = client.zrangebyscore(  # type: ignore[assignment]
                    "unacked_index", since, "+inf", withscores=True
                )
                tags = [tag for tag, _ in delivered]
                held = [m for m in client.hmget("unacked", tags) if m is not None] if tags else []
                raw = list(client.lrange(QUEUE, 0, -1)) + held
            finally:
                client.close()
        elif url.startswith("filesystem://"):
            folder = Path(broker_options(settings)["data_folder_out"])
            raw = [p.read_bytes() for p in folder.iterdir() if p.is_file()]
        else:
            return None
    except Exception:
        return None
    return {job for job in map(_job_id_of, raw) if job is not None}
