"""The reconciler against real Postgres and Redis: lost messages re-enqueued, dead workers' jobs retried or failed."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError

from app.core.config import Settings
from app.db.models import Job, JobEvent, JobStatus, Worker
from app.db.session import session_factory, session_scope
from app.jobspec import JobCreate
from app.repositories import analyses as analyses_repo
from app.repositories import lifecycle
from app.repositories import workers as workers_repo
from worker import service_cli
from worker.hard_limit import fail_after_hard_limit
from worker.reconciler import OutageWatch, reconcile_once

LONG_AGO = dt.timedelta(hours=1)


@pytest.fixture()
def settings(tmp_path: Path, pg_url: str, redis_url: str) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=pg_url,
        broker_url=redis_url,
        storage_url=(tmp_path / "artifacts").as_uri(),
        queue_name=f"gpu-test-{uuid.uuid4().hex[:8]}",
        heartbeat_timeout_s=60,
        queued_timeout_s=60,
    )


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def insert_job(settings: Settings, **values: Any) -> uuid.UUID:
    request = JobCreate.model_validate({"model": {"id": "demo"}, "target": {"num_layers": 2}})
    with session_scope(session_factory(settings.sqlalchemy_url)) as session:
        job = Job(
            request=request.model_dump(mode="json"),
            request_hash=request.fingerprint(),
            model_source="demo",
            method="auto",
            queue=settings.queue_name,
            **values,
        )
        session.add(job)
        session.flush()
        return job.id


def load(settings: Settings, job_id: uuid.UUID) -> Job:
    with session_scope(session_factory(settings.sqlalchemy_url)) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def events(settings: Settings, job_id: uuid.UUID, kind: str) -> list[JobEvent]:
    with session_scope(session_factory(settings.sqlalchemy_url)) as session:
        return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.kind == kind)))


def _job_id_of(message: bytes | str) -> str:
    envelope = json.loads(message)
    body = envelope["body"]
    if envelope.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    args, _kwargs, _embed = json.loads(body)
    return str(args[0])


def queued_messages(settings: Settings) -> list[str]:
    """Job ids of the run messages waiting in the queue (kombu's Redis transport keeps a list per queue)."""
    client = redis.Redis.from_url(settings.celery_broker_url)
    try:
        return [_job_id_of(m) for m in client.lrange(settings.queue_name, 0, -1)]
    finally:
        client.close()


def sent_here(settings: Settings, kind: str = "enqueued") -> int:
    """One reconcile pass; how many messages it put on this test's own queue.

    The pass's counts cover every queue in the database the whole suite shares, where an earlier test's
    job can fall due meanwhile (one inserted as never sent is sent ``ENQUEUE_GRACE_S`` later), so an
    exact figure is read from this test's queue; the pass must have counted them under ``kind``.
    """
    before = len(queued_messages(settings))
    counts = reconcile_once(settings)
    added = len(queued_messages(settings)) - before
    assert counts[kind] >= added, counts
    return added


def test_queued_job_never_enqueued_is_enqueued(settings: Settings) -> None:
    lost = insert_job(settings, queued_at=now() - LONG_AGO)
    fresh = insert_job(settings)  # the API may not have enqueued it yet: left alone
    recent = insert_job(settings, queued_at=now() - LONG_AGO, enqueued_at=now())
    counts = reconcile_once(settings)
    assert counts["enqueued"] >= 1
    assert str(lost) in queued_messages(settings)
    assert str(fresh) not in queued_messages(settings) and str(recent) not in queued_messages(settings)
    assert load(settings, lost).enqueued_at is not None
    # Enqueued a moment ago: the next pass leaves it alone.
    reconcile_once(settings)
    assert queued_messages(settings).count(str(lost)) == 1


def test_queued_job_enqueued_long_ago_is_enqueued_again_when_its_queue_is_idle(settings: Settings) -> None:
    stale = insert_job(settings, queued_at=now() - LONG_AGO, enqueued_at=now() - LONG_AGO)
    reconcile_once(settings)
    assert queued_messages(settings) == []  # no live worker on its queue: a message would reach nobody
    worker = _worker_row(settings, beat_at=now(), pid=1, host=f"h-{uuid.uuid4().hex[:6]}")
    reconcile_once(settings)
    assert queued_messages(settings) == []  # it registered a moment ago: it may be about to take it
    _registered_long_ago(settings, worker)  # one slot, free all along
    reconcile_once(settings)
    assert queued_messages(settings) == [str(stale)]


def test_a_message_waiting_behind_a_busy_queue_is_not_sent_again(settings: Settings) -> None:
    """Age alone is no sign of a lost message: behind a running job (one slot) the stale jobs wait their
    turn, and each pass that sent them again would add one more duplicate per job."""
    _registered_long_ago(settings, _worker_row(settings, beat_at=now(), pid=1, host=f"h-{uuid.uuid4().hex[:6]}"))
    running = insert_job(
        settings,
        status=JobStatus.running,
        queued_at=now() - LONG_AGO,
        enqueued_at=now() - LONG_AGO,
        started_at=now() - LONG_AGO / 2,
        heartbeat_at=now(),
        progress_at=now(),
        attempts=1,
    )
    waiting = [insert_job(settings, queued_at=now() - LONG_AGO, enqueued_at=now() - LONG_AGO) for _ in range(3)]
    for _ in range(3):
        assert sent_here(settings) == 0
    assert queued_messages(settings) == []

    # The running job ends: its slot was freed a moment ago, nothing sent.
    with session_scope(session_factory(settings.sqlalchemy_url)) as session:
        session.execute(update(Job).where(Job.id == running).values(status=JobStatus.succeeded, finished_at=now()))
    assert sent_here(settings) == 0
    # The next one starts: still no idle slot, nothing sent.
    with session_scope(session_factory(settings.sqlalchemy_url)) as session:
        session.execute(update(Job).where(Job.id == running).values(finished_at=now() - LONG_AGO / 4))
        session.execute(
            update(Job)
            .where(Job.id == waiting[0])
            .values(status=JobStatus.running, started_at=now(), heartbeat_at=now(), attempts=1)
        )
    assert sent_here(settings) == 0
    # That one ends too and the slot stays free with nothing started for a while: the rest were lost.
    quiet = now() - dt.timedelta(seconds=settings.queued_timeout_s)
    with session_scope(session_factory(settings.sqlalchemy_url)) as session:
        session.execute(
            update(Job)
            .where(Job.id == waiting[0])
            .values(status=JobStatus.succeeded, started_at=quiet, finished_at=quiet)
        )
    assert sent_here(settings) == 2
    assert sorted(queued_messages(settings)) == sorted(str(j) for j in waiting[1:])


def test_how_long_a_free_slot_must_sit_idle_is_a_setting(settings: Settings) -> None:
    """LORP_QUEUE_QUIET_S: a slot freed 20 s ago is a gap between jobs under the default 30 s, and an idle
    queue (the waiting message lost) under 10 s."""
    _registered_long_ago(settings, _worker_row(settings, beat_at=now(), pid=1, host=f"h-{uuid.uuid4().hex[:6]}"))
    ended = now() - dt.timedelta(seconds=20)
    insert_job(
        settings,
        status=JobStatus.succeeded,
        queued_at=now() - LONG_AGO,
        enqueued_at=now() - LONG_AGO,
        started_at=ended - dt.timedelta(minutes=5),
        finished_at=ended,
        attempts=1,
    )
    waiting = insert_job(settings, queued_at=now() - LONG_AGO, enqueued_at=now() - LONG_AGO)
    assert settings.queue_quiet_s == 30
    assert sent_here(settings) == 0
    assert sent_here(settings.model_copy(update={"queue_quiet_s": 10.0})) == 1
    assert queued_messages(settings) == [str(waiting)]


def test_a_message_passed_over_by_a_later_one_is_sent_again(settings: Settings) -> None:
    """The queue hands messages out in order: a job sent after the waiting one was claimed first, so the
    waiting one's message is gone, even though the only slot is busy."""
    _registered_long_ago(settings, _worker_row(settings, beat_at=now(), pid=1, host=f"h-{uuid.uuid4().hex[:6]}"))
    passed_over = insert_job(settings, queued_at=now() - LONG_AGO, enqueued_at=now() - LONG_AGO)
    sent_later = now() - LONG_AGO / 2
    insert_job(
        settings,
        status=JobStatus.running,
        queued_at=sent_later,
        enqueued_at=sent_later,
        started_at=now() - dt.timedelta(minutes=1),
        heartbeat_at=now(),
        progress_at=now(),
        attempts=1,
    )
    # Sent after the claim: not passed over, it waits for the slot.
    after = insert_job(settings, queued_at=now() - LONG_AGO, enqueued_at=now() - dt.timedelta(seconds=90))
    settings = settings.model_copy(update={"queued_timeout_s": 30.0})
    assert sent_here(settings) == 1
    assert queued_messages(settings) == [str(passed_over)]
    assert str(after) not in queued_messages(settings)


def test_queued_job_with_a_cancel_request_is_cancelled_not_enqueued(settings: Settings) -> None:
    job_id = insert_job(settings, queued_at=now() - LONG_AGO, cancel_requested_at=now())
    reconcile_once(settings)
    assert load(settings, job_id).status == JobStatus.cancelled
    assert str(job_id) not in queued_messages(settings)


def test_running_job_with_old_heartbeat_is_requeued(settings: Settings) -> None:
    old = now() - LONG_AGO
    job_id = insert_job(
        settings,
        status=JobStatus.running,
        attempts=1,
        max_attempts=3,
        worker="gone",
        started_at=old,
        heartbeat_at=old,
        queued_at=old,
        enqueued_at=old,
    )
    alive = insert_job(settings, status=JobStatus.running, attempts=1, started_at=old, heartbeat_at=now())
    counts = reconcile_once(settings)
    assert counts["requeued"] >= 1
    job = load(settings, job_id)
    assert job.status == JobStatus.queued and job.attempts == 1 and job.worker is None
    assert job.enqueued_at is not None and str(job_id) in queued_messages(settings)
    attempt_events = events(settings, job_id, "attempt")
    assert len(attempt_events) == 1 and "gone" in (attempt_events[0].message or "")
    assert load(settings, alive).status == JobStatus.running
    # The retry is claimable: the next attempt is number 2.
    with session_scope(session_factory(settings.sqlalchemy_url)) as session:
        claimed = lifecycle.claim(session, job_id, "new-worker")
        assert claimed is not None and claimed.attempts == 2


def test_running_job_out_of_attempts_fails_worker_lost(settings: Settings) -> None:
    old = now() - LONG_AGO
    job_id = insert_job(
        settings, status=JobStatus.running, attempts=3, max_attempts=3, worker="w1", started_at=old, heartbeat_at=old
    )
    counts = reconcile_once(settings)
    assert counts["failed"] >= 1
    job = load(settings, job_id)
    assert job.status == JobStatus.failed and job.error_code == "worker_lost"
    assert "heartbeat" in (job.error_message or "") and job.finished_at is not None
    assert str(job_id) not in queued_messages(settings)


def test_old_attempt_cannot_overwrite_after_requeue(settings: Settings) -> None:
    old = now() - LONG_AGO
    job_id = insert_job(settings, status=JobStatus.running, attempts=1, started_at=old, heartbeat_at=old)
    reconcile_once(settings)
    factory = session_factory(settings.sqlalchemy_url)
    with session_scope(factory) as session:
        # The first worker was only slow: its heartbeat and its final write now match nothing.
        assert lifecycle.heartbeat(session, job_id, 1) is False
        assert lifecycle.finish_failed(session, job_id, 1, "internal_error", "late") is False
    assert load(settings, job_id).status == JobStatus.queued


def test_concurrent_passes_requeue_a_job_once(settings: Settings) -> None:
    old = now() - LONG_AGO
    job_id = insert_job(settings, status=JobStatus.running, attempts=1, started_at=old, heartbeat_at=old)
    barrier = threading.Barrier(3)
    errors: list[BaseException] = []

    def run() -> None:
        barrier.wait()
        try:
            reconcile_once(settings)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert len(events(settings, job_id, "attempt")) == 1
    job = load(settings, job_id)
    assert job.status == JobStatus.queued and job.attempts == 1
    assert queued_messages(settings).count(str(job_id)) == 1


def test_store_analysis_is_insert_or_get(settings: Settings) -> None:
    fingerprint = uuid.uuid4().hex
    fields: dict[str, Any] = {
        "model_source": "demo",
        "model_revision": None,
        "dataset_sha256": "0" * 64,
        "num_samples": 4,
        "seq_len": 32,
        "seed": 0,
        "num_tokens": 128,
        "num_blocks": 2,
        "similarity": [[1.0, 0.5, 0.2], [0.5, 1.0, 0.4], [0.2, 0.4, 1.0]],
        "angular_distance": [[0.0, 0.3, 0.4], [0.3, 0.0, 0.2], [0.4, 0.2, 0.0]],
        "rls": 0.5,
        "k": 2,
        "clusters": [0, 1],
        "redundancy": [None, None],
        "provenance": {"fingerprint": fingerprint},
    }
    factory = session_factory(settings.sqlalchemy_url)
    barrier = threading.Barrier(3)
    ids: list[uuid.UUID] = []

    def store() -> None:
        with session_scope(factory) as session:
            barrier.wait()
            ids.append(analyses_repo.store(session, fingerprint=fingerprint, **fields).id)

    threads = [threading.Thread(target=store) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(ids) == 3 and len(set(ids)) == 1
    with session_scope(factory) as session:
        found = analyses_repo.by_fingerprint(session, fingerprint)
        assert found is not None and found.id == ids[0]


def test_worker_command_and_environment(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    argv = service_cli.worker_command(settings, concurrency=2)
    assert argv[1:5] == ["-m", "celery", "-A", "worker.tasks"]
    assert ["-Q", settings.queue_name] == argv[argv.index("-Q") : argv.index("-Q") + 2]
    assert "--pool" in argv and "prefork" in argv and argv[argv.index("--concurrency") + 1] == "2"
    env = service_cli.settings_env(settings, base={"PATH": "/bin", "LORP_S3_ACCESS_KEY": "stale"})
    assert env["PATH"] == "/bin" and "LORP_S3_ACCESS_KEY" not in env
    assert env["LORP_DATABASE_URL"] == settings.database_url and env["LORP_QUEUE_NAME"] == settings.queue_name
    # The child rebuilds the same settings from its environment.
    for key in [k for k in os.environ if k.startswith("LORP_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("LORP_"):
            monkeypatch.setenv(key, value)
    assert Settings() == settings


def test_mark_enqueued_only_touches_queued_jobs(settings: Settings) -> None:
    job_id = insert_job(settings, status=JobStatus.succeeded)
    with session_scope(session_factory(settings.sqlalchemy_url)) as session:
        assert lifecycle.mark_enqueued(session, job_id) is False
        session.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.queued))
        assert lifecycle.mark_enqueued(session, job_id) is True


def _worker_row(settings: Settings, *, beat_at: dt.datetime, pid: int, host: str, lost: bool = False) -> uuid.UUID:
    with session_scope(session_factory(settings.sqlalchemy_url)) as session:
        worker_id = workers_repo.register(
            session,
            name=f"celery@{host}",
            host=host,
            pid=pid,
            queues=[settings.queue_name],
            concurrency=1,
            pid_alive=lambda _pid: True,
            at=beat_at,
        )
        if lost:
            workers_repo.mark_stopped(session, worker_id, at=beat_at)
            session.execute(update(Worker).where(Worker.id == worker_id).values(lost=True))
        return worker_id


def _registered_long_ago(settings: Settings, worker_id: uuid.UUID) -> None:
    with session_scope(session_factory(settings.sqlalchemy_url)) as session:
        session.execute(update(Worker).where(Worker.id == worker_id).values(started_at=now() - LONG_AGO))


def test_a_dead_workers_prefetched_jobs_are_sent_again_at_once(settings: Settings) -> None:
    """A worker killed while it held a queued job's message (prefetched): resent now, not after queued_timeout_s."""
    settings = settings.model_copy(update={"worker_timeout_s": 20.0})
    died = now() - dt.timedelta(seconds=settings.worker_timeout_s + 10)
    assert died > now() - dt.timedelta(seconds=settings.queued_timeout_s)  # the plain sweep would wait
    held = insert_job(settings, queued_at=died - dt.timedelta(seconds=5), enqueued_at=died - dt.timedelta(seconds=5))
    # Sent after it counted as dead (its last beat plus the timeout): not a message it could hold.
    later = insert_job(
        settings, queued_at=now(), enqueued_at=died + dt.timedelta(seconds=settings.worker_timeout_s + 1)
    )
    _worker_row(settings, beat_at=died, pid=1, host=f"h-{uuid.uuid4().hex[:6]}")  # silent, never said it stopped

    assert sent_here(settings, "resent_after_lost_worker") == 1
    assert queued_messages(settings) == [str(held)]
    assert load(settings, held).enqueued_at > died
    # Sent again once: the next pass finds its message newer than the dead worker's last beat.
    assert sent_here(settings, "resent_after_lost_worker") == 0
    assert queued_messages(settings) == [str(held)] and str(later) not in queued_messages(settings)


def test_after_a_database_outage_silent_workers_count_as_dead_only_a_timeout_later(settings: Settings) -> None:
    """Workers could not beat while the database was away either: a pass right after it came back sends
    no queued job again for a worker that only looks dead; a whole LORP_WORKER_TIMEOUT_S later it does."""
    settings = settings.model_copy(update={"worker_timeout_s": 20.0})
    died = now() - dt.timedelta(seconds=settings.worker_timeout_s + 10)
    held = insert_job(settings, queued_at=died - dt.timedelta(seconds=5), enqueued_at=died - dt.timedelta(seconds=5))
    _worker_row(settings, beat_at=died, pid=1, host=f"h-{uuid.uuid4().hex[:6]}")
    back = now()
    reconcile_once(settings, now=back, database_back_at=back)
    assert str(held) not in queued_messages(settings)
    later = back + dt.timedelta(seconds=settings.worker_timeout_s + 1)
    reconcile_once(settings, now=later, database_back_at=back)
    assert str(held) in queued_messages(settings)


def test_a_warm_stop_or_a_live_worker_sends_nothing_again(settings: Settings) -> None:
    sent = now() - dt.timedelta(seconds=5)
    insert_job(settings, queued_at=sent, enqueued_at=sent)
    host = f"h-{uuid.uuid4().hex[:6]}"
    live = _worker_row(settings, beat_at=now(), pid=1, host=host)
    stopped = _worker_row(settings, beat_at=now(), pid=2, host=host)
    with session_scope(session_factory(settings.sqlalchemy_url)) as session:
        workers_repo.mark_stopped(session, stopped)
    assert sent_here(settings, "resent_after_lost_worker") == 0
    assert queued_messages(settings) == []
    # The same worker found gone by a restart on its host (closed as lost): its messages are resent.
    _worker_row(settings, beat_at=now(), pid=3, host=host, lost=True)
    assert sent_here(settings, "resent_after_lost_worker") == 1
    assert live is not None


def test_after_a_database_outage_heartbeats_count_again_only_a_timeout_later(settings: Settings) -> None:
    """Nobody can beat while the database is away. A pass right after it came back must not take back
    a job whose worker lives and will beat again (it waited the outage out, ``worker.retries``): the
    reconciler, which failed to reach the database itself, judges heartbeats again only a whole
    ``LORP_HEARTBEAT_TIMEOUT_S`` after it did. Then the job whose worker is really gone is taken back."""
    silent_since = now() - dt.timedelta(seconds=settings.heartbeat_timeout_s + 30)
    job_id = insert_job(
        settings,
        status=JobStatus.running,
        attempts=1,
        max_attempts=3,
        worker="w1",
        started_at=silent_since,
        heartbeat_at=silent_since,
        progress_at=silent_since,
    )
    watch = OutageWatch()
    away = settings.model_copy(update={"database_url": "postgresql+psycopg://lorp@127.0.0.1:1/away"})
    with pytest.raises(OperationalError):
        watch.run(away)  # this pass cannot reach the database
    back = now()
    for later_s in (0, settings.heartbeat_timeout_s / 2):
        counts = watch.run(settings, now=back + dt.timedelta(seconds=later_s))
        assert load(settings, job_id).status == JobStatus.running, (later_s, counts)
    assert watch.back_at == back
    watch.run(settings, now=back + dt.timedelta(seconds=settings.heartbeat_timeout_s + 1))
    job = load(settings, job_id)
    assert job.status == JobStatus.queued and job.attempts == 1, job.status
    # Without an outage, the same silence is judged at once.
    other = insert_job(
        settings, status=JobStatus.running, attempts=1, max_attempts=3, worker="w2", started_at=silent_since,
        heartbeat_at=silent_since, progress_at=silent_since,
    )  # fmt: skip
    OutageWatch().run(settings)
    assert load(settings, other).status == JobStatus.queued


def test_the_hard_limit_fails_only_the_attempt_it_killed(settings: Settings) -> None:
    """``worker.hard_limit``: the worker's main process fails the job whose pool process Celery killed at
    the hard limit: its running attempt that started at least LORP_JOB_TIME_LIMIT_S ago. An attempt
    that started since (the job taken back and run again elsewhere) is not that one, and is left alone."""
    settings = settings.model_copy(update={"job_time_limit_s": 60})
    killed = insert_job(settings, status=JobStatus.running, attempts=1, started_at=now() - dt.timedelta(seconds=70))
    later = insert_job(settings, status=JobStatus.running, attempts=2, started_at=now() - dt.timedelta(seconds=5))
    work = settings.work_dir / str(killed)
    work.mkdir(parents=True)
    assert fail_after_hard_limit(killed, settings) is True
    job = load(settings, killed)
    assert job.status == JobStatus.failed and job.error_code == "time_limit_exceeded"
    assert "LORP_JOB_HARD_LIMIT_GRACE_S" in (job.error_message or "") and not work.exists()
    assert fail_after_hard_limit(killed, settings) is False  # once
    assert fail_after_hard_limit(later, settings) is False
    assert load(settings, later).status == JobStatus.running
