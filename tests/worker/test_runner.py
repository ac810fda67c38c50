"""The job runner, called directly (no broker): claims, progress, artifacts, cancel, failure, resume."""

from __future__ import annotations

import hashlib
import json
import pickle
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from dns_core import models
from dns_core.io import save_model
from dns_core.sparse import load_sparse
from service import keys
from service.database import session_scope
from service.orm import Artifact, Job, LayerPoint, ProgressPoint, utcnow
from service.repositories import StoredUpload, datasets, jobs, jobstate
from service.repositories import models as model_rows
from service.repositories.models import ModelFacts
from service.settings import Settings
from service.storage import Storage
from tests.api.factories import new_tenant
from worker.runner import WorkerContext, run_job


@pytest.fixture
def ctx(factory: sessionmaker[Session], tmp_path: Path) -> WorkerContext:
    settings = Settings(
        data_dir=tmp_path, storage_url=str(tmp_path / "store"), heartbeat_seconds=0.5, lease_seconds=5,
        checkpoint_every=100, progress_flush_seconds=0.2, device="cpu",
    )  # fmt: skip
    return WorkerContext(settings, factory, Storage(settings.storage_url))


def _upload_zoo_model(ctx: WorkerContext, tenant: uuid.UUID, path: Path) -> uuid.UUID:
    model_id = uuid.uuid4()
    stored = ctx.storage.put_file(keys.model_key(model_id, "safetensors"), path)
    with session_scope(ctx.sessions) as s:
        model_rows.create_model(
            s, tenant, StoredUpload(model_id, "lenet", stored.size, stored.sha256, stored.key),
            ModelFacts("safetensors", 266_610, "lenet-300-100", {}),
        )  # fmt: skip
    return model_id


@pytest.fixture
def zoo_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "upload.safetensors"
    save_model(path, models.build("lenet-300-100"), "lenet-300-100")
    return path


def _job(ctx: WorkerContext, tenant: uuid.UUID, model_id: uuid.UUID, **settings: Any) -> uuid.UUID:
    with session_scope(ctx.sessions) as s:
        data = datasets.create_builtin_dataset(s, tenant, "digits", "digits")
        job, _ = jobs.create_job(
            s, tenant, model_id=model_id, dataset_id=data.id, method="dns",
            target={"compression": 5.0, "max_accuracy_drop": 100.0},
            settings={"iterations": 300, "seed": 0} | settings, total_iterations=settings.get("iterations", 300),
        )  # fmt: skip
        return job.id


def _row(ctx: WorkerContext, job_id: uuid.UUID) -> Job:
    with session_scope(ctx.sessions) as s:
        job = s.get(Job, job_id)
        assert job is not None
        s.expunge(job)
        return job


def test_a_job_runs_to_succeeded_with_progress_layers_and_artifacts(ctx: WorkerContext, zoo_file: Path) -> None:
    tenant = new_tenant(ctx.sessions)
    job_id = _job(ctx, tenant, _upload_zoo_model(ctx, tenant, zoo_file), codec="int8")
    assert run_job(ctx, job_id) == "succeeded"
    job = _row(ctx, job_id)
    assert job.state == "succeeded" and job.attempt == 1 and job.error is None
    assert job.iteration == 300 and job.compression is not None and 4.75 <= job.compression <= 5.25
    with session_scope(ctx.sessions) as s:
        iters = list(s.scalars(select(ProgressPoint.iteration).where(ProgressPoint.job_id == job_id)))
        layers = set(s.scalars(select(LayerPoint.layer).where(LayerPoint.job_id == job_id)))
        arts = {
            a.name: (a.uri, a.size_bytes, a.sha256)
            for a in s.scalars(select(Artifact).where(Artifact.job_id == job_id))
        }
    assert iters == sorted(iters) and iters[-1] == 300 and len(iters) >= 5
    assert layers == {"fc1", "fc2", "fc3"}
    names = {
        "model.safetensors",
        "model.sparse.safetensors",
        "model.sparse.int8.safetensors",
        "report.json",
        "report.html",
        "compression.png",
        "accuracy.png",
        "layers.png",
        # a compression with a budget climbs 2x, 4x, 5x: the lower two are the next candidates
        "candidate-2.sparse.safetensors",
        "candidate-3.sparse.safetensors",
    }
    assert set(arts) == names
    for uri, size, sha in arts.values():
        with ctx.storage.open(uri) as f:
            data = f.read()
        assert len(data) == size and hashlib.sha256(data).hexdigest() == sha
    with ctx.storage.open(arts["report.json"][0]) as f:
        report = json.load(f)
    assert report["inputs"]["model"]["sha256"] == hashlib.sha256(zoo_file.read_bytes()).hexdigest()
    assert report["outputs"]["model.safetensors"]["sha256"] == arts["model.safetensors"][2]
    assert report["value_codec"]["codec"] == "int8" and report["attempt"] == 1
    # the job's summary describes the final model (the report's layers), and knows its total
    assert job.total_iterations == 300 and job.layers is not None
    assert [(x["layer"], x["kept"]) for x in job.layers["layers"]] == [(r["name"], r["kept"]) for r in report["layers"]]
    assert run_job(ctx, job_id) == "skipped"  # a duplicate delivery of a finished job does nothing
    # the job's log: what ran on what, each evaluation, each file, the outcome last; one attempt, in order
    log = _log(ctx, job_id)
    assert [line.id for line in log] == sorted(line.id for line in log) and {line.attempt for line in log} == {1}
    text = [line.message for line in log]
    assert any("method dns, target: compression 5.0, max_accuracy_drop 100.0, 300 iterations" in t for t in text)
    assert any(t.startswith("model 'lenet' (safetensors, lenet-300-100): 266,610 parameters") for t in text)
    assert any(t.startswith("data set 'digits' (builtin): ") and "validation" in t for t in text)
    assert any(t.startswith("iteration 300 of 300: validation accuracy ") for t in text)
    assert any(t.startswith("artifact model.sparse.safetensors: ") for t in text)
    assert text[-1] == f"job {job_id}: succeeded" and all(line.level == "INFO" for line in log)


