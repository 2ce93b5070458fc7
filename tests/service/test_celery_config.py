"""The Celery configuration a worker runs with: long-job safety settings and the prompt prefork pool."""

from __future__ import annotations

import pytest
from celery import concurrency
from celery.concurrency.asynpool import AsynPool

from app.core.config import Settings
from app.queue import RUN_JOB_TASK
from worker.celery_app import celery_config
from worker.pool import MAINTAIN_INTERVAL_S, JobPool, PromptAsynPool

pytestmark = pytest.mark.unit  # no server: it belongs with the service code it checks, not its suite


def test_long_job_settings() -> None:
    settings = Settings(job_time_limit_s=600, queue_name="gpu", broker_url="redis://127.0.0.1:6379/0")
    config = celery_config(settings)
    assert config["task_acks_late"] and config["task_reject_on_worker_lost"]
    assert config["worker_prefetch_multiplier"] == 1 and config["worker_max_tasks_per_child"] == 1
    assert config["task_routes"] == {RUN_JOB_TASK: {"queue": "gpu"}}
    assert config["task_soft_time_limit"] == 600 < config["task_time_limit"]
    # A running job's message must not come back while the job still runs.
    assert config["broker_transport_options"]["visibility_timeout"] > config["task_time_limit"]


def test_worker_pool_is_the_prompt_prefork_pool() -> None:
    config = celery_config(Settings())
    # What `celery worker --pool prefork` resolves to when worker_pool is configured.
    assert concurrency.get_implementation(config["worker_pool"]) is JobPool
    assert JobPool.Pool is PromptAsynPool and issubclass(PromptAsynPool, AsynPool)
    # Exited children are looked for far more often than every 5 s (where the children come from, the
    # fork server, is tests/service/test_serve_lifecycle.py's).
    pool = PromptAsynPool.__new__(PromptAsynPool)  # timers only reads maintain_pool
    assert list(pool.timers.values()) == [MAINTAIN_INTERVAL_S] and MAINTAIN_INTERVAL_S < 1
    assert list(AsynPool.timers.fget(pool).values()) == [5.0]  # type: ignore[attr-defined]
