"""The start watch: a pool child past LORP_JOB_START_TIMEOUT_S without its job's claim is killed, once, and
its worker's row says it is stuck until a job starts on it again.

The accepted requests are given as Celery's ``Request`` exposes them (name, args, worker_pid,
time_start); the "child" is a real process, so the kill is real; rows live in Postgres (rolled back).
The whole path with a real Celery worker is tests/reliability/test_workers.py (stuck_before).
"""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from sqlalchemy import update

from app.core.config import Settings
from app.db.models import Job, JobStatus, Worker
from app.queue import RUN_JOB_TASK
from app.repositories import workers as workers_repo
from worker.forkserver import exit_status
from worker.liveness import pid_alive
from worker.startwatch import StartWatch

from .api_helpers import insert_job

NAME = "w1@test-host"


@pytest.fixture()
def child() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


def _worker(session) -> uuid.UUID:
    return workers_repo.register(
        session, name=NAME, host="test-host", pid=1, queues=["q"], concurrency=1, pid_alive=pid_alive
    )


def _request(job_id: uuid.UUID, pid: int, accepted_s_ago: float) -> SimpleNamespace:
    return SimpleNamespace(
        name=RUN_JOB_TASK, args=[str(job_id)], worker_pid=pid, time_start=time.time() - accepted_s_ago
    )


def test_a_child_past_the_bound_without_a_claim_is_killed_once_and_the_worker_is_stuck(
    rollback_sessionmaker, child
) -> None:
    with rollback_sessionmaker() as session:
        worker_id = _worker(session)
        job_id = insert_job(rollback_sessionmaker)
        fresh = insert_job(rollback_sessionmaker)
        requests = [_request(job_id, child.pid, 5.0), _request(fresh, 999_999, 0.5)]
        watch = StartWatch(Settings(job_start_timeout_s=2), NAME, requests=lambda: requests)

        found = watch.check(session, worker_id)
        assert [(f.job_id, f.pid) for f in found] == [(job_id, child.pid)]
        assert child.wait(timeout=10) == -9  # killed for real
        row = session.get(Worker, worker_id)
        assert row is not None and row.stuck and row.stuck_starts == 1
        assert f"took job {job_id}" in (row.stuck_detail or "")
        presence = workers_repo.presence(session, "q", 60)
        assert (presence.live, presence.stuck) == (0, 1)

        # Celery has not processed the loss yet: the request is still there, and is not counted twice.
        assert watch.check(session, worker_id) == []
        assert session.get(Worker, worker_id).stuck_starts == 1  # type: ignore[union-attr]

        # A job claimed by this worker after it got stuck: no longer stuck; the count stays.
        session.execute(
            update(Job)
            .where(Job.id == fresh)
            .values(status=JobStatus.running, worker=NAME, started_at=dt.datetime.now(dt.UTC))
        )
        requests.clear()
        assert watch.check(session, worker_id) == []
        row = session.get(Worker, worker_id)
        session.refresh(row)
        assert row is not None and not row.stuck and row.stuck_starts == 1
        assert workers_repo.presence(session, "q", 60).live == 1
        session.rollback()


def test_a_child_that_claimed_its_job_is_left_alone_whatever_its_age(rollback_sessionmaker, child) -> None:
    with rollback_sessionmaker() as session:
        worker_id = _worker(session)
        accepted_ago = 30.0
        claimed_at = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=accepted_ago - 0.5)
        job_id = insert_job(rollback_sessionmaker, status=JobStatus.running, worker=NAME, started_at=claimed_at)
        # Claimed by another worker: a duplicate delivery that this child should have left at once.
        elsewhere = insert_job(
            rollback_sessionmaker, status=JobStatus.running, worker="w2@other", started_at=claimed_at
        )
        requests = [_request(job_id, child.pid, accepted_ago)]
        watch = StartWatch(Settings(job_start_timeout_s=2), NAME, requests=lambda: requests)
        assert watch.check(session, worker_id) == []
        assert child.poll() is None

        killed: list[int] = []
        requests[:] = [_request(elsewhere, 4242, accepted_ago)]
        watch = StartWatch(
            Settings(job_start_timeout_s=2), NAME, requests=lambda: requests, kill=lambda p, _s: killed.append(p)
        )
        assert [f.job_id for f in watch.check(session, worker_id)] == [elsewhere] and killed == [4242]
        session.rollback()


def test_exit_statuses_are_reported_as_the_shell_does() -> None:
    """What the fork server's reaper writes back for billiard: the code, or 128 + the signal."""
    done = subprocess.run([sys.executable, "-c", "import os; os._exit(75)"], check=False)
    assert done.returncode == 75
    assert exit_status(75 << 8) == 75 and exit_status(0) == 0
    assert exit_status(9) == 137 and exit_status(15) == 143  # killed by SIGKILL, SIGTERM
