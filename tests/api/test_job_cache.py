"""The polled read path: ``GET /v1/jobs/{id}`` from memory until PostgreSQL announces a change.

The cache's rules on their own (no database), its listener against a real Postgres (migration 0002's
trigger, a killed listening connection), the answers over real HTTP after other processes write,
the shared key lookup of :class:`api.deps.AuthCache`, and :class:`service.database.Reader` itself.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from api.deps import AuthCache, Principal
from api.jobcache import JobCache
from api.schemas import JobRead
from service.database import Reader, libpq_conninfo, make_engine, make_session_factory, session_scope
from service.errors import ServiceUnavailable
from service.migrate import upgrade
from service.orm import Job
from service.repositories import jobs, tenants
from tests.api.conftest import REDIS_TEST_URL, LiveServer, closed_port, http_settings, serve
from tests.api.factories import new_job, new_tenant

A, B = uuid.uuid4(), uuid.uuid4()


def live_cache(**kwargs: Any) -> JobCache:
    cache = JobCache(**kwargs)
    cache.live = True
    return cache


# -- the rules ------------------------------------------------------------------------------------


def test_served_only_while_live_and_only_to_its_tenant() -> None:
    cache, job = JobCache(), uuid.uuid4()
    cache.put(job, A, "answer", cache.token())
    assert cache.get(job, A) is None  # not listening: nothing kept, nothing served
    cache.live = True
    cache.put(job, A, "answer", cache.token())
    assert cache.get(job, A) == "answer"
    assert cache.get(job, B) is None
    cache.live = False
    assert cache.get(job, A) is None


def test_a_read_that_raced_a_change_is_not_kept() -> None:
    cache, job, other = live_cache(), uuid.uuid4(), uuid.uuid4()
    token = cache.token()
    cache.invalidate(other)  # a change arrives while the row is being read (any job: checked globally)
    cache.put(job, A, "maybe stale", token)
    assert cache.get(job, A) is None
    cache.put(job, A, "fresh", cache.token())
    assert cache.get(job, A) == "fresh"
    cache.invalidate(job)
    assert cache.get(job, A) is None


def test_size_and_age_are_bounded() -> None:
    cache = live_cache(size=3, max_age=0.2)
    job_ids = [uuid.uuid4() for _ in range(4)]
    for i, job in enumerate(job_ids):
        cache.put(job, A, i, cache.token())
    assert [cache.get(job, A) for job in job_ids] == [None, 1, 2, 3]  # the oldest went first
    time.sleep(0.25)
    assert all(cache.get(job, A) is None for job in job_ids)


# -- the listener on a real Postgres --------------------------------------------------------------


@pytest.fixture
def migrated(postgres_url: str) -> Iterator[tuple[str, sessionmaker[Session]]]:
    upgrade(postgres_url)
    engine = make_engine(postgres_url)
    yield postgres_url, make_session_factory(engine)
    engine.dispose()


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> float:
    """Seconds until ``condition()`` held (fails the test after ``timeout``)."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, "condition not met in time"
        await asyncio.sleep(0.005)
    return time.monotonic() - start


def test_changes_from_any_writer_drop_the_entry(migrated: tuple[str, sessionmaker[Session]]) -> None:
    url, factory = migrated
    tenant = new_tenant(factory)
    job, other = new_job(factory, tenant), new_job(factory, tenant)

    async def scenario() -> None:
        cache = JobCache()
        listener = asyncio.create_task(cache.run(libpq_conninfo(url)))
        try:
            await until(lambda: cache.live)
            for jid in (job, other):
                cache.put(jid, tenant, f"answer {jid}", cache.token())

            # a worker's progress write, in its own connection: the entry goes, the other job's stays
            with session_scope(factory) as s:
                s.execute(update(Job).where(Job.id == job).values(iteration=7, loss=0.5))
            waited = await until(lambda: cache.get(job, tenant) is None, timeout=2.0)
            assert waited < 1.0
            assert cache.get(other, tenant) == f"answer {other}"

            # an operator's SQL delete is announced too
            with psycopg.connect(libpq_conninfo(url), autocommit=True) as conn:
                conn.execute("DELETE FROM jobs WHERE id = %s", (other,))
            await until(lambda: cache.get(other, tenant) is None, timeout=2.0)

            # the listening connection is killed: nothing is served until it listens again, then all is new
            cache.put(job, tenant, "before the break", cache.token())
            with psycopg.connect(libpq_conninfo(url), autocommit=True) as conn:
                killed = conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND query = 'LISTEN netsurgery_jobs'"
                ).fetchall()
            assert killed == [(True,)]
            await until(lambda: not cache.live, timeout=2.0)
            assert cache.get(job, tenant) is None
            await until(lambda: cache.live, timeout=5.0)
            assert cache.get(job, tenant) is None  # emptied on the way back
            cache.put(job, tenant, "after", cache.token())
            assert cache.get(job, tenant) == "after"
        finally:
            listener.cancel()
            with pytest.raises(asyncio.CancelledError):
                await listener

    asyncio.run(scenario())


