"""The repository: keys, tenant scoping, idempotent jobs, progress and artifacts, deletes; both backends."""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError, InvalidRequestError
from sqlalchemy.orm import Session, sessionmaker

from service.database import session_scope
from service.errors import Conflict, NotFound
from service.orm import ApiKey, Artifact, Job, JobLog, LayerPoint, ProgressPoint, Tenant
from service.repositories import StoredUpload, datasets, jobs, jobstate, models, tenants
from service.repositories.jobs import LayerSample, LogLine, ProgressSample
from tests.api.factories import new_job, new_tenant


def _count(session: Session, entity: type[object], job_id: uuid.UUID) -> int:
    column = entity.job_id  # type: ignore[attr-defined]
    return session.scalar(select(func.count()).select_from(entity).where(column == job_id)) or 0


def _running(factory: sessionmaker[Session], tenant_id: uuid.UUID) -> tuple[uuid.UUID, int]:
    job_id = new_job(factory, tenant_id)
    with session_scope(factory) as session:
        attempt = jobstate.claim(session, job_id, "worker", 60)
    assert attempt is not None
    return job_id, attempt


# ----------------------------------------------------------------------------------------- keys


def test_api_key_lookup(factory: sessionmaker[Session]) -> None:
    with session_scope(factory) as session:
        tenant, key = tenants.create_tenant(session, f"acme-{uuid.uuid4().hex[:8]}")
        other, other_key = tenants.create_tenant(session, f"other-{uuid.uuid4().hex[:8]}")
    assert key.startswith("ns_") and len(key) >= 40 and key != other_key

    with factory() as session:
        found = tenants.tenant_for_key(session, key)
        assert found is not None and found.id == tenant.id
        found_other = tenants.tenant_for_key(session, other_key)
        assert found_other is not None and found_other.id == other.id
        for wrong in [key[:-1] + ("A" if key[-1] != "A" else "B"), key + "x", "ns_", "", key[3:], "x" * 10_000]:
            assert tenants.tenant_for_key(session, wrong) is None


def test_keys_are_stored_hashed(factory: sessionmaker[Session]) -> None:
    with session_scope(factory) as session:
        tenant, key = tenants.create_tenant(session, f"acme-{uuid.uuid4().hex[:8]}")
    with factory() as session:
        row = session.execute(select(ApiKey.__table__).where(ApiKey.tenant_id == tenant.id)).one()
    assert row.key_hash == hashlib.sha256(key.encode()).hexdigest()
    assert row.prefix == key[: tenants.DISPLAY_PREFIX_LENGTH]
    assert all(key not in str(value) for value in row)


def test_revoked_key_is_refused(factory: sessionmaker[Session]) -> None:
    with session_scope(factory) as session:
        tenant, key = tenants.create_tenant(session, f"acme-{uuid.uuid4().hex[:8]}")
        second, second_key = tenants.create_api_key(session, tenant.id)
        first_id = session.scalar(select(ApiKey.id).where(ApiKey.tenant_id == tenant.id, ApiKey.id != second.id))
    assert first_id is not None
    with session_scope(factory) as session:
        assert not tenants.revoke_api_key(session, uuid.uuid4(), first_id)  # another tenant cannot
        assert tenants.revoke_api_key(session, tenant.id, first_id)
        assert not tenants.revoke_api_key(session, tenant.id, first_id)  # already revoked
    with factory() as session:
        assert tenants.tenant_for_key(session, key) is None
        found = tenants.tenant_for_key(session, second_key)
        assert found is not None and found.id == tenant.id


def test_tenant_names_are_unique(factory: sessionmaker[Session]) -> None:
    name = f"acme-{uuid.uuid4().hex[:8]}"
    with session_scope(factory) as session:
        tenants.create_tenant(session, name)
    with pytest.raises(Conflict), session_scope(factory) as session:
        tenants.create_tenant(session, name)


