"""Worker liveness: the beat rows, /readyz's ``workers`` check, a queued job's ``waiting_for`` and /metrics.

Rows are written through the repository (as a worker's beat thread writes them) on Postgres with a
rolled-back session, and the beat thread itself runs against the embedded mode's SQLite database.
The real Celery worker registering itself is covered by tests/reliability/test_workers.py.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from app.core.config import Settings
from app.db.models import JobStatus, Worker
from app.main import create_app
from app.repositories import workers as workers_repo
from worker.liveness import WorkerBeat, pid_alive

from .api_helpers import assert_problem, client_for, insert_job


def _register(factory, queue: str, *, host: str = "test-host", pid: int | None = None, at=None) -> uuid.UUID:
    with factory() as session:
        worker_id = workers_repo.register(
            session,
            name=f"celery@{host}",
            host=host,
            pid=pid or os.getpid(),
            queues=[queue],
            concurrency=1,
            pid_alive=pid_alive,
            at=at,
        )
        session.commit()
        return worker_id


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=30)
    return proc.pid


def test_no_queued_jobs_and_no_worker_is_ready(api_settings, rollback_sessionmaker):
    ready = client_for(api_settings, rollback_sessionmaker).get("/readyz")
    assert ready.status_code == 200, ready.text
    workers = ready.json()["checks"]["workers"]
    assert workers["ok"] is True and workers["queue"] == api_settings.queue_name
    assert workers["live"][api_settings.queue_name] == 0 and workers["queued"][api_settings.queue_name] == 0


def test_a_queued_job_without_a_worker_is_503_workers_and_says_it_waits(api_settings, rollback_sessionmaker):
    queue = api_settings.queue_name
    client = client_for(api_settings, rollback_sessionmaker)
    job_id = insert_job(rollback_sessionmaker, queue=queue)
    body = assert_problem(client.get("/readyz"), 503, "workers")
    assert body["checks"]["workers"]["queued"][queue] == 1 and body["checks"]["workers"]["live"][queue] == 0
    assert f"no worker has ever served queue {queue}" in body["detail"]
    assert body["checks"]["database"]["ok"] and body["checks"]["broker"]["ok"]

    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["waiting_for"] == "worker"
    assert job["worker_last_seen_at"] is None and job["worker_unseen_s"] is None
    listed = {j["id"]: j for j in client.get("/v1/jobs", params={"status": "queued"}).json()["items"]}
    assert listed[str(job_id)]["waiting_for"] == "worker"

    # A live worker on another queue does not serve this one.
    _register(rollback_sessionmaker, "another-queue")
    assert client.get("/readyz").status_code == 503

    _register(rollback_sessionmaker, queue)
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"]["workers"]["live"][queue] == 1
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["waiting_for"] is None and job["worker_unseen_s"] is None


def test_a_worker_whose_beats_stopped_is_no_longer_live(api_settings, rollback_sessionmaker):
    queue = api_settings.queue_name
    client = client_for(api_settings, rollback_sessionmaker)
    job_id = insert_job(rollback_sessionmaker, queue=queue)
    beat_at = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=api_settings.worker_timeout_s + 30)
    _register(rollback_sessionmaker, queue, at=beat_at)

    body = assert_problem(client.get("/readyz"), 503, "workers")
    assert "the last was seen" in body["detail"]
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["waiting_for"] == "worker"
    assert dt.datetime.fromisoformat(job["worker_last_seen_at"]) == beat_at
    assert api_settings.worker_timeout_s + 29 < job["worker_unseen_s"] < api_settings.worker_timeout_s + 120

    # A running job is not waiting, whatever the workers.
    running = insert_job(rollback_sessionmaker, queue=queue, status=JobStatus.running)
    assert client.get(f"/v1/jobs/{running}").json()["waiting_for"] is None


def test_a_worker_that_said_it_stopped_is_not_live_at_once(api_settings, rollback_sessionmaker):
    queue = api_settings.queue_name
    worker_id = _register(rollback_sessionmaker, queue)
    with rollback_sessionmaker() as session:
        assert workers_repo.presence(session, queue, 60).live == 1
        workers_repo.mark_stopped(session, worker_id)
        assert workers_repo.beat(session, worker_id) is False  # a stopped row takes no more beats
        presence = workers_repo.presence(session, queue, 60)
        session.commit()
    assert presence.live == 0 and presence.last_seen_at is not None


def test_register_closes_the_rows_of_dead_processes_on_its_host(api_settings, rollback_sessionmaker):
    queue = api_settings.queue_name
    host = f"host-{uuid.uuid4().hex[:8]}"
    dead = _register(rollback_sessionmaker, queue, host=host, pid=_dead_pid())
    alive = _register(rollback_sessionmaker, queue, host=host, pid=os.getppid())
    elsewhere = _register(rollback_sessionmaker, queue, host=f"{host}-other", pid=_dead_pid())
    _register(rollback_sessionmaker, queue, host=host)  # a restarted worker on that host
    with rollback_sessionmaker() as session:
        rows = {w.id: w for w in session.scalars(select(Worker).where(Worker.queues.isnot(None)))}
        assert workers_repo.presence(session, queue, 60).live == 3
    assert rows[dead].stopped_at is not None  # its pid is gone: not counted twice
    assert rows[alive].stopped_at is None
    assert rows[elsewhere].stopped_at is None  # another host's pids cannot be checked from here


@dataclass
class _GaveUp:
    """What lorp serve's supervisor shows once it stopped restarting (worker/supervisor.py)."""

    restarts: int = 4
    gave_up: str | None = "the worker exited 5 times in a row within 60 s of starting (last status 1)"


