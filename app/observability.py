"""Prometheus metrics of the API process, on a registry per app.

- ``lorp_http_request_duration_seconds{route,method,status}``: latency by route template.
- ``lorp_jobs{status}``: jobs per status, counted in the database at scrape time.
- ``lorp_queue_depth{queue}``: messages waiting in the workers' queue (Redis ``LLEN`` when the broker
  is Redis; absent for other brokers).
- ``lorp_workers_live{queue}``: workers whose liveness beat is newer than ``worker_timeout_s``, per queue
  (the service's own queue always present, 0 when none); ``lorp_oldest_queued_job_age_seconds{queue}``:
  how long each queue's longest-waiting queued job has waited since it was submitted (0 when none waits). With
  ``lorp_jobs{status="queued"|"running"}`` that is the queue's depth by status, and what an alert on
  "jobs waiting, nobody serving them" needs.
- ``lorp_workers_stuck{queue}`` and ``lorp_worker_stuck_starts{queue}``: live workers that are stuck
  now (a pool child of theirs took a job and did not start it within ``LORP_JOB_START_TIMEOUT_S``,
  and no job has started on them since), and how many such starts the live workers have recorded.
- ``lorp_worker_device_memory_bytes{worker,kind,device}``: the memory of the device each live worker
  runs jobs on (one GPU's, or the host's for a CPU worker), as the worker found it when it registered.
- ``lorp_embedded_worker_restarts_total`` and ``lorp_embedded_worker_up``: ``lorp serve``'s worker,
  where it runs one (restarts after unasked exits; 0 once the supervisor gave up).
- ``lorp_disk_free_bytes{path}``: free bytes of each local folder the service writes, by label (``data``,
  ``work``, and ``database``, ``broker``, ``artifacts``, ``spool`` where they lie elsewhere; the labels of
  ``/readyz``'s ``disk`` check), read at scrape time; alert well before it reaches 0.
- ``lorp_stage_duration_seconds{stage}``: a gauge histogram of how long each stage took, over the
  stages that ended in the last 24 hours, read from ``job_events`` at scrape time (the worker runs
  in other processes, so it only writes events; nothing there needs to call into this module).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeHistogramMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core import disk
from app.core.config import Settings
from app.db.models import JobStatus
from app.db.session import session_scope
from app.repositories import jobs as jobs_repo
from app.repositories import workers as workers_repo
from app.services.workers import SupervisedWorker

logger = logging.getLogger(__name__)

STAGE_WINDOW = dt.timedelta(hours=24)
STAGE_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0)
# kombu's Redis transport keeps priorities 0 (the plain name) and 3/6/9 in lists named with this separator.
_REDIS_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")
_DISK_HELP = "free bytes of each local folder the service writes (path: its label)"


class _StateCollector:
    """Reads job counts, queue depth and stage durations when Prometheus scrapes."""

    def __init__(
        self,
        settings: Settings,
        sessions: Callable[[], sessionmaker[Session]],
        supervised: SupervisedWorker | None = None,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.supervised = supervised
        self._redis: Any = None
        self._lock = threading.Lock()

    def describe(self) -> Iterable[Metric]:
        # Without describe(), registering would run collect() and touch the database at app creation.
        yield GaugeMetricFamily("lorp_jobs", "jobs by status", labels=["status"])
        yield GaugeMetricFamily("lorp_queue_depth", "messages waiting in the broker queue", labels=["queue"])
        yield GaugeHistogramMetricFamily("lorp_stage_duration_seconds", "stage durations (last 24 h)", labels=["stage"])
        yield from self._worker_families()
        yield GaugeMetricFamily(
            "lorp_oldest_queued_job_age_seconds", "age of the oldest queued job, per queue", labels=["queue"]
        )
        if self.supervised is not None:
            yield from self._supervisor_families()
        yield GaugeMetricFamily("lorp_disk_free_bytes", _DISK_HELP, labels=["path"])

    def _worker_families(
        self, live: dict[str, int] | None = None, starts: dict[str, workers_repo.QueueStarts] | None = None
    ) -> Iterator[Metric]:
        family = GaugeMetricFamily("lorp_workers_live", "workers with a recent liveness beat", labels=["queue"])
        for queue, count in sorted((live or {}).items()):
            family.add_metric([queue], count)
        yield family
        stuck = GaugeMetricFamily(
            "lorp_workers_stuck", "live workers that could not start a job, and none since", labels=["queue"]
        )
        stuck_starts = GaugeMetricFamily(
            "lorp_worker_stuck_starts", "jobs a pool child took and did not start (live workers)", labels=["queue"]
        )
        for queue in sorted(live or {}):
            seen = (starts or {}).get(queue, workers_repo.QueueStarts())
            stuck.add_metric([queue], seen.stuck_workers)
            stuck_starts.add_metric([queue], seen.stuck_starts)
        yield stuck
        yield stuck_starts

    def _supervisor_families(self) -> Iterator[Metric]:
        assert self.supervised is not None
        restarts = CounterMetricFamily(
            "lorp_embedded_worker_restarts", "times lorp serve restarted its worker after it exited unasked"
        )
        up = GaugeMetricFamily(
            "lorp_embedded_worker_up", "1 while lorp serve keeps its worker running, 0 once it gave up"
        )
        restarts.add_metric([], self.supervised.restarts)
        up.add_metric([], 0 if self.supervised.gave_up is not None else 1)
        yield restarts
        yield up

    def collect(self) -> Iterator[Metric]:
        yield from self._jobs_and_stages()
        yield self._disk_free()
        if self.supervised is not None:
            yield from self._supervisor_families()
        depth = self._queue_depth()
        if depth is not None:
            family = GaugeMetricFamily("lorp_queue_depth", "messages waiting in the broker queue", labels=["queue"])
            family.add_metric([self.settings.queue_name], depth)
            yield family

    def _jobs_and_stages(self) -> Iterator[Metric]:
        try:
            with session_scope(self.sessions()) as session:
                now = dt.datetime.now(dt.UTC)
                counts = jobs_repo.count_by_status(session)
                spans = jobs_repo.stage_spans(session, now - STAGE_WINDOW)
                oldest = jobs_repo.oldest_queued_by_queue(session)
                live = workers_repo.live_by_queue(session, self.settings.worker_timeout_s, now)
                starts = workers_repo.starts_by_queue(session, self.settings.worker_timeout_s, now)
                devices = [
                    (row.name, row.device)
                    for row in workers_repo.live_workers(session, self.settings.worker_timeout_s, now)
                    if row.device
                ]
        except Exception as exc:
            logger.warning("metrics: cannot read job state: %s", exc)
            return
        jobs = GaugeMetricFamily("lorp_jobs", "jobs by status", labels=["status"])
        for status in JobStatus:
            jobs.add_metric([status.value], counts.get(status.value, 0))
        yield jobs
        live.setdefault(self.settings.queue_name, 0)
        yield from self._worker_families(live, starts)
        memory = GaugeMetricFamily(
            "lorp_worker_device_memory_bytes",
            "memory of the device each live worker runs jobs on",
            labels=["worker", "kind", "device"],
        )
        for name, device in devices:
            memory.add_metric(
                [name, str(device.get("kind", "")), str(device.get("name", ""))], float(device.get("memory_bytes") or 0)
            )
        yield memory
        age = GaugeMetricFamily(
            "lorp_oldest_queued_job_age_seconds", "age of the oldest queued job, per queue", labels=["queue"]
        )
        oldest.setdefault(self.settings.queue_name, now)
        for queue, queued_at in sorted(oldest.items()):
            age.add_metric([queue], max((now - queued_at).total_seconds(), 0.0))
        yield age

        by_stage: dict[str, list[float]] = {}
        for stage, started, ended in spans:
            by_stage.setdefault(stage, []).append(max((ended - started).total_seconds(), 0.0))
        stages = GaugeHistogramMetricFamily(
            "lorp_stage_duration_seconds", "stage durations (last 24 h)", labels=["stage"]
        )
        for stage, values in sorted(by_stage.items()):
            buckets = [(str(bound), float(sum(1 for v in values if v <= bound))) for bound in STAGE_BUCKETS]
            buckets.append(("+Inf", float(len(values))))
            stages.add_metric([stage], buckets, gsum_value=sum(values))
        yield stages

    def _disk_free(self) -> Metric:
        family = GaugeMetricFamily("lorp_disk_free_bytes", _DISK_HELP, labels=["path"])
        for label, folder in disk.write_dirs(self.settings).items():
            try:
                family.add_metric([label], disk.free_bytes(folder))
            except OSError as exc:
                logger.warning("metrics: cannot measure the free space of %s: %s", label, exc)
        return family

    def _queue_depth(self) -> int | None:
        url = self.settings.celery_broker_url
        if not url.startswith(("redis://", "rediss://")):
            return None
        try:
            with self._lock:
                if self._redis is None:
                    import redis

                    self._redis = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
                client = self._redis
            pipe = client.pipeline()
            for suffix in _REDIS_PRIORITY_SUFFIXES:
                pipe.llen(self.settings.queue_name + suffix)
            return int(sum(pipe.execute()))
        except Exception as exc:
            logger.warning("metrics: cannot read the queue depth: %s", exc)
            return None


class Metrics:
    """The app's registry: the HTTP latency histogram plus the scrape-time collector."""

    def __init__(
        self,
        settings: Settings,
        sessions: Callable[[], sessionmaker[Session]],
        supervised: SupervisedWorker | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.http_latency = Histogram(
            "lorp_http_request_duration_seconds",
            "HTTP request latency by route template, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.registry.register(_StateCollector(settings, sessions, supervised))
        # Included routers keep their own (unprefixed) path on the route object, so the full
        # template is recorded when the app is built.
        self._templates: dict[int, str] = {}

    def add_route_templates(self, prefix: str, routes: Iterable[Any]) -> None:
        for route in routes:
            path = getattr(route, "path", None)
            if path is not None:
                self._templates[id(route)] = prefix + path

    def route_template(self, route: Any) -> str:
        if route is None:
            return "unmatched"
        return self._templates.get(id(route)) or getattr(route, "path", None) or "unmatched"

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Times every HTTP request and labels it with the matched route template (never the raw path)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            template = self.metrics.route_template(scope.get("route"))
            self.metrics.http_latency.labels(template, scope.get("method", ""), str(status)).observe(
                time.perf_counter() - started
            )
