"""``GET /v1/jobs/{id}/events``: a job's progress, per-layer sparsity and state as Server-Sent Events.

Events, each with ``data:`` one JSON object:

- ``state``: the job (as ``GET /v1/jobs/{id}``) when the stream starts and whenever its state, or
  its ``cancel_requested`` flag, changes. A terminal state (succeeded, failed, cancelled) is the
  last event: the stream ends after it, once every point written before it was sent.
- ``progress``: one logged iteration (as an item of ``GET /v1/jobs/{id}/progress``).
- ``layers``: per-layer kept/total at one iteration (as an item of ``GET /v1/jobs/{id}/layers``).

Progress and layers events come in order of iteration (progress before layers at the same one).

Resuming: every event's ``id`` is a cursor, ``<progress iteration>:<layers iteration>:<state>``:
the last progress and layers iterations sent so far (-1: none) and the last state sent. A client
that reconnects with ``Last-Event-ID`` (browsers' ``EventSource`` does so by itself) gets exactly
the events after that one, with no gap and no repeat; the state is sent again only if it changed.
A reconnect after the terminal event, with nothing left to send, is answered 204, which tells
``EventSource`` to stop reconnecting. An ID that is not such a cursor is ignored (the stream starts
from the beginning); a bare number ``n`` means "after iteration n" for both kinds.

How it runs: the server polls the database every :data:`POLL_SECONDS` in a short transaction of its
own (one query when nothing changed), holding no connection while it waits, and sends a comment
(``: ping``) every :data:`PING_SECONDS` so that proxies keep the connection open. It stops when the
client disconnects. Authentication and the rate limit apply once, when the stream opens.
"""

from __future__ import annotations

import logging
import math
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, Final

import anyio
from fastapi import APIRouter, Header, Request, Response
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session, sessionmaker
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from api.deps import SessionDep, TenantDep
from api.metrics import metrics_of
from api.routes.common import responses
from api.schemas import JobRead, LayerKept, LayerSnapshot, ProgressPointRead
from service.errors import NotFound
from service.orm import JOB_STATES, TERMINAL_STATES, Job
from service.repositories import jobs as repository
from service.usecases.jobs import get_job

log = logging.getLogger(__name__)

router = APIRouter(prefix="/jobs", tags=["jobs"])

#: Seconds between two looks at the database while nothing new was found.
POLL_SECONDS: float = 0.5
#: Seconds between keep-alive comments.
PING_SECONDS: float = 15.0
#: Longest wait between retries while the database cannot be reached (the stream stays open).
MAX_BACKOFF_SECONDS: Final = 5.0
#: Progress points and layer iterations read per look; more are read at once, without waiting.
PROGRESS_PAGE = 500
LAYER_PAGE = 100
#: Largest iteration a cursor may name (``progress_points.iteration`` is a 32-bit integer).
MAX_ITERATION: Final = 2**31 - 1

_CANCEL_SUFFIX: Final = "+cancel"
_STATE_TOKENS: Final = frozenset(JOB_STATES) | {s + _CANCEL_SUFFIX for s in JOB_STATES if s not in TERMINAL_STATES}
_CURSOR: Final = re.compile(r"^(-1|[0-9]{1,10}):(-1|[0-9]{1,10}):([a-z+]*)$")


def state_token(job: Job) -> str:
    """What a ``state`` event reports as changed: the state, marked while a cancel is pending."""
    if job.cancel_requested and job.state not in TERMINAL_STATES:
        return job.state + _CANCEL_SUFFIX
    return job.state


