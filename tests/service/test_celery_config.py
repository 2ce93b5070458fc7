"""The Celery configuration a worker runs with: long-job safety settings and the prompt prefork pool."""

from __future__ import annotations

import socket
import time

import pytest
from celery import concurrency
from celery.concurrency.asynpool import AsynPool
from kombu import Connection

from app.core.config import Settings
from app.queue import RUN_JOB_TASK
from worker.broker import ALIAS, CYCLE_S, PromptTransport, consumer_url
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


def test_the_embedded_broker_is_consumed_in_short_cycles_and_reads_what_the_api_sends(tmp_path) -> None:
    # The API's producer writes with kombu's own SQLAlchemy transport; the worker reads the same tables
    # through PromptTransport, whose waits end within a cycle (Celery's synloop waits 2 s per cycle,
    # and looks whether to stop only between waits).
    settings = Settings(data_dir=tmp_path)
    assert settings.celery_broker_url.startswith("sqla+")
    url = celery_config(settings)["broker_url"]
    assert url == consumer_url(settings.celery_broker_url) and url.startswith(f"{ALIAS}+sqlite:///")
    assert celery_config(Settings(broker_url="redis://127.0.0.1:6379/0"))["broker_url"] == "redis://127.0.0.1:6379/0"
    with Connection(settings.celery_broker_url) as producer:
        producer.SimpleQueue("jobs").put({"job": 1})
    with Connection(url) as consumer:
        assert type(consumer.transport) is PromptTransport
        queue = consumer.SimpleQueue("jobs")
        message = queue.get(timeout=5)
        assert message.payload == {"job": 1}
        message.ack()
        started = time.monotonic()
        with pytest.raises(socket.timeout):
            consumer.drain_events(timeout=30.0)  # nothing more: the wait ends after a cycle, not 30 s
        assert time.monotonic() - started < 10 * CYCLE_S
        queue.close()
