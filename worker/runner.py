"""The job runner: a plain function that claims a job, runs the surgery and records everything.

The Celery task (:mod:`worker.tasks`) is a thin wrapper around :func:`run_job`; tests call it
directly. What one call does:

1. **Claim** the job with a lease (:func:`api.jobstate.claim`): a new attempt number, or nothing to
   do (the job finished, was cancelled, or another worker holds a live lease). A duplicate
   delivery therefore costs one database round trip. An attempt after the first removes the
   temporary files that an earlier one, killed mid-write, left in the job's folder.
2. **Heartbeat** in a background thread every ``heartbeat_seconds``; a heartbeat that finds the
   attempt superseded marks the run *lost*, and the loop stops at its next cancellation check
   without writing anything more.
3. **Run** :func:`dns_core.compress.compress` with callbacks: progress and per-layer sparsity are
   buffered and written in batches at most once per ``progress_flush_seconds`` (each batch fenced
   by the attempt number); the cancel flag is read at most once a second; checkpoints go to the
   store every ``checkpoint_every`` iterations (atomically), and a re-delivered job resumes from
   the last one.
4. **Publish** the artifacts: each file is stored completely (atomic put) before its row is
   inserted, so a listed artifact is always whole; then the job moves to ``succeeded`` in one
   guarded update.

A model or data set that cannot be used fails the job with a sentence saying why; an unexpected
error fails it with the exception's type and message (the traceback goes to the worker's log).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api import jobstate, repository
from api.database import make_engine, make_session_factory, session_scope
from api.db import Dataset, Job, Model
from api.settings import Settings
from api.storage import Storage

log = logging.getLogger("netsurgery.worker")

CHECKPOINT = "checkpoint.safetensors"


def job_prefix(job_id: uuid.UUID) -> str:
    return f"jobs/{job_id}"


def artifact_key(job_id: uuid.UUID, name: str) -> str:
    return f"{job_prefix(job_id)}/artifacts/{name}"


def checkpoint_key(job_id: uuid.UUID) -> str:
    return f"{job_prefix(job_id)}/{CHECKPOINT}"


@dataclass
class WorkerContext:
    """What a worker process holds for its whole life."""

    settings: Settings
    sessions: sessionmaker[Session]
    storage: Storage
    owner: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}")

    @classmethod
    def from_settings(cls, settings: Settings) -> WorkerContext:
        return cls(settings, make_session_factory(make_engine(settings.database_url)), Storage(settings.storage_url))


class LostLease(Exception):
    """This attempt was superseded (lease taken over, job re-queued or finished elsewhere)."""


class JobInputError(Exception):
    """The job's model, data or settings cannot be used; the message is for the user."""


class _Watch:
    """Heartbeats in a thread; answers "should the loop stop?" (cancel requested, or lease lost)."""

    def __init__(self, ctx: WorkerContext, job_id: uuid.UUID, attempt: int) -> None:
        self.ctx, self.job_id, self.attempt = ctx, job_id, attempt
        self.lost = False
        self.cancel = False
        self._stop = threading.Event()
        self._last_check = 0.0
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> _Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _beat(self) -> None:
        s = self.ctx.settings
        while not self._stop.wait(s.heartbeat_seconds):
            try:
                with session_scope(self.ctx.sessions) as session:
                    ok = jobstate.heartbeat(session, self.job_id, self.attempt, self.ctx.owner, s.lease_seconds)
                if not ok:
                    log.warning("job %s attempt %s: lease lost; stopping", self.job_id, self.attempt)
                    self.lost = True
                    return
            except Exception:  # the database may be briefly away: keep trying until the lease runs out
                log.exception("job %s: heartbeat failed; retrying", self.job_id)

    def should_stop(self) -> bool:
        """Read the cancel flag at most once a second (the loop asks every few iterations)."""
        if self.lost or self.cancel:
            return True
        now = time.monotonic()
        if now - self._last_check >= 1.0:
            self._last_check = now
            try:
                with session_scope(self.ctx.sessions) as session:
                    row = session.execute(
                        select(Job.cancel_requested, Job.state, Job.attempt).where(Job.id == self.job_id)
                    ).first()
            except Exception:
                log.exception("job %s: cancel check failed; continuing", self.job_id)
                return False
            if row is None or row.state != "running" or row.attempt != self.attempt:
                self.lost = True
            elif row.cancel_requested:
                self.cancel = True
        return self.lost or self.cancel


