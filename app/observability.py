"""Prometheus metrics of the API process, on a registry per app.

- ``lorp_http_request_duration_seconds{route,method,status}``: latency by route template.
- ``lorp_jobs{status}``: jobs per status, counted in the database at scrape time.
- ``lorp_queue_depth{queue}``: messages waiting in the workers' queue (Redis ``LLEN`` when the broker
  is Redis; absent for other brokers).
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
from prometheus_client.core import GaugeHistogramMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.config import Settings
from app.db.models import JobStatus
from app.db.session import session_scope
from app.repositories import jobs as jobs_repo

logger = logging.getLogger(__name__)

STAGE_WINDOW = dt.timedelta(hours=24)
STAGE_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0)
# kombu's Redis transport keeps priorities 0 (the plain name) and 3/6/9 in lists named with this separator.
_REDIS_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")


class _StateCollector:
    """Reads job counts, queue depth and stage durations when Prometheus scrapes."""

    def __init__(self, settings: Settings, sessions: Callable[[], sessionmaker[Session]]) -> None:
        self.settings = settings
        self.sessions = sessions
        self._redis: Any = None
        self._lock = threading.Lock()

    def describe(self) -> Iterable[Metric]:
        # Without describe(), registering would run collect() and touch the database at app creation.
        yield GaugeMetricFamily("lorp_jobs", "jobs by status", labels=["status"])
        yield GaugeMetricFamily("lorp_queue_depth", "messages waiting in the broker queue", labels=["queue"])
        yield GaugeHistogramMetricFamily("lorp_stage_duration_seconds", "stage durations (last 24 h)", labels=["stage"])

    def collect(self) -> Iterator[Metric]:
        yield from self._jobs_and_stages()
        depth = self._queue_depth()
        if depth is not None:
            family = GaugeMetricFamily("lorp_queue_depth", "messages waiting in the broker queue", labels=["queue"])
            family.add_metric([self.settings.queue_name], depth)
            yield family

    def _jobs_and_stages(self) -> Iterator[Metric]:
        try:
            with session_scope(self.sessions()) as session:
                counts = jobs_repo.count_by_status(session)
                spans = jobs_repo.stage_spans(session, dt.datetime.now(dt.UTC) - STAGE_WINDOW)
        except Exception as exc:
            logger.warning("metrics: cannot read job state: %s", exc)
            return
        jobs = GaugeMetricFamily("lorp_jobs", "jobs by status", labels=["status"])
        for status in JobStatus:
            jobs.add_metric([status.value], counts.get(status.value, 0))
        yield jobs

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

    def __init__(self, settings: Settings, sessions: Callable[[], sessionmaker[Session]]) -> None:
        self.registry = CollectorRegistry()
        self.http_latency = Histogram(
            "lorp_http_request_duration_seconds",
            "HTTP request latency by route template, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.registry.register(_StateCollector(settings, sessions))
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