def test_the_trigger_goes_with_a_downgrade(migrated: tuple[str, sessionmaker[Session]]) -> None:
    from service.migrate import downgrade

    url, _ = migrated
    with psycopg.connect(libpq_conninfo(url), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM pg_trigger WHERE tgname = 'jobs_notify_change'").fetchone() == (1,)
        downgrade(url, "0001")
        assert conn.execute("SELECT count(*) FROM pg_trigger WHERE tgname = 'jobs_notify_change'").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM pg_proc WHERE proname = 'netsurgery_job_changed'").fetchone() == (0,)


# -- over HTTP ------------------------------------------------------------------------------------


def test_get_job_sees_other_processes_writes_at_once(live: LiveServer) -> None:
    """Repeated reads are served from memory, yet a write by anyone shows in the next answers."""
    tenant, key = live.new_tenant()
    job = new_job(live.factory, tenant)
    cache: JobCache = live.app.state.job_cache
    with live.client(key) as c:
        deadline = time.monotonic() + 5
        while not cache.live:  # the server's listener connects in the background at start
            assert time.monotonic() < deadline
            time.sleep(0.01)
        first = c.get(f"/v1/jobs/{job}").json()
        hits = cache.hits
        assert all(c.get(f"/v1/jobs/{job}").json() == first for _ in range(20))
        assert cache.hits >= hits + 20  # from memory

        for step in range(1, 4):  # as a worker writes progress, from its own connection
            with session_scope(live.factory) as s:
                s.execute(update(Job).where(Job.id == job).values(iteration=100 * step, loss=1.0 / step))
            start = time.monotonic()
            while (answer := c.get(f"/v1/jobs/{job}").json())["iteration"] != 100 * step:
                assert time.monotonic() - start < 1.0, answer
                time.sleep(0.002)
            assert answer["loss"] == pytest.approx(1.0 / step)

        # this process's own write (cancel) shows in the very next answer
        assert c.post(f"/v1/jobs/{job}/cancel").status_code == 202
        assert c.get(f"/v1/jobs/{job}").json()["state"] == "cancelled"

    # another tenant is never served the cached answer
    _, other_key = live.new_tenant()
    with live.client(other_key) as c:
        assert c.get(f"/v1/jobs/{job}").status_code == 404


def test_answer_is_the_same_from_every_path(live: LiveServer, tmp_path: Path, sqlite_url: str) -> None:
    """Postgres through the reader, from memory, and SQLite through the session all answer what the ORM reads."""
    tenant, key = live.new_tenant()
    job = new_job(live.factory, tenant)
    with session_scope(live.factory) as s:
        s.execute(
            update(Job)
            .where(Job.id == job)
            .values(
                iteration=5, loss=0.25, layers={"iteration": 5, "layers": [{"layer": "fc1", "kept": 3, "total": 9}]}
            )
        )
        expected = JobRead.model_validate(jobs.get_job(s, tenant, job)).model_dump(mode="json")
    with live.client(key) as c:
        assert c.get(f"/v1/jobs/{job}").json() == expected
        assert c.get(f"/v1/jobs/{job}").json() == expected

    upgrade(sqlite_url)
    settings = http_settings(tmp_path, sqlite_url, "filesystem://")
    app = create_app(settings)
    assert app.state.job_cache is None
    factory = app.state.session_factory
    sqlite_tenant = new_tenant(factory)
    with session_scope(factory) as s:
        _, sqlite_key = tenants.create_api_key(s, sqlite_tenant)
    sqlite_job = new_job(factory, sqlite_tenant)
    with session_scope(factory) as s:
        expected = JobRead.model_validate(jobs.get_job(s, sqlite_tenant, sqlite_job)).model_dump(mode="json")
    with serve(app) as url, httpx.Client(base_url=url, headers={"Authorization": f"Bearer {sqlite_key}"}) as c:
        assert c.get(f"/v1/jobs/{sqlite_job}").json() == expected


# -- shared key lookups and the reader ------------------------------------------------------------


def test_concurrent_misses_of_one_key_share_one_lookup() -> None:
    async def scenario() -> None:
        cache = AuthCache(ttl=60)
        calls = 0

        def lookup_of(answer: Principal | None) -> Callable[[], Awaitable[Principal | None]]:
            async def lookup() -> Principal | None:
                nonlocal calls
                calls += 1
                await asyncio.sleep(0.05)
                return answer

            return lookup

        who = Principal(A, "a")
        got = await asyncio.gather(*(cache.resolve("k", lookup_of(who)) for _ in range(30)))
        assert got == [who] * 30 and calls == 1
        assert await cache.resolve("k", lookup_of(None)) == who and calls == 1  # now cached
        # an unknown key is not kept: asked again next time
        assert await asyncio.gather(*(cache.resolve("x", lookup_of(None)) for _ in range(5))) == [None] * 5
        assert calls == 2
        assert await cache.resolve("x", lookup_of(None)) is None and calls == 3

    asyncio.run(scenario())


def test_reader_on_a_database_that_cannot_be_reached(tmp_path: Path) -> None:
    url = f"postgresql+psycopg://postgres@127.0.0.1:{closed_port()}/x"
    reader = Reader(url, make_session_factory(make_engine(url)), connect_timeout=1)

    async def scenario() -> None:
        await reader.start()
        try:
            start = time.monotonic()
            with pytest.raises(ServiceUnavailable):
                await reader.first(jobs.JOB_ROW, tenant_id=A, job_id=B)
            assert time.monotonic() - start < 5
        finally:
            await reader.close()

    asyncio.run(scenario())


def test_get_job_survives_postgres_killing_its_connections(tmp_path: Path, postgres_url: str) -> None:
    """The reader's connections are killed under it: the read is tried again on a new one, no error."""
    upgrade(postgres_url)
    settings = http_settings(tmp_path, postgres_url, REDIS_TEST_URL, job_cache_size=0)
    app = create_app(settings)
    factory = app.state.session_factory
    tenant = new_tenant(factory)
    with session_scope(factory) as s:
        _, key = tenants.create_api_key(s, tenant)
    job = new_job(factory, tenant)
    with serve(app) as url, httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as c:
        assert c.get(f"/v1/jobs/{job}").status_code == 200
        with psycopg.connect(libpq_conninfo(postgres_url), autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        # a broken pooled connection is replaced and the read tried again: no error reaches the client
        r = c.get(f"/v1/jobs/{job}")
        assert r.status_code == 200, r.text
        assert r.json()["id"] == str(job)