def test_readyz_is_503_once_the_embedded_worker_was_given_up_on(api_settings, rollback_sessionmaker):
    _register(rollback_sessionmaker, api_settings.queue_name)  # even a live row does not hide it
    app = create_app(api_settings, sessionmaker=rollback_sessionmaker, supervised_worker=_GaveUp())
    client = TestClient(app)
    body = assert_problem(client.get("/readyz"), 503, "workers")
    assert "the embedded worker is down: the worker exited 5 times" in body["detail"]
    assert body["checks"]["workers"]["restarts"] == 4
    metrics = client.get("/metrics").text
    assert "lorp_embedded_worker_restarts_total 4.0" in metrics
    assert "lorp_embedded_worker_up 0.0" in metrics


def test_metrics_count_live_workers_and_the_oldest_queued_job(api_settings, rollback_sessionmaker):
    queue = api_settings.queue_name
    client = client_for(api_settings, rollback_sessionmaker)
    text = client.get("/metrics").text
    assert f'lorp_workers_live{{queue="{queue}"}} 0.0' in text
    assert f'lorp_oldest_queued_job_age_seconds{{queue="{queue}"}} 0.0' in text
    assert "lorp_embedded_worker_up" not in text  # no supervisor: not an embedded serve

    now = dt.datetime.now(dt.UTC)
    insert_job(rollback_sessionmaker, queue=queue, queued_at=now - dt.timedelta(seconds=300))
    insert_job(rollback_sessionmaker, queue=queue, queued_at=now - dt.timedelta(seconds=5))
    _register(rollback_sessionmaker, queue)
    _register(rollback_sessionmaker, queue, host="second-host")
    text = client.get("/metrics").text
    assert f'lorp_workers_live{{queue="{queue}"}} 2.0' in text
    age = float(re.search(rf'^lorp_oldest_queued_job_age_seconds{{queue="{queue}"}} (\S+)$', text, re.M).group(1))
    assert 300 <= age < 400, age