@dataclass(frozen=True, slots=True)
class Cursor:
    """How far a stream got: the last progress and layers iterations sent (-1: none), the last state sent."""

    progress: int = -1
    layers: int = -1
    state: str = ""

    @property
    def event_id(self) -> str:
        return f"{self.progress}:{self.layers}:{self.state}"

    @classmethod
    def parse(cls, text: str | None) -> Cursor:
        """The cursor in a ``Last-Event-ID``; the start for a missing or malformed one."""
        text = (text or "").strip()
        if len(text) > 64:
            return cls()
        if text.isascii() and text.isdigit():
            n = int(text)
            return cls(n, n) if n <= MAX_ITERATION else cls()
        match = _CURSOR.match(text)
        if match is None:
            return cls()
        progress, layers, state = int(match[1]), int(match[2]), match[3]
        if progress > MAX_ITERATION or layers > MAX_ITERATION or (state and state not in _STATE_TOKENS):
            return cls()
        return cls(progress, layers, state)


@dataclass(slots=True)
class Batch:
    """What one look at the database found: the events to send and the cursor after them."""

    cursor: Cursor
    events: list[ServerSentEvent] = field(default_factory=list)
    #: the terminal state was reached (and everything before it sent), or the job is gone: end the stream
    done: bool = False
    #: a page was full: look again at once
    more: bool = False

    def add(self, kind: str, data: Any, cursor: Cursor) -> None:
        self.cursor = cursor
        self.events.append(ServerSentEvent(data=data.model_dump_json(), event=kind, id=cursor.event_id))


def _snapshots(points: list[Any]) -> list[LayerSnapshot]:
    snapshots: list[LayerSnapshot] = []
    for p in points:
        if not snapshots or snapshots[-1].iteration != p.iteration:
            snapshots.append(LayerSnapshot(iteration=p.iteration, layers=[]))
        snapshots[-1].layers.append(LayerKept(layer=p.layer, kept=p.kept, total=p.total))
    return snapshots


def poll(factory: sessionmaker[Session], tenant_id: uuid.UUID, job_id: uuid.UUID, cursor: Cursor) -> Batch:
    """One look at the database (one short transaction): the events after ``cursor``.

    The job is read before its points: under READ COMMITTED, points read afterwards include every
    point committed before the state that was read, so a terminal state is sent after all of them.
    A worker's points are written with the job's summary in one transaction, and ``jobs.iteration``
    and ``jobs.layers`` (the newest iterations) say whether there is anything new to read.
    """
    batch = Batch(cursor)
    with factory() as session:
        job = repository.get_job(session, tenant_id, job_id)
        if job is None:  # deleted meanwhile
            batch.done = True
            return batch
        terminal = job.state in TERMINAL_STATES
        token = state_token(job)
        snapshot = JobRead.model_validate(job)
        newest_layers = job.layers.get("iteration") if isinstance(job.layers, dict) else None
        progress = []
        if terminal or job.iteration > cursor.progress:
            progress = repository.list_progress(session, job_id, after_iteration=cursor.progress, limit=PROGRESS_PAGE)
        layer_points = []
        if terminal or not isinstance(newest_layers, int) or newest_layers > cursor.layers:
            layer_points = repository.list_layer_history(
                session, job_id, after_iteration=cursor.layers, iterations=LAYER_PAGE
            )
        progress_items = [ProgressPointRead.model_validate(p) for p in progress]
        snapshots = _snapshots(layer_points)

    # a full page may end before the other kind's: send both only up to where both are complete
    limit = math.inf
    if len(progress_items) == PROGRESS_PAGE:
        limit = min(limit, progress_items[-1].iteration)
    if len(snapshots) == LAYER_PAGE:
        limit = min(limit, snapshots[-1].iteration)
    batch.more = limit != math.inf

    if token != cursor.state and not terminal:
        batch.add("state", snapshot, replace(batch.cursor, state=token))
    items: list[tuple[int, int, ProgressPointRead | LayerSnapshot]] = [
        (p.iteration, 0, p) for p in progress_items if p.iteration <= limit
    ]
    items += [(s.iteration, 1, s) for s in snapshots if s.iteration <= limit]
    for iteration, order, item in sorted(items, key=lambda t: (t[0], t[1])):
        if order == 0:
            batch.add("progress", item, replace(batch.cursor, progress=iteration))
        else:
            batch.add("layers", item, replace(batch.cursor, layers=iteration))
    if terminal and not batch.more:
        if token != batch.cursor.state:
            batch.add("state", snapshot, replace(batch.cursor, state=token))
        batch.done = True
    return batch


