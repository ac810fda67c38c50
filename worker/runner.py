"""The job runner: a plain function that claims a job, runs the surgery and records everything.

The Celery task (:mod:`worker.tasks`) is a thin wrapper around :func:`run_job`; tests call it
directly. What one call does:

1. **Claim** the job with a lease (:func:`service.repositories.jobstate.claim`): a new attempt number, or nothing to
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

The job's spec maps to the engine's settings through :class:`dns_core.spec.CompressSpec`. A model,
data set or setting that cannot be used (the engine's :class:`~dns_core.errors.InputError`) fails
the job with a sentence saying why; any other exception is a bug: the job fails as an internal
error with the exception's type and message, and the traceback goes to the worker's log. Failures
of the store or the database (:data:`RETRIED`) do not finish the job: its next attempt resumes it.
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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dns_core.errors import InputError
from dns_core.spec import CompressSpec
from service.database import make_engine, make_session_factory, session_scope
from service.keys import CHECKPOINT, artifact_key, checkpoint_key, dataset_targets_key, job_prefix
from service.orm import Dataset, Job, Model
from service.repositories import jobs, jobstate
from service.settings import Settings
from service.storage import Storage

log = logging.getLogger("netsurgery.worker")
# the job log (GET /v1/jobs/{id}/logs) keeps this logger's INFO lines whatever the process's level is
if log.level == logging.NOTSET:
    log.setLevel(logging.INFO)


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


#: Failures of the runner's own side (its lease, the store, the database), raised through the engine
#: by its callbacks: not the job's fault, so they end the attempt without finishing the job, and the
#: job goes to a next attempt (or the one that took it over).
RETRIED = (LostLease, OSError, SQLAlchemyError)


class _JobLog(logging.Handler):
    """Keeps the log records of one job's threads (the runner's and its heartbeat's) for its log.

    Attached to the root logger while the attempt runs, so it sees what the runner, the engine and
    the libraries log from those threads (at the levels their loggers let through), each record
    formatted with its traceback. :meth:`take` hands the lines over to be written.
    """

    def __init__(self, job_id: uuid.UUID) -> None:
        super().__init__(logging.INFO)
        self.threads = {threading.get_ident()}
        self.heartbeat = f"heartbeat-{job_id}"
        self.lines: list[jobs.LogLine] = []
        self._lines_lock = threading.Lock()
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread not in self.threads and record.threadName != self.heartbeat:
            return
        try:
            message = self.format(record)
        except Exception:  # a record whose arguments do not format: keep what it says
            message = f"{record.msg!r} % {record.args!r}"
        line = jobs.LogLine(record.levelname, record.name, message, datetime.fromtimestamp(record.created, UTC))
        with self._lines_lock:
            self.lines.append(line)

    def take(self) -> list[jobs.LogLine]:
        with self._lines_lock:
            lines, self.lines = self.lines, []
        return lines

    def give_back(self, lines: list[jobs.LogLine]) -> None:
        """Lines whose write failed go back in front, to be written with the next batch."""
        with self._lines_lock:
            self.lines[:0] = lines


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
                    # a beat between this attempt's own end and the watch's stop: nothing was lost
                    ended = not ok and jobstate.ended_by(session, self.job_id, self.attempt)
                if ended:
                    return
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
                    status = jobstate.attempt_status(session, self.job_id, self.attempt)
            except Exception:
                log.exception("job %s: cancel check failed; continuing", self.job_id)
                return False
            self.lost = status == "lost"
            self.cancel = status == "cancel"
        return self.lost or self.cancel


class _Recorder:
    """Buffers progress and per-layer points; writes them in batches fenced by the attempt."""

    def __init__(self, ctx: WorkerContext, job_id: uuid.UUID, attempt: int, joblog: _JobLog | None = None) -> None:
        self.ctx, self.job_id, self.attempt = ctx, job_id, attempt
        self.joblog = joblog
        self.points: list[jobs.ProgressSample] = []
        self.layers: list[jobs.LayerSample] = []
        self.frontier: dict[str, Any] | None = None  # a budget search's points, when new ones came
        self._last_flush = time.monotonic()
        self.flushes = 0

    def __call__(self, p: Any) -> None:
        self.points.append(
            jobs.ProgressSample(iteration=p.iteration, loss=p.loss, val_accuracy=p.val_acc, compression=p.compression)
        )
        self.layers.extend(jobs.LayerSample(p.iteration, r.name, r.kept, r.total) for r in p.layers)
        if p.val_acc is not None:
            log.info(
                "iteration %d of %d: validation accuracy %.2f%%, compression %s, loss %.4f, learning rate %.3g",
                p.iteration, p.total, p.val_acc, f"{p.compression:.2f}x" if p.compression else "-", p.loss, p.lr,
            )  # fmt: skip
        if p.frontier is not None:
            if p.frontier and (self.frontier is None or len(p.frontier) != len(self.frontier["points"])):
                last = p.frontier[-1]
                verdict = "within budget" if last.get("within_budget") else "over budget"
                log.info(
                    "search: %.2fx judged at %.2f%% validation accuracy, %s",
                    last["compression"],
                    last["val_acc"],
                    verdict,
                )
            self.frontier = {"points": p.frontier}
        if time.monotonic() - self._last_flush >= self.ctx.settings.progress_flush_seconds:
            self.flush()

    def flush(self) -> None:
        lines = self.joblog.take() if self.joblog is not None else []
        if not self.points and not self.layers and self.frontier is None and not lines:
            return
        points, layers, frontier = self.points, self.layers, self.frontier
        for attempt in range(5):  # the database may be restarting: retry, then give the batch up to the next flush
            try:
                with session_scope(self.ctx.sessions) as session:
                    ok = jobs.add_progress(session, self.job_id, self.attempt, points)
                    ok = ok and jobs.add_layer_points(session, self.job_id, self.attempt, layers)
                    if ok and frontier is not None:
                        ok = jobstate.update_live(session, self.job_id, self.attempt, frontier=frontier)
                    ok = ok and jobs.add_logs(session, self.job_id, self.attempt, lines)
                    if not ok:
                        session.rollback()
                break
            except LostLease:
                raise
            except Exception:
                if attempt == 4:
                    if self.joblog is not None:
                        self.joblog.give_back(lines)
                    log.exception("job %s: progress write failed; keeping the batch", self.job_id)
                    return
                time.sleep(0.5 * 2**attempt)
        if not ok:
            raise LostLease(f"job {self.job_id} attempt {self.attempt} was superseded")
        self.points, self.layers = [], []
        if self.frontier is frontier:
            self.frontier = None
        self._last_flush = time.monotonic()
        self.flushes += 1


def _retrying(what: str, fn: Any, tries: int = 6) -> Any:
    """Run a short database step, retrying with back-off while the database is unreachable (a restart)."""
    for i in range(tries):
        try:
            return fn()
        except DBAPIError as e:
            if i == tries - 1:
                raise
            log.warning("%s: database unavailable (%s); retrying", what, type(e).__name__)
            time.sleep(0.5 * 2**i)
    raise AssertionError("unreachable")


def _load_inputs(ctx: WorkerContext, model_row: Model, dataset_row: Dataset, spec: CompressSpec) -> tuple[Any, ...]:
    """(LoadedModel, train, valid, test, inputs for the report) from the store; InputError if unusable.

    A built-in data set is adapted to what the model takes (size, channels, tokens); the job's
    ``preprocess`` setting, if any, is applied to uploaded image data.
    """
    from dns_core.artifacts import file_record, load_model_file
    from dns_core.data import adapt_builtin, check_fits, load_data_file, validation_split

    seed = spec.seed
    with contextlib.ExitStack() as stack:
        model_path = stack.enter_context(ctx.storage.fetch(model_row.uri))
        architecture = model_row.architecture if model_row.format == "safetensors" else None
        loaded = load_model_file(
            model_path,
            architecture,
            model_row.config or {},
            max_bytes=ctx.settings.max_upload_bytes,
            max_memory_bytes=ctx.settings.max_model_memory_bytes,
        )
        inputs: dict[str, Any] = {"model": model_path}
        if dataset_row.kind == "builtin":
            assert dataset_row.builtin_name is not None
            train, valid, test = adapt_builtin(dataset_row.builtin_name, loaded.model_input)
        else:
            assert dataset_row.uri is not None
            data_path = stack.enter_context(ctx.storage.fetch(dataset_row.uri))
            targets_uri = dataset_targets_key(dataset_row.id)  # IDX labels, when uploaded
            targets = stack.enter_context(ctx.storage.fetch(targets_uri)) if ctx.storage.exists(targets_uri) else None
            data = load_data_file(data_path, targets)
            train, valid = validation_split(data, fraction=0.1, seed=seed)
            test = None
            inputs["data"] = data_path
            if targets is not None:
                inputs["targets"] = targets
            if spec.preprocess is not None:  # a built-in set is already made to fit the model
                from dns_core.images import Preprocess

                prep = Preprocess.from_json(spec.preprocess).resolve(loaded.model_input)
                train, valid = prep.apply(train), prep.apply(valid)
        check_fits(loaded.module, train, loaded.model_input)
        check_fits(loaded.module, valid, loaded.model_input)
        records = {k: file_record(v) for k, v in inputs.items()}
    return loaded, train, valid, test, records


def _configure(job: Job, settings: Settings) -> CompressSpec:
    """The job's spec, checked against the engine; an InputError says what is wrong with it."""
    spec = CompressSpec.from_json(
        {"method": job.method, "target": job.target, "settings": job.settings},
        iterations=job.total_iterations or settings.default_iterations,
        device=settings.device,
        checkpoint_every=settings.checkpoint_every,
    )
    spec.build()  # the settings work together: checked before the inputs load
    return spec