# -------------------------------------------------------------------------------------- scoping


def test_another_tenants_rows_are_invisible(factory: sessionmaker[Session], tenant_id: uuid.UUID) -> None:
    intruder = new_tenant(factory)
    job_id, attempt = _running(factory, tenant_id)
    with session_scope(factory) as session:
        assert jobs.put_artifact(
            session, job_id, attempt, name="report.json", kind="report", uri="file:///r", size_bytes=2, sha256="b" * 64
        )
        job = jobs.get_job(session, tenant_id, job_id)
        assert job is not None
        model_id, dataset_id = job.model_id, job.dataset_id

    with factory() as session:
        assert models.rows.get(session, intruder, model_id) is None
        assert datasets.rows.get(session, intruder, dataset_id) is None
        assert jobs.get_job(session, intruder, job_id) is None
        assert jobs.get_artifact(session, intruder, job_id, "report.json") is None
        assert jobs.list_artifacts(session, intruder, job_id) == []
        assert models.rows.list(session, intruder).total == 0
        assert datasets.rows.list(session, intruder).total == 0
        assert jobs.list_jobs(session, intruder).total == 0
        # the owner sees them
        assert models.rows.get(session, tenant_id, model_id) is not None
        artifact = jobs.get_artifact(session, tenant_id, job_id, "report.json")
        assert artifact is not None and artifact.size_bytes == 2

    with session_scope(factory) as session:
        assert not models.rows.delete(session, intruder, model_id)
        assert not datasets.rows.delete(session, intruder, dataset_id)
        assert not jobs.delete_job(session, intruder, job_id)
        with pytest.raises(NotFound):  # a job cannot be built on another tenant's model
            jobs.create_job(
                session, intruder, model_id=model_id, dataset_id=dataset_id, method="dns", target={}, settings={}
            )
    with factory() as session:
        assert jobs.get_job(session, tenant_id, job_id) is not None


def test_list_jobs_filters_pages_and_counts(factory: sessionmaker[Session], tenant_id: uuid.UUID) -> None:
    job_ids = [new_job(factory, tenant_id) for _ in range(5)]
    with session_scope(factory) as session:
        for job_id in job_ids[:2]:
            assert jobstate.transition(session, job_id, "queued", "cancelled")
    with factory() as session:
        page = jobs.list_jobs(session, tenant_id, limit=2, offset=0)
        assert page.total == 5 and len(page.items) == 2
        everything = [j.id for j in jobs.list_jobs(session, tenant_id, limit=100).items]
        assert sorted(everything) == sorted(job_ids)
        created = [j.created_at for j in jobs.list_jobs(session, tenant_id, limit=100).items]
        assert created == sorted(created, reverse=True)
        second = jobs.list_jobs(session, tenant_id, limit=2, offset=2)
        assert {j.id for j in second.items}.isdisjoint(j.id for j in page.items)
        cancelled = jobs.list_jobs(session, tenant_id, state="cancelled")
        assert cancelled.total == 2 and {j.id for j in cancelled.items} == set(job_ids[:2])
        assert jobs.list_jobs(session, tenant_id, state="queued").total == 3
        with pytest.raises(ValueError):
            jobs.list_jobs(session, tenant_id, state="paused")
        with pytest.raises(ValueError):
            jobs.list_jobs(session, tenant_id, limit=0)


