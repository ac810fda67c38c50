"""Job event streams (``GET /v1/jobs/{id}/events``) over real HTTP, with Postgres.

No worker runs: the tests write progress and per-layer points through the repository, in one
transaction per batch, as a worker's flush does, and move the job's state through :mod:`service.repositories.jobstate`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from api.routes import events
from api.routes.events import Cursor
from service.database import session_scope
from service.repositories import jobs, jobstate
from service.repositories.jobs import LayerSample, ProgressSample
from tests.api.conftest import LiveServer
from tests.api.test_http_jobs import Account, claim, job_body, new_account

LAYERS = ("fc1", "fc2")


@dataclass(frozen=True)
class Event:
    event: str
    id: str
    data: dict[str, Any]

    @property
    def iteration(self) -> int:
        return int(self.data["iteration"])


def parse(lines: Iterator[str]) -> Iterator[Event | str]:
    """Server-Sent Events from the body's lines: an :class:`Event`, or a comment line as a string."""
    fields: dict[str, str] = {}
    data: list[str] = []
    for line in lines:
        if line == "":
            if fields or data:
                yield Event(fields.get("event", "message"), fields.get("id", ""), json.loads("\n".join(data)))
            fields, data = {}, []
        elif line.startswith(":"):
            yield line
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                data.append(value)
            else:
                fields[name] = value


class Stream:
    """An open event stream: take events (comments skipped) or the next item (comments included)."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.items = parse(response.iter_lines())

    def take(self, n: int) -> list[Event]:
        got: list[Event] = []
        while len(got) < n:
            item = next(self.items)
            if isinstance(item, Event):
                got.append(item)
        return got

    def rest(self) -> list[Event]:
        """Every event until the server ends the stream."""
        return [item for item in self.items if isinstance(item, Event)]


@contextmanager
def stream(live: LiveServer, key: str, job_id: str, last_event_id: str | None = None) -> Iterator[Stream]:
    headers = {"Last-Event-ID": last_event_id} if last_event_id is not None else {}
    with (
        live.client(key) as c,
        c.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=10) as r,
    ):
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        yield Stream(r)


def write(live: LiveServer, job_id: str, attempt: int, iterations: range) -> None:
    """One worker flush: progress at every iteration, per-layer points at the even ones."""
    with session_scope(live.factory) as session:
        job = uuid.UUID(job_id)
        points = [ProgressSample(i, loss=1 / (i + 1), compression=1 + i / 10) for i in iterations]
        assert jobs.add_progress(session, job, attempt, points)
        layers = [LayerSample(i, name, 100 - i, 100) for i in iterations if i % 2 == 0 for name in LAYERS]
        assert jobs.add_layer_points(session, job, attempt, layers)


def finish(live: LiveServer, job_id: str, attempt: int, state: str = "succeeded") -> None:
    with session_scope(live.factory) as session:
        assert jobstate.transition(session, uuid.UUID(job_id), "running", state, attempt=attempt)


def expected(iterations: range) -> list[tuple[str, int]]:
    """(event, iteration) of the points :func:`write` makes, in stream order."""
    out = []
    for i in iterations:
        out.append(("progress", i))
        if i % 2 == 0:
            out.append(("layers", i))
    return out


def kinds(got: list[Event]) -> list[tuple[str, int]]:
    return [(e.event, e.iteration) for e in got]


@pytest.fixture(autouse=True)
def fast_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events, "POLL_SECONDS", 0.05)


@pytest.fixture(scope="module")
def account(live: LiveServer) -> Account:
    return new_account(live)


def running_job(live: LiveServer, account: Account) -> tuple[str, int]:
    with live.client(account.key) as c:
        job_id: str = c.post("/v1/jobs", json=job_body(account)).json()["id"]
    return job_id, claim(live, job_id)


def test_stream_resumes_without_gaps_and_ends_with_the_terminal_state(live: LiveServer, account: Account) -> None:
    job_id, attempt = running_job(live, account)
    write(live, job_id, attempt, range(0, 6))

    with stream(live, account.key, job_id) as s:
        first = s.take(1 + len(expected(range(0, 6))))
        assert first[0].event == "state" and first[0].data["state"] == "running"
        assert first[0].data["id"] == job_id and first[0].data["attempt"] == attempt
        assert kinds(first[1:]) == expected(range(0, 6))
        write(live, job_id, attempt, range(6, 10))  # written while the stream is open
        first += s.take(len(expected(range(6, 10))))
    assert kinds(first[1:]) == expected(range(0, 10))
    p3 = first[1 + expected(range(0, 10)).index(("progress", 3))]
    assert p3.data | {"at": None} == {
        "iteration": 3, "attempt": attempt, "loss": 0.25, "val_accuracy": None, "compression": 1.3, "at": None,
    }  # fmt: skip
    assert first[2].data == {"iteration": 0, "layers": [{"layer": n, "kept": 100, "total": 100} for n in LAYERS]}
    assert len({e.id for e in first}) == len(first)  # every event moves the cursor

    # reconnect from the middle: exactly the events after it, then the rest as it is written
    middle = first.index(p3)
    with stream(live, account.key, job_id, last_event_id=p3.id) as s:
        again = s.take(len(first) - middle - 1)
        assert again == first[middle + 1 :]
        write(live, job_id, attempt, range(10, 12))
        finish(live, job_id, attempt)
        tail = s.rest()  # the server ends the stream after the terminal state
    assert kinds(tail[:-1]) == expected(range(10, 12))
    assert (tail[-1].event, tail[-1].data["state"]) == ("state", "succeeded")
    assert tail[-1].data["finished_at"] is not None

    with live.client(account.key) as c:
        # after the terminal event there is nothing more: 204 tells EventSource to stop reconnecting
        r = c.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": tail[-1].id})
        assert r.status_code == 204 and r.content == b""
    # a new stream on the finished job replays everything, with the terminal state last
    with stream(live, account.key, job_id) as s:
        replay = s.rest()
    assert kinds(replay[:-1]) == expected(range(0, 12))
    assert [e.data for e in replay[:-1]] == [e.data for e in first[1:] + tail[:-1]]
    assert (replay[-1].event, replay[-1].data["state"]) == ("state", "succeeded")
    # from a bare iteration, as a hand-written Last-Event-ID may say
    with stream(live, account.key, job_id, last_event_id="9") as s:
        assert kinds(s.rest()[:-1]) == expected(range(10, 12))


def test_full_pages_keep_the_two_kinds_in_order(
    live: LiveServer, account: Account, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More points than a page holds: read page after page, never skipping ahead of the other kind."""
    monkeypatch.setattr(events, "PROGRESS_PAGE", 3)
    monkeypatch.setattr(events, "LAYER_PAGE", 2)
    job_id, attempt = running_job(live, account)
    write(live, job_id, attempt, range(0, 15))
    finish(live, job_id, attempt, "failed")
    with stream(live, account.key, job_id) as s:
        got = s.rest()
    assert kinds(got[:-1]) == expected(range(0, 15))
    assert (got[-1].event, got[-1].data["state"]) == ("state", "failed")
    # resume from each event in turn: always exactly the rest
    for n in (0, 4, 9, len(got) - 2):
        with stream(live, account.key, job_id, last_event_id=got[n].id) as s:
            assert s.rest() == got[n + 1 :], n