def _failed(ctx: WorkerContext, job_id: uuid.UUID, attempt: int, e: Exception, what: str) -> str:
    """Fail the job for ``e``: an InputError is the input's fault and its message says why; any other
    exception is a bug, logged with its traceback and reported as an internal error."""
    if isinstance(e, InputError):
        return _finish(ctx, job_id, attempt, "failed", error=f"{what}{e}")
    log.error("job %s: internal error", job_id, exc_info=e)
    return _finish(ctx, job_id, attempt, "failed", error=f"internal error: {type(e).__name__}: {e}")


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
    joblog = _JobLog(job_id)
    logging.getLogger().addHandler(joblog)
    try:
        log.info("job %s: attempt %s on %s", job_id, attempt, ctx.owner)
        with _Watch(ctx, job_id, attempt) as watch:
            try:
                return _run_claimed(ctx, job_id, attempt, watch, joblog)
            except LostLease:
                log.warning("job %s attempt %s: superseded; stopped without finishing", job_id, attempt)
                return "lost"
    finally:
        logging.getLogger().removeHandler(joblog)
        _write_last_lines(ctx, job_id, attempt, joblog.take())


def _write_last_lines(ctx: WorkerContext, job_id: uuid.UUID, attempt: int, lines: list[jobs.LogLine]) -> None:
    """Write an attempt's last log lines (its outcome, a failure's traceback) after it has ended.

    Not fenced: the job may already be finished, which is when these lines matter most. Best effort:
    a database that stays away loses them (the worker's own log still has them).
    """
    if not lines:
        return

    def write() -> bool:
        with session_scope(ctx.sessions) as session:
            return jobs.add_logs(session, job_id, attempt, lines, fenced=False)

    try:
        _retrying(f"log {job_id}", write, tries=4)
    except Exception:
        log.exception("job %s: could not keep its last %d log lines", job_id, len(lines))