def _log(ctx: WorkerContext, job_id: uuid.UUID) -> list[Any]:
    with session_scope(ctx.sessions) as s:
        lines = jobs.list_logs(s, job_id)
        s.expunge_all()
    return lines


def test_a_model_that_cannot_be_used_fails_with_a_sentence(ctx: WorkerContext, tmp_path: Path) -> None:
    tenant = new_tenant(ctx.sessions)
    evil = tmp_path / "evil.safetensors"
    sentinel = tmp_path / "SENTINEL"
    evil.write_bytes(pickle.dumps(_Payload(sentinel)))
    job_id = _job(ctx, tenant, _upload_zoo_model(ctx, tenant, evil))
    assert run_job(ctx, job_id) == "failed"
    job = _row(ctx, job_id)
    assert job.state == "failed" and job.error is not None and "pickle" in job.error and "Traceback" not in job.error
    assert not sentinel.exists()


class _Payload:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, ...]:
        import os

        return (os.mkdir, (str(self.target),))


@pytest.fixture
def background() -> Iterator[list[threading.Thread]]:
    threads: list[threading.Thread] = []
    yield threads
    for t in threads:
        t.join(timeout=60)


def _start(ctx: WorkerContext, job_id: uuid.UUID, threads: list[threading.Thread], out: dict[str, str]) -> None:
    t = threading.Thread(target=lambda: out.update(result=run_job(ctx, job_id)))
    t.start()
    threads.append(t)