def test_the_beat_thread_registers_beats_and_says_it_stopped(tmp_path):
    from app.db.migrate import upgrade_head
    from app.db.session import session_factory, session_scope

    settings = Settings(data_dir=tmp_path / "embedded", worker_beat_interval_s=0.1, worker_timeout_s=1.0)
    settings.resolved_data_dir.mkdir(parents=True)
    upgrade_head(settings.sqlalchemy_url)
    factory = session_factory(settings.sqlalchemy_url)
    beat = WorkerBeat(settings, name="celery@beat-test", queues=["gpu"], concurrency=2)
    beat.start()
    try:
        assert beat.registered.wait(10)
        with session_scope(factory) as session:
            first = session.get(Worker, beat.worker_id)
            assert first is not None and first.concurrency == 2 and first.pid == os.getpid()
            first_beat = first.beat_at
        time.sleep(0.5)
        with session_scope(factory) as session:
            assert session.get(Worker, beat.worker_id).beat_at > first_beat
            assert workers_repo.presence(session, "gpu", settings.worker_timeout_s).live == 1
    finally:
        beat.stop()
    with session_scope(factory) as session:
        row = session.get(Worker, beat.worker_id)
        assert row.stopped_at is not None
        assert workers_repo.presence(session, "gpu", settings.worker_timeout_s).live == 0


def test_a_worker_describes_its_device_with_the_budget_set_and_ignores_a_bad_one(monkeypatch):
    """The budget a worker reports is LORP_DEVICE_MEMORY_GB as the engine reads it (lorp.host); a bad
    value is reported as none (each job is refused with a message naming the setting)."""
    from lorp.host import cpu_name
    from worker.device import describe_device

    monkeypatch.setenv("PATH", "")  # no nvidia-smi: the host's CPU
    monkeypatch.setenv("LORP_DEVICE_MEMORY_GB", "1.5")
    device = describe_device()
    assert device["kind"] == "cpu" and device["name"] == cpu_name() and device["memory_bytes"] > 2**30
    assert device["budget_bytes"] == 1_500_000_000
    monkeypatch.setenv("LORP_DEVICE_MEMORY_GB", "lots")
    assert describe_device()["budget_bytes"] is None


def test_the_timeout_must_outlast_the_beat_interval():
    with pytest.raises(ValueError, match="LORP_WORKER_TIMEOUT_S"):
        Settings(worker_beat_interval_s=30, worker_timeout_s=20)


def test_a_beat_that_failed_is_tried_again_within_a_second_not_an_interval_later(pg_url, pg_engine, caplog):
    """After a database outage the worker counts as live again as soon as the database is back: the
    beat that failed is tried again every RETRY_AFTER_FAILED_BEAT_S, not a whole interval later (during
    an outage longer than LORP_WORKER_TIMEOUT_S, /readyz says no worker is live until it beats again)."""
    from reliability.servers import TcpGate
    from sqlalchemy.engine import make_url

    from app.db.session import session_scope
    from worker.liveness import RETRY_AFTER_FAILED_BEAT_S

    url = make_url(pg_url)
    gate = TcpGate(f"{url.host or '127.0.0.1'}:{url.port or 5432}")
    gated = url.set(host="127.0.0.1", port=int(gate.url.rsplit(":", 1)[1])).render_as_string(hide_password=False)
    interval = 4.0
    settings = Settings(database_url=gated, worker_beat_interval_s=interval, worker_timeout_s=3 * interval)
    beat = WorkerBeat(settings, name="celery@outage-test", queues=["outage"], concurrency=1)
    caplog.set_level(logging.INFO, logger="worker.liveness")

    def logged(text: str) -> bool:
        return any(text in record.getMessage() for record in caplog.records)

    beat.start()
    try:
        assert beat.registered.wait(10)
        gate.cut()  # the next beat (an interval after registering) fails
        deadline = time.monotonic() + 3 * interval
        while not logged("liveness beat failed") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert logged("liveness beat failed"), "the beat never failed"
        with session_scope(sessionmaker(bind=pg_engine)) as session:
            failed_at = session.get(Worker, beat.worker_id).beat_at
        gate.reopen()
        reopened = time.monotonic()
        landed = None
        while time.monotonic() - reopened < interval + 2:
            with session_scope(sessionmaker(bind=pg_engine)) as session:
                if session.get(Worker, beat.worker_id).beat_at > failed_at:
                    landed = time.monotonic() - reopened
                    break
            time.sleep(0.02)
        # An interval later would be ~4 s after the failure; one retry wait is 1 s.
        assert landed is not None and landed < RETRY_AFTER_FAILED_BEAT_S + 1.0 < interval, landed
        assert logged("liveness beat works again")
    finally:
        beat.stop()
        gate.close()