def _finish(ctx: WorkerContext, job_id: uuid.UUID, attempt: int, state: str, **fields: Any) -> str:
    def go() -> bool:
        with session_scope(ctx.sessions) as session:
            return jobstate.transition(session, job_id, "running", state, attempt=attempt, **fields)

    if not _retrying(f"finish {job_id}", go):
        raise LostLease(f"job {job_id} attempt {attempt} could not finish: superseded")
    if fields.get("error"):
        log.error("job %s: %s: %s", job_id, state, fields["error"])
    else:
        log.info("job %s: %s", job_id, state)
    try:  # a job that ended resumes nothing: its checkpoint (weights, masks, optimizer) goes
        ctx.storage.delete(checkpoint_key(job_id))
    except OSError as e:  # clutter, not a reason to change the outcome; deleting the job removes it too
        log.warning("job %s: could not delete its checkpoint: %s", job_id, e)
    return state


def _run_claimed(ctx: WorkerContext, job_id: uuid.UUID, attempt: int, watch: _Watch, joblog: _JobLog) -> str:
    from dns_core.artifacts import job_result, write_artifacts
    from dns_core.train import Callbacks, Cancelled, evaluate

    with session_scope(ctx.sessions) as session:
        found = jobs.get_job_inputs(session, job_id)
        assert found is not None, "a claimed job is running: it cannot be deleted"
        job, model_row, dataset_row = found
        session.expunge_all()
    try:
        spec = _configure(job, ctx.settings)
    except Exception as e:
        return _failed(ctx, job_id, attempt, e, "bad job settings: ")
    try:
        loaded, train, valid, test, input_records = _load_inputs(ctx, model_row, dataset_row, spec)
    except RETRIED:
        raise
    except Exception as e:
        return _failed(ctx, job_id, attempt, e, "")
    iterations = spec.iterations
    _describe(job, model_row, dataset_row, loaded, train, valid, test, iterations)

    def announce() -> bool:  # the job's total, for progress bars, once it is known
        with session_scope(ctx.sessions) as session:
            return jobstate.update_live(session, job_id, attempt, total_iterations=iterations)

    if not _retrying(f"start {job_id}", announce):
        raise LostLease(f"job {job_id} attempt {attempt} was superseded before it started")
    if attempt > 1:
        _remove_temporaries(ctx, job_id)
    recorder = _Recorder(ctx, job_id, attempt, joblog)
    with tempfile.TemporaryDirectory(prefix=f"netsurgery-{job_id}-") as tmp:
        work = Path(tmp)
        ckpt = _local_checkpoint(ctx, job_id, work)

        def on_checkpoint(iteration: int, path: Path) -> None:
            if ctx.storage.local_path(checkpoint_key(job_id)) != path:
                ctx.storage.put_file(checkpoint_key(job_id), path)
            recorder.flush()

        callbacks = Callbacks(on_progress=recorder, should_cancel=watch.should_stop, on_checkpoint=on_checkpoint)
        try:
            result = spec.compress(loaded.module, train, valid, test=test, callbacks=callbacks, checkpoint=ckpt)
        except Cancelled:
            if watch.lost:
                raise LostLease(f"job {job_id} attempt {attempt}") from None
            recorder.flush()
            return _finish(ctx, job_id, attempt, "cancelled")
        except RETRIED:
            raise
        except Exception as e:
            recorder.flush()
            return _failed(ctx, job_id, attempt, e, "surgery failed: ")
        recorder.flush()

        def accuracies(m: Any) -> dict[str, float | None]:
            return {
                "val_acc": evaluate(m, valid) if valid.targets is not None else None,
                "test_acc": evaluate(m, test) if test is not None else None,
            }

        report = result.report | {"job_id": str(job_id), "attempt": attempt, "model_id": str(job.model_id),
                                  "dataset_id": str(job.dataset_id)}  # fmt: skip
        try:
            made = write_artifacts(
                work / "out",
                loaded,
                result.model,
                report,
                inputs=input_records,
                codec=spec.codec,
                evaluate=accuracies,
                candidates=result.candidates,
            )
        except RETRIED:
            raise
        except Exception as e:  # e.g. the exported ONNX graph and the pruned model disagree
            return _failed(ctx, job_id, attempt, e, "publishing failed: ")
        for name, path in made.files.items():
            stored = ctx.storage.put_file(artifact_key(job_id, name), path)

            def record(name: str = name, stored: Any = stored) -> bool:
                with session_scope(ctx.sessions) as session:
                    return jobs.put_artifact(
                        session, job_id, attempt, name=name, kind=_kind(name), uri=stored.key,
                        size_bytes=stored.size, sha256=stored.sha256,
                    )  # fmt: skip

            if not _retrying(f"artifact {name}", record):
                raise LostLease(f"job {job_id} attempt {attempt}: superseded while publishing")
            log.info("artifact %s: %s bytes", name, f"{stored.size:,}")
    rep = made.report
    # the final model's layers: after a fall-back to the last state within the budget they differ
    # from the last progress report's
    ran = int(rep.get("iterations") or iterations)  # a budget search may end before the last iteration
    layers = {"iteration": ran, "layers": [{"layer": r["name"], "kept": r["kept"], "total": r["total"]}
                                           for r in rep["layers"]]}  # fmt: skip
    return _finish(
        ctx, job_id, attempt, "succeeded", iteration=ran, compression=rep["compression"],
        val_accuracy=rep.get("val_acc"), layers=layers, frontier=rep.get("frontier"), result=job_result(rep),
    )  # fmt: skip


def _describe(job: Job, model_row: Model, dataset_row: Dataset, loaded: Any, train: Any, valid: Any, test: Any,
              iterations: int) -> None:  # fmt: skip
    """The job log's opening lines: what runs, on what."""
    target = ", ".join(f"{k} {v}" for k, v in sorted(job.target.items())) or "none"
    log.info("method %s, target: %s, %d iterations", job.method, target, iterations)
    if job.settings:
        log.info("settings: %s", ", ".join(f"{k}={v}" for k, v in sorted(job.settings.items())))
    arch = f", {loaded.arch}" if loaded.arch else ""
    params = sum(p.numel() for p in loaded.module.parameters())
    log.info("model %r (%s%s): %s parameters", model_row.name, model_row.format, arch, f"{params:,}")
    sizes = f"{len(train):,} training, {len(valid):,} validation" + (
        f", {len(test):,} test" if test is not None else ""
    )
    log.info("data set %r (%s): %s examples", dataset_row.name, dataset_row.kind, sizes)


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