def test_jobs_are_found_by_method_model_data_name_and_tag(factory: sessionmaker[Session], tenant_id: uuid.UUID) -> None:
    plain = new_job(factory, tenant_id)
    named = new_job(factory, tenant_id, name="ResNet 50% sweep_1", tags=["sweep", "gpu:a100"])
    other = new_job(factory, tenant_id, name="resnet baseline", tags=["baseline"], method="agp")
    elsewhere = new_job(factory, new_tenant(factory), name="resnet", tags=["sweep"])
    with session_scope(factory) as session:
        assert jobstate.transition(session, named, "queued", "cancelled")

    def found(**where: object) -> set[uuid.UUID]:
        with factory() as session:
            page = jobs.list_jobs(session, tenant_id, where=jobs.JobFilter(**where), limit=100)  # type: ignore[arg-type]
        assert page.total == len(page.items)
        return {j.id for j in page.items}

    assert found() == {plain, named, other}
    assert found(name="RESNET") == {named, other}  # a part of the name, any case; another tenant's never
    assert found(name="50%") == {named} and found(name="5%") == set()  # LIKE's wildcards are literal
    assert found(name="p_1") == {named} and found(name="p1") == set()
    assert found(tag="sweep") == {named} and found(tag="gpu:a100") == {named} and found(tag="swee") == set()
    assert found(method="agp") == {other}
    assert found(states=["cancelled", "succeeded"]) == {named} and found(states=["queued"]) == {plain, other}
    assert found(name="resnet", states=["queued"]) == {other}
    with factory() as session:
        job = jobs.get_job(session, tenant_id, plain)
        assert job is not None and job.name is None and job.tags == []
        model_id, dataset_id = job.model_id, job.dataset_id
    assert found(model_id=model_id) == {plain} and found(dataset_id=dataset_id) == {plain}
    with pytest.raises(ValueError):
        found(states=["paused"])
    assert elsewhere not in found(tag="sweep")


def test_a_job_s_name_and_tags_change_and_nothing_else(factory: sessionmaker[Session], tenant_id: uuid.UUID) -> None:
    job_id = new_job(factory, tenant_id, name="first", tags=["a"])
    stranger = new_tenant(factory)
    with session_scope(factory) as session:
        job = jobs.update_labels(session, tenant_id, job_id, {"tags": ["b", "c"]})
        assert job is not None and job.name == "first" and job.tags == ["b", "c"]
    with session_scope(factory) as session:
        job = jobs.update_labels(session, tenant_id, job_id, {"name": None})
        assert job is not None and job.name is None and job.tags == ["b", "c"]
        assert jobs.update_labels(session, stranger, job_id, {"name": "x"}) is None
        with pytest.raises(ValueError):
            jobs.update_labels(session, tenant_id, job_id, {"state": "succeeded"})
    with factory() as session:
        stored = jobs.get_job(session, tenant_id, job_id)
        assert stored is not None and stored.name is None and stored.tags == ["b", "c"] and stored.state == "queued"


