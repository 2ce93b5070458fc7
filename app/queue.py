"""Enqueueing jobs: the broker only carries "run job X"; the job row is committed first."""

from __future__ import annotations

import threading
import uuid

from celery import Celery

from app.core.config import Settings
from worker.celery_app import RUN_JOB_TASK, create_celery

_apps: dict[str, Celery] = {}
_lock = threading.Lock()


def celery_for(settings: Settings) -> Celery:
    """One Celery client per broker URL (connections are pooled inside it)."""
    key = settings.celery_broker_url
    with _lock:
        if key not in _apps:
            _apps[key] = create_celery(settings)
        return _apps[key]


def enqueue_job(job_id: uuid.UUID, settings: Settings) -> None:
    """Send ``run_job(job_id)`` to the workers' queue. Call only after the job row is committed."""
    celery_for(settings).send_task(RUN_JOB_TASK, args=[str(job_id)], queue=settings.queue_name)