async def event_stream(
    request: Request, factory: sessionmaker[Session], tenant_id: uuid.UUID, job_id: uuid.UUID, cursor: Cursor
) -> AsyncIterator[ServerSentEvent]:
    """Poll and yield events until the terminal state; cancelled by the response when the client leaves."""
    metrics = metrics_of(request.app)
    if metrics is not None:
        metrics.event_streams.inc()
    failures = 0
    try:
        while True:
            try:
                batch = await run_in_threadpool(poll, factory, tenant_id, job_id, cursor)
            except (sa_exc.OperationalError, sa_exc.DBAPIError, sa_exc.TimeoutError) as e:
                # the database restarts: keep the stream (and its pings) and look again later
                failures += 1
                if failures == 1:
                    log.warning("event stream of job %s: database unavailable (%s); retrying", job_id, e)
                await anyio.sleep(min(POLL_SECONDS * 2**failures, MAX_BACKOFF_SECONDS))
                continue
            failures = 0
            for event in batch.events:
                yield event
            cursor = batch.cursor
            if batch.done:
                return
            if not batch.more:
                await anyio.sleep(POLL_SECONDS)
    finally:
        if metrics is not None:
            metrics.event_streams.dec()


def _json_event(kind: str, ref: str, description: str) -> dict[str, Any]:
    return {
        "type": "object",
        "description": description,
        "required": ["event", "data", "id"],
        "properties": {
            "event": {"const": kind},
            "id": {"type": "string", "description": "Cursor: send it back as Last-Event-ID to resume after it."},
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": {"$ref": f"#/components/schemas/{ref}"},
            },
        },
    }


#: One event of the stream (OpenAPI before 3.2: the ``schema`` of ``text/event-stream`` describes each event).
EVENT_SCHEMA: Final = {
    "oneOf": [
        _json_event("state", "JobRead", "The job, at the start and when its state changes; a terminal one is last."),
        _json_event("progress", "ProgressPointRead", "One logged iteration."),
        _json_event("layers", "LayerSnapshot", "Per-layer kept/total at one iteration."),
    ]
}

LastEventId = Annotated[
    str | None,
    Header(
        alias="Last-Event-ID",
        description="The id of the last event received: the stream resumes after it (no gap, no repeat).",
    ),
]


@router.get(
    "/{job_id}/events",
    summary="Stream a job's progress",
    response_class=EventSourceResponse,
    responses={
        200: {
            "description": "Server-Sent Events: `state`, `progress` and `layers`, each with a resumable `id`; "
            "`: ping` comments keep the connection open. Ends after a terminal `state` event.",
            "content": {"text/event-stream": {"schema": EVENT_SCHEMA}},
        },
        204: {"description": "Last-Event-ID names the terminal event and nothing follows it: do not reconnect."},
        **responses(NotFound),
    },
)
def job_events(
    job_id: uuid.UUID,
    request: Request,
    tenant: TenantDep,
    session: SessionDep,
    last_event_id: LastEventId = None,
) -> Response:
    """Follow a job live: its state, every logged iteration and per-layer sparsity, as they are written.

    Reconnect with ``Last-Event-ID`` to resume without gaps or repeats; stop when a ``state`` event
    reports succeeded, failed or cancelled (the server then ends the stream).
    """
    job = get_job(session, tenant.tenant_id, job_id)
    cursor = Cursor.parse(last_event_id)
    if (
        job.state in TERMINAL_STATES
        and cursor.state == state_token(job)
        and not repository.list_progress(session, job_id, after_iteration=cursor.progress, limit=1)
        and not repository.list_layer_points(session, job_id, after_iteration=cursor.layers, limit=1)
    ):
        return Response(status_code=204)
    factory: sessionmaker[Session] = request.app.state.session_factory
    return EventSourceResponse(event_stream(request, factory, tenant.tenant_id, job_id, cursor), ping=PING_SECONDS)
