"""What the reaper reads from the Redis broker: the job ids whose message is pending there."""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from service.queue import QUEUE, pending_job_ids
from service.settings import Settings

URL = os.environ.get("NETSURGERY_TEST_REDIS_QUEUE", "redis://127.0.0.1:6379/13")


def _message(job_id: str) -> str:
    body = base64.b64encode(json.dumps([[job_id], {}, {}]).encode()).decode()
    return json.dumps({"body": body, "properties": {"body_encoding": "base64"}})


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(URL)
    try:
        c.ping()
    except redis.exceptions.ConnectionError as e:
        pytest.skip(f"Redis unreachable at {URL}: {e}")
    c.flushdb()
    yield c
    c.flushdb()
    c.close()


def test_a_message_a_dead_worker_holds_does_not_count_as_pending(client: redis.Redis) -> None:
    waiting, fresh, stale = (str(uuid.uuid4()) for _ in range(3))
    client.rpush(QUEUE, _message(waiting))
    now = time.time()
    for tag, job, delivered in (("t-fresh", fresh, now - 1), ("t-stale", stale, now - 3600)):
        client.hset("unacked", tag, json.dumps([json.loads(_message(job)), "", QUEUE]))
        client.zadd("unacked_index", {tag: delivered})
    settings = Settings(broker_url=URL, requeue_after_seconds=30)
    # waiting in the queue, or just delivered to a live worker: pending; delivered an hour ago to a
    # worker that never acknowledged it (it died): lost, so the reaper sends the job again
    assert pending_job_ids(None, settings) == {waiting, fresh}