def test_state_changes_pings_and_disconnects(
    live: LiveServer, account: Account, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events, "PING_SECONDS", 0.2)
    job_id, attempt = running_job(live, account)
    open_before = open_streams(live)
    with stream(live, account.key, job_id) as s:
        (state,) = s.take(1)
        assert (state.data["state"], state.data["cancel_requested"]) == ("running", False)
        # nothing new: keep-alive comments
        comment = next(s.items)
        assert isinstance(comment, str) and comment.startswith(": ping"), comment
        assert open_streams(live) == open_before + 1
        # a cancel request is a change of state worth telling (the worker stops at its next check)
        with live.client(account.key) as c:
            assert c.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
        (cancelling,) = s.take(1)
        assert (cancelling.data["state"], cancelling.data["cancel_requested"]) == ("running", True)
    # the client left: the server notices, stops polling and closes its side
    deadline = time.monotonic() + 5
    while open_streams(live) != open_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_streams(live) == open_before

    # resuming after the cancel request does not repeat it; the end does come
    with stream(live, account.key, job_id, last_event_id=cancelling.id) as s:
        finish(live, job_id, attempt, "cancelled")
        (end,) = s.rest()
    assert (end.event, end.data["state"]) == ("state", "cancelled")


def open_streams(live: LiveServer) -> float:
    for line in httpx.get(f"{live.url}/metrics").text.splitlines():
        if line.startswith("netsurgery_event_streams "):
            return float(line.split()[1])
    raise AssertionError("no netsurgery_event_streams in /metrics")


def test_isolation_and_auth(live: LiveServer, account: Account) -> None:
    job_id, _ = running_job(live, account)
    other = live.new_tenant()[1]
    with live.client(other) as c:
        r = c.get(f"/v1/jobs/{job_id}/events")
        assert r.status_code == 404 and r.json()["error"] == "not_found"
    with live.client(account.key) as c:
        assert c.get(f"/v1/jobs/{uuid.uuid4()}/events").status_code == 404
    for headers in ({}, {"Authorization": "Bearer ns_wrong"}):
        with httpx.Client(base_url=live.url, headers=headers) as c:
            r = c.get(f"/v1/jobs/{job_id}/events")
            assert r.status_code == 401 and r.json()["error"] == "unauthorized"
            assert r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    ("header", "cursor"),
    [
        (None, Cursor()),
        ("", Cursor()),
        ("12:7:running", Cursor(12, 7, "running")),
        ("-1:-1:", Cursor()),
        ("5:-1:running+cancel", Cursor(5, -1, "running+cancel")),
        ("42", Cursor(42, 42)),
        # not a cursor of ours: start from the beginning
        ("12:7:sleeping", Cursor()),
        ("12:7", Cursor()),
        ("-2:0:", Cursor()),
        (f"{2**31}:0:", Cursor()),
        ("9" * 30, Cursor()),
        ("x" * 1000, Cursor()),
        ("٣:1:", Cursor()),
    ],
)
def test_last_event_id(header: str | None, cursor: Cursor) -> None:
    assert Cursor.parse(header) == cursor
    assert Cursor.parse(cursor.event_id) == cursor