def test_a_job_s_log_is_fenced_kept_in_order_capped_and_goes_with_the_job(
    factory: sessionmaker[Session], tenant_id: uuid.UUID, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id, attempt = _running(factory, tenant_id)
    with session_scope(factory) as session:
        assert jobs.add_logs(
            session, job_id, attempt, [LogLine("INFO", "netsurgery.worker", f"line {i}") for i in range(3)]
        )
        assert not jobs.add_logs(session, job_id, attempt + 1, [LogLine("INFO", "x", "stale")])  # not the live attempt
    monkeypatch.setattr(jobs, "MAX_LOG_LINES", 5)
    monkeypatch.setattr(jobs, "MAX_LOG_LINE", 100)
    with session_scope(factory) as session:
        lines = [LogLine("INFO", "x", "y" * 500), LogLine("INFO", "x", "z"), LogLine("INFO", "x", "dropped")]
        assert jobs.add_logs(session, job_id, attempt, [*lines, LogLine("ERROR", "x", "Traceback …")])
    with session_scope(factory) as session:
        assert jobstate.transition(session, job_id, "running", "failed", attempt=attempt, error="boom")
    with session_scope(factory) as session:  # after the end: only unfenced
        assert not jobs.add_logs(session, job_id, attempt, [LogLine("ERROR", "x", "late")])
        assert jobs.add_logs(session, job_id, attempt, [LogLine("ERROR", "x", "last words")], fenced=False)
    with factory() as session:
        got = jobs.list_logs(session, job_id)
        assert [line.message[:6] for line in got] == ["line 0", "line 1", "line 2", "yyyyyy", "z", "Traceb", "last w"]
        assert len(got[3].message) < 200 and "characters left out" in got[3].message
        assert [line.id for line in got] == sorted(line.id for line in got)
        assert [line.message for line in jobs.list_logs(session, job_id, after=got[4].id, limit=1)] == ["Traceback …"]
    with session_scope(factory) as session:
        assert jobs.delete_job(session, tenant_id, job_id)
    with factory() as session:
        assert _count(session, JobLog, job_id) == 0


def test_timestamps_are_aware_utc_and_relationships_never_lazy_load(
    factory: sessionmaker[Session], job_id: uuid.UUID
) -> None:
    with factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert job.created_at.tzinfo is not None and job.created_at.utcoffset() == timedelta(0)
        assert abs(job.created_at - job.created_at.astimezone(UTC)) == timedelta(0)
        with pytest.raises(InvalidRequestError):
            _ = job.model
        with pytest.raises(InvalidRequestError):
            _ = job.artifacts


# ------------------------------------------------------------------------------------------ jobs


def test_idempotency_key_returns_the_first_job(factory: sessionmaker[Session], tenant_id: uuid.UUID) -> None:
    first = new_job(factory, tenant_id, idempotency_key="req-1")
    with factory() as session:
        model_id = session.scalar(select(Job.model_id).where(Job.id == first))
        dataset_id = session.scalar(select(Job.dataset_id).where(Job.id == first))
    assert model_id is not None and dataset_id is not None
    kwargs = {"model_id": model_id, "dataset_id": dataset_id, "method": "dns", "target": {}, "settings": {}}
    with session_scope(factory) as session:
        again, created = jobs.create_job(session, tenant_id, idempotency_key="req-1", **kwargs)  # type: ignore[arg-type]
        assert (again.id, created) == (first, False)
        other, created = jobs.create_job(session, tenant_id, idempotency_key="req-2", **kwargs)  # type: ignore[arg-type]
        assert created and other.id != first
        plain_a, _ = jobs.create_job(session, tenant_id, **kwargs)  # type: ignore[arg-type]
        plain_b, _ = jobs.create_job(session, tenant_id, **kwargs)  # type: ignore[arg-type]
        assert plain_a.id != plain_b.id  # no key: never deduplicated
    # another tenant may use the same key
    assert new_job(factory, new_tenant(factory), idempotency_key="req-1") != first
    with factory() as session:
        assert jobs.list_jobs(session, tenant_id).total == 4


# -------------------------------------------------------------------------------------- progress


def test_add_progress_ignores_duplicate_iterations(factory: sessionmaker[Session], tenant_id: uuid.UUID) -> None:
    job_id, attempt = _running(factory, tenant_id)
    with session_scope(factory) as session:
        first = [ProgressSample(i, loss=10.0 - i, compression=float(i)) for i in (1, 2, 3)]
        assert jobs.add_progress(session, job_id, attempt, first)
    with session_scope(factory) as session:
        again = [ProgressSample(i, loss=-1.0) for i in (2, 3)] + [ProgressSample(4, loss=6.0, val_accuracy=0.9)]
        assert jobs.add_progress(session, job_id, attempt, again)
    with factory() as session:
        points = jobs.list_progress(session, job_id)
        assert [(p.iteration, p.loss) for p in points] == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 6.0)]
        assert [p.iteration for p in jobs.list_progress(session, job_id, after_iteration=2)] == [3, 4]
        job = session.get(Job, job_id)
        assert job is not None
        # the summary takes the latest value of each field; compression last came at iteration 3
        assert (job.iteration, job.loss, job.val_accuracy, job.compression) == (4, 6.0, 0.9, 3.0)
    with session_scope(factory) as session:  # a resumed attempt repeats 2..3: the job's iteration stays at 4
        assert jobs.add_progress(session, job_id, attempt, [ProgressSample(2), ProgressSample(3)])
    with factory() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.iteration == 4