def _wait_for(predicate: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_cancel_stops_a_running_job_quickly(
    ctx: WorkerContext, zoo_file: Path, background: list[threading.Thread]
) -> None:
    tenant = new_tenant(ctx.sessions)
    job_id = _job(ctx, tenant, _upload_zoo_model(ctx, tenant, zoo_file), iterations=200_000)
    out: dict[str, str] = {}
    _start(ctx, job_id, background, out)
    ckpt = ctx.storage.local_path(keys.checkpoint_key(job_id))
    assert ckpt is not None
    _wait_for(lambda: _row(ctx, job_id).iteration > 0 and ckpt.exists())
    with session_scope(ctx.sessions) as s:
        assert jobstate.request_cancel(s, job_id) == "running"
    asked = time.monotonic()
    _wait_for(lambda: _row(ctx, job_id).state == "cancelled", timeout=5)
    assert time.monotonic() - asked < 5
    background[0].join(timeout=10)
    assert out["result"] == "cancelled"
    assert not ckpt.exists()  # a cancelled job resumes nothing: its checkpoint is gone


def test_a_superseded_attempt_stops_and_the_next_resumes_from_the_checkpoint(
    ctx: WorkerContext, zoo_file: Path, background: list[threading.Thread]
) -> None:
    tenant = new_tenant(ctx.sessions)
    model_id = _upload_zoo_model(ctx, tenant, zoo_file)
    straight = _job(ctx, tenant, model_id, iterations=400)
    assert run_job(ctx, straight) == "succeeded"

    job_id = _job(ctx, tenant, model_id, iterations=400)
    out: dict[str, str] = {}
    _start(ctx, job_id, background, out)
    ckpt = ctx.storage.local_path(keys.checkpoint_key(job_id))
    assert ckpt is not None
    _wait_for(lambda: ckpt.exists() and _row(ctx, job_id).iteration >= 150)
    with session_scope(ctx.sessions) as s:  # another worker takes over: the lease expired, the attempt moves on
        s.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow()))
    with session_scope(ctx.sessions) as s:
        assert jobstate.claim(s, job_id, "other-worker", 0.01) == 2
    background[0].join(timeout=30)
    assert out["result"] == "lost"  # the first attempt stopped without finishing or writing artifacts
    with session_scope(ctx.sessions) as s:
        assert not list(s.scalars(select(Artifact).where(Artifact.job_id == job_id)))
    time.sleep(0.05)  # the takeover's lease (0.01 s) has expired: the "other worker" died too
    # what the dead attempts would leave if killed mid-write: the next one removes them
    stale = [ckpt.with_name(f".{ckpt.name}.x1y2z3w4.tmp"), ckpt.with_name(f"{ckpt.name}.tmp-{uuid.uuid4().hex}"),
             ckpt.parent / "artifacts" / f"model.safetensors.tmp-{uuid.uuid4().hex}"]  # fmt: skip
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
    before = _row(ctx, job_id).iteration
    assert run_job(ctx, job_id) == "succeeded"
    assert not [p for p in stale if p.exists()]
    job = _row(ctx, job_id)
    assert job.attempt == 3 and job.iteration == 400 and before >= 150
    with session_scope(ctx.sessions) as s:
        first = {a.name: a.uri for a in s.scalars(select(Artifact).where(Artifact.job_id == straight))}
        resumed = {a.name: a.uri for a in s.scalars(select(Artifact).where(Artifact.job_id == job_id))}
        attempts = set(s.scalars(select(ProgressPoint.attempt).where(ProgressPoint.job_id == job_id)))
    assert attempts == {1, 3}
    assert not ckpt.exists()  # the job ended: its checkpoint is gone
    # the resumed run ends with exactly the weights and masks of the uninterrupted one (compared as
    # tensors: safetensors orders header metadata differently from one write to the next)
    for name, load in (("model.safetensors", load_file), ("model.sparse.safetensors", load_sparse)):
        with ctx.storage.fetch(first[name]) as a, ctx.storage.fetch(resumed[name]) as b:
            want, got = load(str(a)), load(str(b))
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name


@pytest.mark.parametrize(
    ("where", "raised", "reported"),
    [
        # the user's mistake: the engine's InputError, reported with its sentence, no traceback logged
        ("dns_core.compress.compress", "input", "surgery failed: no layer matches 'conv*'"),
        # bugs: any other exception, even a ValueError, is an internal error with a traceback in the log
        ("dns_core.compress.compress", "bug", "internal error: TypeError: 'NoneType' object is not iterable"),
        ("dns_core.artifacts.load_model_file", "bug-value", "internal error: ValueError: too many values to unpack"),
        # the same two branches while the artifacts are written, after the surgery
        ("dns_core.artifacts.write_artifacts", "input", "publishing failed: no layer matches 'conv*'"),
        ("dns_core.artifacts.write_artifacts", "bug", "internal error: TypeError: 'NoneType' object is not iterable"),
    ],
)
def test_the_engine_s_input_errors_fail_a_job_as_bad_input_and_its_bugs_as_internal_errors(
    ctx: WorkerContext,
    zoo_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    where: str,
    raised: str,
    reported: str,
) -> None:
    from dns_core.surgery import SurgeryError

    error = {
        "input": SurgeryError("no layer matches 'conv*'"),
        "bug": TypeError("'NoneType' object is not iterable"),
        "bug-value": ValueError("too many values to unpack"),
    }[raised]

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise error

    monkeypatch.setattr(where, fail)
    tenant = new_tenant(ctx.sessions)
    job_id = _job(ctx, tenant, _upload_zoo_model(ctx, tenant, zoo_file))
    with caplog.at_level("ERROR", logger="netsurgery.worker"):
        assert run_job(ctx, job_id) == "failed"
    job = _row(ctx, job_id)
    assert job.state == "failed" and job.error == reported
    traced = [r for r in caplog.records if r.exc_info is not None and r.exc_info[1] is error]
    assert len(traced) == (0 if raised == "input" else 1)
    # the job's own log ends with the failure; a bug's traceback is there for the job's owner to read
    errors = [line for line in _log(ctx, job_id) if line.level == "ERROR"]
    assert errors and errors[-1].message == f"job {job_id}: failed: {reported}"
    tracebacks = [line.message for line in errors if "Traceback (most recent call last)" in line.message]
    if raised == "input":
        assert tracebacks == []
    else:
        assert len(tracebacks) == 1 and f"{type(error).__name__}: {error}" in tracebacks[0]


