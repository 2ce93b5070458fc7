"""Enqueueing jobs: a producer-only Celery client sends "run job X" by name; the job row is committed first.

The API never imports the worker: the task is named here (``RUN_JOB_TASK``) and the worker's Celery
app registers its task under that name. The broker settings both sides must agree on (the URL, the
queue, Redis's visibility timeout) are built here, and ``worker/celery_app.py`` adds the consumer's.
"""

from __future__ import annotations

import threading
import uuid
from typing import Any

from celery import Celery

from app.core.config import Settings

RUN_JOB_TASK = "lorp.run_job"

_apps: dict[str, Celery] = {}
_lock = threading.Lock()


def broker_config(settings: Settings) -> dict[str, Any]:
    """What producer and consumer share: the broker, the queue of the job task, no results."""
    broker = settings.celery_broker_url
    config: dict[str, Any] = {
        "broker_url": broker,
        "task_ignore_result": True,
        "task_default_queue": settings.queue_name,
        "task_routes": {RUN_JOB_TASK: {"queue": settings.queue_name}},
        "broker_connection_retry_on_startup": True,
    }
    if broker.startswith(("redis://", "rediss://")):
        # Unacknowledged messages come back after this long; it must outlast the longest job or a
        # running job would be delivered a second time (the claim would refuse it, but still).
        config["broker_transport_options"] = {
            "visibility_timeout": settings.job_time_limit_s * 2,
            "socket_connect_timeout": 5,
            "socket_timeout": 10,
        }
    return config


def producer_for(settings: Settings) -> Celery:
    """One producer client per broker URL (connections are pooled inside it)."""
    key = settings.celery_broker_url
    with _lock:
        if key not in _apps:
            producer = Celery("lorp-producer")
            producer.conf.update(broker_config(settings))
            _apps[key] = producer
        return _apps[key]


def enqueue_job(job_id: uuid.UUID, settings: Settings, queue: str | None = None) -> None:
    """Send ``run_job(job_id)`` to ``queue`` (default: the service's). Call only after the job row is committed."""
    producer_for(settings).send_task(RUN_JOB_TASK, args=[str(job_id)], queue=queue or settings.queue_name)