def test_add_layer_points(factory: sessionmaker[Session], tenant_id: uuid.UUID) -> None:
    job_id, attempt = _running(factory, tenant_id)
    samples = [LayerSample(it, name, kept, 100) for it in (10, 20) for name, kept in (("fc1", 50 - it), ("fc2", 90))]
    with session_scope(factory) as session:
        assert jobs.add_layer_points(session, job_id, attempt, samples)
        assert jobs.add_layer_points(session, job_id, attempt, [LayerSample(20, "fc1", 0, 100)])  # duplicate
        assert not jobs.add_layer_points(session, job_id, attempt + 1, [LayerSample(30, "fc1", 1, 100)])
    with factory() as session:
        rows = [(p.iteration, p.layer, p.kept) for p in jobs.list_layer_points(session, job_id)]
        assert rows == [(10, "fc1", 40), (10, "fc2", 90), (20, "fc1", 30), (20, "fc2", 90)]
        job = session.get(Job, job_id)
        assert job is not None and job.layers is not None
        assert job.layers["iteration"] == 20
    with pytest.raises(IntegrityError), session_scope(factory) as session:  # kept > total
        jobs.add_layer_points(session, job_id, attempt, [LayerSample(40, "fc1", 101, 100)])


def test_put_artifact_replaces_by_name(factory: sessionmaker[Session], tenant_id: uuid.UUID) -> None:
    job_id, attempt = _running(factory, tenant_id)
    with session_scope(factory) as session:
        assert jobs.put_artifact(
            session, job_id, attempt, name="weights", kind="sparse", uri="file:///1", size_bytes=1, sha256="1" * 64
        )
        assert jobs.put_artifact(
            session, job_id, attempt, name="weights", kind="sparse", uri="file:///2", size_bytes=2, sha256="2" * 64
        )
    with factory() as session:
        [artifact] = jobs.list_artifacts(session, tenant_id, job_id)
        assert (artifact.uri, artifact.size_bytes) == ("file:///2", 2)


# --------------------------------------------------------------------------------------- deletes


def test_deletes_refuse_what_is_in_use_and_cascade_to_children(
    factory: sessionmaker[Session], tenant_id: uuid.UUID
) -> None:
    job_id, attempt = _running(factory, tenant_id)
    with session_scope(factory) as session:
        assert jobs.add_progress(session, job_id, attempt, [ProgressSample(1, loss=1.0)])
        assert jobs.add_layer_points(session, job_id, attempt, [LayerSample(1, "fc1", 1, 2)])
        assert jobs.put_artifact(
            session, job_id, attempt, name="weights", kind="sparse", uri="file:///w", size_bytes=1, sha256="c" * 64
        )
        job = jobs.get_job(session, tenant_id, job_id)
        assert job is not None
        model_id, dataset_id = job.model_id, job.dataset_id

    with session_scope(factory) as session:
        with pytest.raises(Conflict):  # running
            jobs.delete_job(session, tenant_id, job_id)
        with pytest.raises(Conflict):  # used by the job
            models.rows.delete(session, tenant_id, model_id)
        with pytest.raises(Conflict):
            datasets.rows.delete(session, tenant_id, dataset_id)

    with session_scope(factory) as session:
        assert jobstate.transition(session, job_id, "running", "succeeded", attempt=attempt)
    with session_scope(factory) as session:
        assert jobs.delete_job(session, tenant_id, job_id)
        assert not jobs.delete_job(session, tenant_id, job_id)
    with factory() as session:
        for entity in (ProgressPoint, LayerPoint, Artifact):
            assert _count(session, entity, job_id) == 0
    with session_scope(factory) as session:
        assert models.rows.delete(session, tenant_id, model_id)
        assert datasets.rows.delete(session, tenant_id, dataset_id)
        assert models.rows.get(session, tenant_id, model_id) is None