def test_a_database_failure_out_of_the_engine_ends_the_attempt_not_the_job(
    ctx: WorkerContext, zoo_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pool time-out (a SQLAlchemyError that is no DBAPIError) leaves the job to a next attempt."""
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise PoolTimeout("QueuePool limit reached")

    monkeypatch.setattr("dns_core.compress.compress", fail)
    tenant = new_tenant(ctx.sessions)
    job_id = _job(ctx, tenant, _upload_zoo_model(ctx, tenant, zoo_file))
    with pytest.raises(PoolTimeout):
        run_job(ctx, job_id)
    job = _row(ctx, job_id)
    assert job.state == "running" and job.error is None


def test_settings_that_cannot_work_fail_the_job_as_bad_settings(ctx: WorkerContext, zoo_file: Path) -> None:
    tenant = new_tenant(ctx.sessions)
    job_id = _job(ctx, tenant, _upload_zoo_model(ctx, tenant, zoo_file), lr=-1.0)
    assert run_job(ctx, job_id) == "failed"
    assert _row(ctx, job_id).error == "bad job settings: lr must be positive"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_job_runs_on_cuda(factory: sessionmaker[Session], tmp_path: Path, zoo_file: Path) -> None:
    settings = Settings(data_dir=tmp_path, storage_url=str(tmp_path / "store"), device="cuda",
                        heartbeat_seconds=0.5, lease_seconds=5)  # fmt: skip
    gpu = WorkerContext(settings, factory, Storage(settings.storage_url))
    tenant = new_tenant(factory)
    job_id = _job(gpu, tenant, _upload_zoo_model(gpu, tenant, zoo_file), iterations=300)
    assert run_job(gpu, job_id) == "succeeded"
    assert 4.75 <= (_row(gpu, job_id).compression or 0) <= 5.25


def test_a_heartbeat_after_the_attempt_finished_the_job_is_not_a_lost_lease(
    ctx: WorkerContext, caplog: pytest.LogCaptureFixture
) -> None:
    """The heartbeat thread may beat once between the attempt's own end and its stop: the job is no longer
    running, but it was this attempt that ended it, so nothing is logged as lost (the job's log ends with
    its outcome)."""
    from worker.runner import _Watch

    tenant = new_tenant(ctx.sessions)
    job_id = _job(ctx, tenant, _upload_zoo_model(ctx, tenant, _zoo(ctx)))
    with session_scope(ctx.sessions) as s:
        attempt = jobstate.claim(s, job_id, ctx.owner, 60)
        assert attempt is not None
    with session_scope(ctx.sessions) as s:
        assert jobstate.transition(s, job_id, "running", "succeeded", attempt=attempt)
    with caplog.at_level("WARNING", logger="netsurgery.worker"), _Watch(ctx, job_id, attempt) as watch:
        time.sleep(3 * ctx.settings.heartbeat_seconds)
    assert not watch.lost and "lease lost" not in caplog.text

    # a job taken over by another attempt is lost, and said so
    other = _job(ctx, tenant, _upload_zoo_model(ctx, tenant, _zoo(ctx)))
    with session_scope(ctx.sessions) as s:
        first = jobstate.claim(s, other, ctx.owner, 60)
        assert first is not None
        s.execute(update(Job).where(Job.id == other).values(attempt=first + 1))
    with caplog.at_level("WARNING", logger="netsurgery.worker"), _Watch(ctx, other, first) as watch:
        deadline = time.monotonic() + 10
        while not watch.lost and time.monotonic() < deadline:
            time.sleep(0.1)
    assert watch.lost and "lease lost" in caplog.text


def _zoo(ctx: WorkerContext) -> Path:
    path = Path(ctx.settings.data_dir) / f"zoo-{uuid.uuid4().hex[:6]}.safetensors"
    save_model(path, models.build("lenet-300-100"), "lenet-300-100")
    return path