class _Recorder:
    """Buffers progress and per-layer points; writes them in batches fenced by the attempt."""

    def __init__(self, ctx: WorkerContext, job_id: uuid.UUID, attempt: int) -> None:
        self.ctx, self.job_id, self.attempt = ctx, job_id, attempt
        self.points: list[repository.ProgressSample] = []
        self.layers: list[repository.LayerSample] = []
        self._last_flush = time.monotonic()
        self.flushes = 0

    def __call__(self, p: Any) -> None:
        self.points.append(
            repository.ProgressSample(
                iteration=p.iteration, loss=p.loss, val_accuracy=p.val_acc, compression=p.compression
            )
        )
        self.layers.extend(repository.LayerSample(p.iteration, r.name, r.kept, r.total) for r in p.layers)
        if time.monotonic() - self._last_flush >= self.ctx.settings.progress_flush_seconds:
            self.flush()

    def flush(self) -> None:
        if not self.points and not self.layers:
            return
        points, layers = self.points, self.layers
        for attempt in range(5):  # the database may be restarting: retry, then give the batch up to the next flush
            try:
                with session_scope(self.ctx.sessions) as session:
                    ok = repository.add_progress(session, self.job_id, self.attempt, points)
                    ok = ok and repository.add_layer_points(session, self.job_id, self.attempt, layers)
                    if not ok:
                        session.rollback()
                break
            except LostLease:
                raise
            except Exception:
                if attempt == 4:
                    log.exception("job %s: progress write failed; keeping the batch", self.job_id)
                    return
                time.sleep(0.5 * 2**attempt)
        if not ok:
            raise LostLease(f"job {self.job_id} attempt {self.attempt} was superseded")
        self.points, self.layers = [], []
        self._last_flush = time.monotonic()
        self.flushes += 1


def _retrying(what: str, fn: Any, tries: int = 6) -> Any:
    """Run a short database step, retrying with back-off while the database is unreachable (a restart)."""
    from sqlalchemy.exc import DBAPIError

    for i in range(tries):
        try:
            return fn()
        except DBAPIError as e:
            if i == tries - 1:
                raise
            log.warning("%s: database unavailable (%s); retrying", what, type(e).__name__)
            time.sleep(0.5 * 2**i)
    raise AssertionError("unreachable")


def _load_inputs(ctx: WorkerContext, model_row: Model, dataset_row: Dataset, seed: int) -> tuple[Any, ...]:
    """(LoadedModel, train, valid, test, inputs for the report) from the store; JobInputError if unusable."""
    from dns_core.artifacts import file_record, load_model_file
    from dns_core.data import DataError, check_fits, load_builtin, load_data_file, validation_split
    from dns_core.uploads import UploadError

    stack = contextlib.ExitStack()
    try:
        with stack:
            model_path = stack.enter_context(ctx.storage.fetch(model_row.uri))
            loaded = load_model_file(model_path, model_row.architecture, model_row.config or {})
            inputs: dict[str, Any] = {"model": model_path}
            if dataset_row.kind == "builtin":
                assert dataset_row.builtin_name is not None
                train, valid, test = load_builtin(dataset_row.builtin_name)
            else:
                assert dataset_row.uri is not None
                data_path = stack.enter_context(ctx.storage.fetch(dataset_row.uri))
                targets_uri = f"{dataset_row.uri.rsplit('/', 1)[0]}/targets.idx"  # IDX labels, when uploaded
                targets = (
                    stack.enter_context(ctx.storage.fetch(targets_uri)) if ctx.storage.exists(targets_uri) else None
                )
                data = load_data_file(data_path, targets)
                train, valid = validation_split(data, fraction=0.1, seed=seed)
                test = None
                inputs["data"] = data_path
                if targets is not None:
                    inputs["targets"] = targets
            check_fits(loaded.module, valid)
            records = {k: file_record(v) for k, v in inputs.items()}
    except (UploadError, DataError) as e:
        raise JobInputError(str(e)) from None
    except ValueError as e:  # OnnxFormatError, a zoo config or state-dict mismatch
        raise JobInputError(str(e)) from None
    return loaded, train, valid, test, records