def test_deleting_a_tenant_removes_everything_it_owns(factory: sessionmaker[Session], tenant_id: uuid.UUID) -> None:
    job_id, attempt = _running(factory, tenant_id)
    with session_scope(factory) as session:
        assert jobs.add_progress(session, job_id, attempt, [ProgressSample(1)])
    with session_scope(factory) as session:
        assert tenants.delete_tenant(session, tenant_id)
    with factory() as session:
        assert session.get(Tenant, tenant_id) is None
        assert session.get(Job, job_id) is None
        assert _count(session, ProgressPoint, job_id) == 0
        assert session.scalar(select(func.count()).where(ApiKey.tenant_id == tenant_id)) == 0


def _stored(name: str, uri: str) -> StoredUpload:
    return StoredUpload(uuid.uuid4(), name, 3, "0" * 64, uri)


def test_dataset_rows_are_checked(session: Session, tenant_id: uuid.UUID) -> None:
    with pytest.raises(ValueError):
        datasets.create_dataset(session, tenant_id, _stored("x", "u"), datasets.DatasetFacts("builtin", 1, [1], True))
    with pytest.raises(ValueError):
        models.create_model(session, tenant_id, _stored("m", "u"), models.ModelFacts("pt", 1))
    # the database refuses it too, whatever the caller skips
    stored = _stored("u", "file:///d.npz")
    dataset = datasets.create_dataset(session, tenant_id, stored, datasets.DatasetFacts("npz", 1, [1], True))
    dataset.uri = None
    with pytest.raises(IntegrityError):
        session.flush()
    session.rollback()


def test_job_durations_and_iterations_for_the_metrics(factory: sessionmaker[Session], tenant_id: uuid.UUID) -> None:
    """Run times by method and outcome as histogram buckets, in the database's own SQL (Postgres and SQLite)."""
    from service.repositories import stats

    runs = [("dns", "succeeded", 5.0), ("dns", "succeeded", 45.0), ("dns", "failed", 400.0), ("agp", "succeeded", 45.0)]
    ids = []
    for method, state, run_time in runs:
        job_id, attempt = _running(factory, tenant_id)
        with session_scope(factory) as session:
            assert jobs.add_progress(session, job_id, attempt, [ProgressSample(int(run_time))])
            assert jobstate.transition(session, job_id, "running", state, attempt=attempt)
            job = session.get(Job, job_id)
            assert job is not None and job.started_at is not None
            job.method = method
            job.finished_at = job.started_at + timedelta(seconds=run_time)
        ids.append(job_id)
    bounds = (10.0, 60.0, 300.0)
    with factory() as session:
        found = {(d.method, d.state): d for d in stats.job_durations(session, bounds)}
        finished = session.execute(select(Job.method, Job.state, Job.started_at, Job.finished_at)).all()
        iterations = stats.iterations_by_method(session)
        totals = dict(session.execute(select(Job.method, func.sum(Job.iteration)).group_by(Job.method)).all())
    expected: dict[tuple[str, str], list[float]] = {}
    for method, state, started, ended in finished:
        if state in ("succeeded", "failed", "cancelled") and started is not None and ended is not None:
            expected.setdefault((method, state), []).append((ended - started).total_seconds())
    assert set(found) == set(expected) >= {("dns", "succeeded"), ("dns", "failed"), ("agp", "succeeded")}
    for key, seconds in expected.items():
        d = found[key]
        assert d.count == len(seconds) and d.total_seconds == pytest.approx(sum(seconds), abs=1e-3)
        assert d.at_most == [sum(s <= b + 1e-6 for s in seconds) for b in bounds], key
    assert iterations == {m: int(t) for m, t in totals.items()} and iterations["dns"] >= 450
