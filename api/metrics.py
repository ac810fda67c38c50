"""Prometheus metrics of the API, served at ``GET /metrics`` (:mod:`api.routes.metrics`).

Two kinds of figures:

- Counted by this process as it serves requests: request latency (a histogram by method, route
  template and status, recorded by the pure ASGI middleware :class:`RequestMetrics`), bytes
  uploaded (models and data sets, counted once stored) and downloaded (artifacts, counted as each
  chunk is sent), and the event streams open now. **They are per process**: with several uvicorn
  workers (or several API machines) each process keeps its own, and Prometheus scrapes each one
  and sums across ``instance`` (prometheus-client's multiprocess mode is not wired in).
- Read from the database at scrape time (:class:`DatabaseCollector`), the same from every
  process: jobs by state, the queue depth (jobs queued in the database and, when the broker is
  Redis, the length of its ``jobs`` list), iterations per second per worker, derived from the
  progress points of running jobs, and three series over the jobs that ended:
  ``netsurgery_job_duration_seconds`` (a histogram of run times by method and outcome, bucketed in
  SQL), ``netsurgery_jobs_finished_total`` (by state) and ``netsurgery_iterations_total`` (iterations
  run, by method: ``rate()`` of it is the service's training rate). Being counts of rows, these
  go down when jobs are deleted, which Prometheus reads as a counter reset. Workers export nothing
  themselves.

No counter or histogram has a ``*_created`` series (switched off process-wide).

Each app has its own :class:`Metrics` (``app.state.metrics``) on its own registry, so several
apps in one process (tests) do not share counters. ``/metrics`` needs no API key, like
``/healthz``: it shows aggregate counts, route templates and worker names, never a tenant's data;
keep it off the public network (scrape it on the internal port, or block the path at the proxy).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from time import perf_counter
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.orm import JOB_STATES, utcnow
from service.queue import QUEUE
from service.repositories import stats
from service.settings import REDIS_SCHEMES, Settings

log = logging.getLogger(__name__)

#: Latency buckets (seconds): API calls are milliseconds, uploads of large models take longer.
LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
#: Methods kept as they are in the ``method`` label; anything else is counted as ``other``.
METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: The ``route`` label of a request that matched no route (a 404), so raw paths never become labels.
UNMATCHED: Final = "<unmatched>"
#: Progress points per running job read to estimate its rate (newest first).
RATE_POINTS: Final = 200
#: Distinct write times (a worker writes a batch of points at once) the rate is measured over.
RATE_FLUSHES: Final = 20
#: A job whose newest point is older than this (and than 3 of its usual gaps) counts 0 iterations/s.
STALE_SECONDS: Final = 120.0
#: Seconds to wait for Redis when reading the broker's queue length.
BROKER_TIMEOUT_S: Final = 1.0
#: Run-time buckets of finished jobs (seconds): from a quick CPU job to a day on a GPU.
DURATION_BUCKETS: Final = (10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 3 * 3600.0, 6 * 3600.0, 12 * 3600.0,
                           24 * 3600.0)  # fmt: skip

# Counters and histograms without their *_created series: they double the series for a timestamp that a
# scrape of a restarted process tells anyway. Process-wide in prometheus-client, hence here, once.
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus-client


class Metrics:
    """One app's metrics: its registry, the process-counted metrics, and the database collector."""

    def __init__(self, settings: Settings, session_factory: sessionmaker[Session]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.request_duration = Histogram(
            "netsurgery_http_request_duration_seconds",
            "HTTP request latency by method, route template and status: until the response's last byte was "
            "handed to the server; for event streams, until the stream's headers were.",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.upload_bytes = Counter(
            "netsurgery_upload_bytes",
            "Bytes of uploads stored (kind: model or dataset), counted by this API process.",
            ["kind"],
            registry=self.registry,
        )
        self.download_bytes = Counter(
            "netsurgery_download_bytes",
            "Bytes of artifacts sent to clients (kind: the artifact's kind), counted by this API process.",
            ["kind"],
            registry=self.registry,
        )
        self.event_streams = Gauge(
            "netsurgery_event_streams",
            "Job event streams (GET /v1/jobs/{job_id}/events) this API process has open now.",
            registry=self.registry,
        )
        self.registry.register(DatabaseCollector(settings, session_factory))

    def record_upload(self, kind: str, size: int) -> None:
        self.upload_bytes.labels(kind).inc(size)

    def counted_download(self, chunks: Iterator[bytes], kind: str) -> Iterator[bytes]:
        """``chunks``, each counted in ``netsurgery_download_bytes`` once the server asked for the next one
        (that is, once it was sent): a download the client broke off counts what it received."""
        counter = self.download_bytes.labels(kind)
        try:
            for chunk in chunks:
                yield chunk
                counter.inc(len(chunk))
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()


def metrics_of(app: Any) -> Metrics | None:
    """The app's :class:`Metrics` (None for an app built without them)."""
    metrics: Metrics | None = getattr(app.state, "metrics", None)
    return metrics


def record_upload(app: Any, kind: str, size: int) -> None:
    """Count a stored upload of ``size`` bytes in the app's metrics, if it has them."""
    if (metrics := metrics_of(app)) is not None:
        metrics.record_upload(kind, size)


# ------------------------------------------------------------------------------------ middleware


def route_label(scope: Scope) -> str:
    """The route template the request matched (``/v1/jobs/{job_id}``), or :data:`UNMATCHED`."""
    template = getattr(scope.get("route"), "path_format", None)
    if not isinstance(template, str):
        return UNMATCHED
    # FastAPI keeps included routers as they are: the matched route's template lacks the prefixes it
    # was included under ("/v1"). Those are the part of the path in front of what the route matched.
    path = scope.get("path", "")
    try:
        matched = template.format_map(scope.get("path_params") or {})
    except (KeyError, IndexError, ValueError):
        return template
    if matched and isinstance(path, str) and path.endswith(matched):
        return path[: len(path) - len(matched)] + template
    return template


class RequestMetrics:
    """Pure ASGI middleware: observe each HTTP request's latency in ``netsurgery_http_request_duration_seconds``.

    It only watches the messages the application sends, so streamed bodies pass through untouched
    as they are produced. The time observed ends with the last body message (``more_body`` false);
    for ``text/event-stream`` responses, whose length is the client's choice, with the response
    start. A request that fails before answering is observed with status 500. The route label is
    read from ``scope["route"]``, which the router sets when a route matched.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = perf_counter()
        status = 500
        observed = False

        def observe() -> None:
            nonlocal observed
            if observed:
                return
            observed = True
            method = scope["method"] if scope["method"] in METHODS else "other"
            self.metrics.request_duration.labels(method, route_label(scope), str(status)).observe(
                perf_counter() - start
            )

        async def timed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                content_type = dict(message.get("headers") or ()).get(b"content-type", b"")
                await send(message)
                if content_type.split(b";")[0].strip().lower() == b"text/event-stream":
                    observe()
                return
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                observe()

        try:
            await self.app(scope, receive, timed_send)
        finally:
            observe()


# --------------------------------------------------------------------------- database collector


def iteration_rate(points: Sequence[tuple[int, datetime]], now: datetime) -> float:
    """Iterations per second of one attempt from its progress points ``(iteration, at)``.

    A worker writes its buffered points in batches that share one ``at``; the rate is the highest
    iteration of the newest batch less that of the batch :data:`RATE_FLUSHES` batches back, over
    the time between them. Fewer than two batches give 0, as does a job whose newest batch is older
    than :data:`STALE_SECONDS` and three of its usual gaps (a stalled or dying worker).
    """
    newest_by_time: dict[datetime, int] = {}
    for iteration, at in points:
        newest_by_time[at] = max(iteration, newest_by_time.get(at, iteration))
    times = sorted(newest_by_time)[-RATE_FLUSHES:]
    if len(times) < 2:
        return 0.0
    span = (times[-1] - times[0]).total_seconds()
    if span <= 0:
        return 0.0
    usual_gap = span / (len(times) - 1)
    if (now - times[-1]).total_seconds() > max(STALE_SECONDS, 3 * usual_gap):
        return 0.0
    return max(newest_by_time[times[-1]] - newest_by_time[times[0]], 0) / span


def _gauge(name: str, documentation: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, labels=list(labels))


class DatabaseCollector(Collector):
    """Figures read from Postgres (and the Redis broker) each time ``/metrics`` is scraped.

    A database (or broker) that cannot be read leaves its figures out of that scrape and sets
    ``netsurgery_metrics_source_up{source=…}`` to 0, so the scrape itself still succeeds.
    """

    def __init__(self, settings: Settings, session_factory: sessionmaker[Session]) -> None:
        self.settings = settings
        self.session_factory = session_factory

    def describe(self) -> Iterable[Metric]:
        return []  # registering must not query the database; the names are checked at scrape time

    def collect(self) -> Iterable[Metric]:
        up = _gauge("netsurgery_metrics_source_up", "1 when this scrape could read the source, else 0.", ["source"])
        try:
            yield from self._from_database()
            up.add_metric(["database"], 1)
        except Exception as e:  # the scrape goes on without the database's figures
            log.warning("metrics: cannot read the database: %s", e)
            up.add_metric(["database"], 0)
        if self.settings.broker_url.startswith(REDIS_SCHEMES):
            depth = self._broker_queue_length()
            up.add_metric(["broker"], 0 if depth is None else 1)
            if depth is not None:
                queue = _gauge("netsurgery_broker_queue_depth", f"Messages waiting on the broker's {QUEUE!r} list.")
                queue.add_metric([], depth)
                yield queue
        yield up

    def _from_database(self) -> Iterator[Metric]:
        with self.session_factory() as session:
            by_state = stats.count_jobs_by_state(session)
            running = stats.running_jobs_progress(session, points=RATE_POINTS)
        jobs = _gauge("netsurgery_jobs", "Jobs in each state, all tenants (from the database).", ["state"])
        for state in JOB_STATES:
            jobs.add_metric([state], by_state.get(state, 0))
        queued = _gauge("netsurgery_queue_depth", "Jobs queued in the database, waiting for a worker.")
        queued.add_metric([], by_state.get("queued", 0))
        now = utcnow()
        rates: dict[str, float] = {}
        counts: dict[str, int] = {}
        for job in running:
            worker = job.lease_owner or "unknown"
            rates[worker] = rates.get(worker, 0.0) + iteration_rate(job.points, now)
            counts[worker] = counts.get(worker, 0) + 1
        rate = _gauge(
            "netsurgery_worker_iterations_per_second",
            "Training iterations per second of the jobs each worker (lease owner) is running, from their "
            "recent progress points.",
            ["worker"],
        )
        running_jobs = _gauge(
            "netsurgery_worker_running_jobs", "Jobs each worker (lease owner) is running.", ["worker"]
        )
        for worker in sorted(counts):
            rate.add_metric([worker], rates[worker] if math.isfinite(rates[worker]) else 0.0)
            running_jobs.add_metric([worker], counts[worker])
        yield from (jobs, queued, rate, running_jobs)
        yield from self._finished()

    def _finished(self) -> Iterator[Metric]:
        with self.session_factory() as session:
            durations = stats.job_durations(session, DURATION_BUCKETS)
            iterations = stats.iterations_by_method(session)
        histogram = HistogramMetricFamily(
            "netsurgery_job_duration_seconds",
            "Run time of the jobs that ended, from start to end, by method and outcome (from the database: "
            "deleting jobs lowers it).",
            labels=["method", "outcome"],
        )
        finished = CounterMetricFamily(
            "netsurgery_jobs_finished",
            "Jobs that ended, by state (from the database: deleting jobs lowers it).",
            labels=["state"],
        )
        by_state: dict[str, int] = {}
        for d in durations:
            buckets = [(str(bound), count) for bound, count in zip(DURATION_BUCKETS, d.at_most, strict=True)]
            histogram.add_metric([d.method, d.state], [*buckets, ("+Inf", d.count)], d.total_seconds)
            by_state[d.state] = by_state.get(d.state, 0) + d.count
        for state in sorted(by_state):
            finished.add_metric([state], by_state[state])
        trained = CounterMetricFamily(
            "netsurgery_iterations",
            "Training iterations run by the jobs of each method (from the database; rate() gives the service's "
            "iterations per second).",
            labels=["method"],
        )
        for method in sorted(iterations):
            trained.add_metric([method], iterations[method])
        yield from (histogram, finished, trained)

    def _broker_queue_length(self) -> int | None:
        import redis

        try:
            client = redis.Redis.from_url(
                self.settings.broker_url, socket_timeout=BROKER_TIMEOUT_S, socket_connect_timeout=BROKER_TIMEOUT_S
            )
            try:
                return int(client.llen(QUEUE))
            finally:
                client.close()
        except Exception as e:  # redis errors, a bad URL: the figure is left out of this scrape
            log.warning("metrics: cannot read the broker's queue length: %s", e)
            return None