def _configure(job: Job, settings: Settings, seed: int) -> tuple[Any, Any, Any, int]:
    """(Target, MethodSettings, TrainConfig, iterations) from the job's JSON; JobInputError if invalid."""
    from dns_core.methods import MethodSettings
    from dns_core.surgery import SurgeryError, Target
    from dns_core.train import TrainConfig

    opts = {k: v for k, v in (job.settings or {}).items() if v is not None}  # None: the default
    tgt = dict(job.target or {})
    iterations = int(opts.get("iterations") or job.total_iterations or settings.default_iterations)
    try:
        target = None
        if job.method != "dns-fixed-crates":
            target = Target(
                compression=tgt.get("compression"),
                layer_kept=tgt.get("layer_kept"),
                max_accuracy_drop=tgt.get("max_accuracy_drop"),
            )
        method_settings = MethodSettings(
            crate=float(opts.get("crate", 1.0)),
            crates=opts.get("crates"),
            gamma=float(opts.get("gamma", 1e-4)),
            power=float(opts.get("power", 1.0)),
            iter_stop=opts.get("iter_stop"),
        )
        config = TrainConfig(
            iterations=iterations,
            batch_size=int(opts.get("batch_size", 64)),
            lr=float(opts.get("lr", 0.01)),
            seed=seed,
            device=settings.device,
            eval_every=max(iterations // 25, 1),
            log_every=max(min(100, iterations // 50), 1),
            checkpoint_every=settings.checkpoint_every,
        )
    except (SurgeryError, ValueError, TypeError) as e:
        raise JobInputError(f"bad job settings: {e}") from None
    return target, method_settings, config, iterations


def run_job(ctx: WorkerContext, job_id: uuid.UUID) -> str:
    """Run job ``job_id`` if it can be claimed; return what happened (a state, or ``skipped``/``lost``)."""
    s = ctx.settings

    def claim() -> int | None:
        with session_scope(ctx.sessions) as session:
            return jobstate.claim(session, job_id, ctx.owner, s.lease_seconds)

    attempt = _retrying(f"claim {job_id}", claim)
    if attempt is None:
        log.info("job %s: not claimable (finished, cancelled, or held by a live lease)", job_id)
        return "skipped"
    log.info("job %s: attempt %s on %s", job_id, attempt, ctx.owner)
    with _Watch(ctx, job_id, attempt) as watch:
        try:
            return _run_claimed(ctx, job_id, attempt, watch)
        except LostLease:
            log.warning("job %s attempt %s: superseded; stopped without finishing", job_id, attempt)
            return "lost"


def _finish(ctx: WorkerContext, job_id: uuid.UUID, attempt: int, state: str, **fields: Any) -> str:
    def go() -> bool:
        with session_scope(ctx.sessions) as session:
            return jobstate.transition(session, job_id, "running", state, attempt=attempt, **fields)

    if not _retrying(f"finish {job_id}", go):
        raise LostLease(f"job {job_id} attempt {attempt} could not finish: superseded")
    log.info("job %s: %s", job_id, state)
    return state


def _run_claimed(ctx: WorkerContext, job_id: uuid.UUID, attempt: int, watch: _Watch) -> str:
    from dns_core.artifacts import write_artifacts
    from dns_core.compress import compress
    from dns_core.train import Callbacks, Cancelled, evaluate

    with session_scope(ctx.sessions) as session:
        job = session.get(Job, job_id)
        assert job is not None
        model_row = session.get(Model, job.model_id)
        dataset_row = session.get(Dataset, job.dataset_id)
        assert model_row is not None and dataset_row is not None
        session.expunge_all()
    seed = int((job.settings or {}).get("seed") or 0)
    try:
        target, method_settings, config, iterations = _configure(job, ctx.settings, seed)
        loaded, train, valid, test, input_records = _load_inputs(ctx, model_row, dataset_row, seed)
    except JobInputError as e:
        return _finish(ctx, job_id, attempt, "failed", error=str(e))

    def announce() -> bool:  # the job's total, for progress bars, once it is known
        with session_scope(ctx.sessions) as session:
            return jobstate.update_live(session, job_id, attempt, total_iterations=iterations)

    if not _retrying(f"start {job_id}", announce):
        raise LostLease(f"job {job_id} attempt {attempt} was superseded before it started")
    if attempt > 1:
        _remove_temporaries(ctx, job_id)
    recorder = _Recorder(ctx, job_id, attempt)
    with tempfile.TemporaryDirectory(prefix=f"netsurgery-{job_id}-") as tmp:
        work = Path(tmp)
        ckpt = _local_checkpoint(ctx, job_id, work)

        def on_checkpoint(iteration: int, path: Path) -> None:
            if ctx.storage.local_path(checkpoint_key(job_id)) != path:
                ctx.storage.put_file(checkpoint_key(job_id), path)
            recorder.flush()

        callbacks = Callbacks(on_progress=recorder, should_cancel=watch.should_stop, on_checkpoint=on_checkpoint)
        try:
            result = compress(
                loaded.module,
                train,
                valid,
                method=job.method,
                target=target,
                config=config,
                settings=method_settings,
                test=test,
                callbacks=callbacks,
                checkpoint=ckpt,
            )
        except Cancelled:
            if watch.lost:
                raise LostLease(f"job {job_id} attempt {attempt}") from None
            recorder.flush()
            return _finish(ctx, job_id, attempt, "cancelled")
        except (ValueError, RuntimeError) as e:
            log.exception("job %s: surgery failed", job_id)
            recorder.flush()
            return _finish(ctx, job_id, attempt, "failed", error=f"surgery failed: {type(e).__name__}: {e}")
        recorder.flush()

        def accuracies(m: Any) -> dict[str, float | None]:
            return {
                "val_acc": evaluate(m, valid) if valid.targets is not None else None,
                "test_acc": evaluate(m, test) if test is not None else None,
            }

        report = result.report | {"job_id": str(job_id), "attempt": attempt, "model_id": str(job.model_id),
                                  "dataset_id": str(job.dataset_id)}  # fmt: skip
        codec = (job.settings or {}).get("codec")
        made = write_artifacts(
            work / "out", loaded, result.model, report, inputs=input_records, codec=codec, evaluate=accuracies
        )
        for name, path in made.files.items():
            stored = ctx.storage.put_file(artifact_key(job_id, name), path)

            def record(name: str = name, stored: Any = stored) -> bool:
                with session_scope(ctx.sessions) as session:
                    return repository.put_artifact(
                        session, job_id, attempt, name=name, kind=_kind(name), uri=stored.key,
                        size_bytes=stored.size, sha256=stored.sha256,
                    )  # fmt: skip

            if not _retrying(f"artifact {name}", record):
                raise LostLease(f"job {job_id} attempt {attempt}: superseded while publishing")
    rep = made.report
    # the final model's layers: after a fall-back to the last state within the budget they differ
    # from the last progress report's
    layers = {"iteration": iterations, "layers": [{"layer": r["name"], "kept": r["kept"], "total": r["total"]}
                                                  for r in rep["layers"]]}  # fmt: skip
    return _finish(
        ctx, job_id, attempt, "succeeded", iteration=iterations, compression=rep["compression"],
        val_accuracy=rep.get("val_acc"), layers=layers,
    )  # fmt: skip


def _kind(name: str) -> str:
    if name.startswith("report.") or name.endswith(".png"):
        return "report"
    if ".sparse." in name:
        return "sparse"
    return "dense"


def _remove_temporaries(ctx: WorkerContext, job_id: uuid.UUID) -> None:
    """Delete what an earlier attempt killed mid-write left in the job's folder.

    This attempt holds the lease. An earlier attempt still alive (its lease expired under it) stops
    at its next heartbeat; if it is writing at this moment, losing its temporary only makes that
    write fail, and a superseded attempt's writes are not wanted anyway.
    """
    from dns_core.checkpoint import remove_stale_temporaries

    removed = 0
    try:
        removed += len(ctx.storage.remove_temporaries(job_prefix(job_id)))
        local = ctx.storage.local_path(checkpoint_key(job_id))
        if local is not None:
            removed += len(remove_stale_temporaries(local))
    except OSError as e:  # clutter, not a reason to fail the job: the next attempt or a delete clears it
        log.warning("job %s: could not remove temporary files: %s", job_id, e)
    if removed:
        log.info("job %s: removed %d temporary files left by an earlier attempt", job_id, removed)


def _local_checkpoint(ctx: WorkerContext, job_id: uuid.UUID, work: Path) -> Path:
    """Where fit() writes checkpoints: the store itself when local, else a work file seeded from the store."""
    key = checkpoint_key(job_id)
    local = ctx.storage.local_path(key)
    if local is not None:
        local.parent.mkdir(parents=True, exist_ok=True)
        return local
    path = work / CHECKPOINT
    if ctx.storage.exists(key):
        with ctx.storage.open(key) as src, open(path, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    return path
