"""The worker's Celery application: the shared broker settings (``app.queue``) plus the consumer's.

Long GPU jobs: late acknowledgement with redelivery when a worker dies, prefetch 1, one task per
child process (a fresh CUDA context and no leaked memory between jobs), a ``gpu`` queue, a broker
visibility timeout longer than the longest job, and no result backend: the job row is the truth.
The reconciler is not a Celery task: it runs as its own periodic loop (``lorp reconciler``, or a
thread of ``lorp serve``), so it never waits in the queue behind a long job. Importing this module
imports no torch.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from app.core.config import Settings, get_settings
from app.queue import broker_config
from worker.broker import consumer_url


def celery_config(settings: Settings) -> dict[str, Any]:
    shared = broker_config(settings)
    return {
        **shared,
        "broker_url": consumer_url(shared["broker_url"]),  # the embedded broker drained in short cycles
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_max_tasks_per_child": 1,
        # Prefork, replacing each job's exited child at once rather than on a 5 s timer (worker/pool.py).
        "worker_pool": "worker.pool:JobPool",
        "task_time_limit": settings.job_time_limit_s + settings.job_hard_limit_grace_s,
        "task_soft_time_limit": settings.job_time_limit_s,
        "worker_hijack_root_logger": False,
    }


def create_celery(settings: Settings | None = None) -> Celery:
    app = Celery("lorp")
    app.conf.update(celery_config(settings or get_settings()))
    return app


celery_app = create_celery()
