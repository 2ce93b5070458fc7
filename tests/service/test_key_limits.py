"""Per-key limits on Postgres and Redis: queued jobs at submission (429 with Retry-After), running jobs at
the worker's claim (the job waits queued, its message spent, no attempt used, and the reconciler sends
it again once the key has room). Admin keys and the anonymous owner of a keyless service are exempt.
"""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings
from app.db.base import utcnow
from app.db.models import ApiKey, Job, JobStatus
from app.db.session import session_factory, session_scope
from app.repositories import lifecycle
from app.services.keys import create_api_key
from worker import reconciler, runner

from .api_helpers import DEMO_JOB, assert_problem, bearer, client_for, new_key, queued_messages


@pytest.fixture()
def settings(service_settings: Settings) -> Settings:
    """Keys required, small limits, a queue of its own."""
    return service_settings.model_copy(
        update={
            "auth_required": True,
            "key_max_queued_jobs": 2,
            "key_max_running_jobs": 1,
            "queue_name": f"limits-{uuid.uuid4().hex[:10]}",
        }
    )


# -- queued jobs at submission -------------------------------------------------------------------------


def test_a_key_beyond_its_queued_limit_gets_429_with_retry_after(
    settings: Settings, rollback_sessionmaker: sessionmaker[Session], redis_url: str
) -> None:
    key, _ = new_key(rollback_sessionmaker, "busy")
    other, _ = new_key(rollback_sessionmaker, "quiet")
    with client_for(settings, rollback_sessionmaker) as client:
        for _ in range(2):
            assert client.post("/v1/jobs", json=DEMO_JOB, headers=bearer(key)).status_code == 202
        refused = client.post("/v1/jobs", json=DEMO_JOB, headers=bearer(key))
        problem = assert_problem(refused, 429)
        assert problem["code"] == "too_many_jobs" and problem["errors"] == []
        assert "2 jobs queued" in problem["detail"] and "LORP_KEY_MAX_QUEUED_JOBS: 2" in problem["detail"]
        assert int(refused.headers["Retry-After"]) > 0
        # Another key is not held up by this one.
        assert client.post("/v1/jobs", json=DEMO_JOB, headers=bearer(other)).status_code == 202
        # A replay of an accepted job is not a new job: it is answered, not refused.
        first = client.post("/v1/jobs", json=DEMO_JOB, headers={**bearer(other), "Idempotency-Key": "once"})
        assert first.status_code == 202
        replay = client.post("/v1/jobs", json=DEMO_JOB, headers={**bearer(other), "Idempotency-Key": "once"})
        assert replay.status_code == 200 and replay.json()["id"] == first.json()["id"]
    assert len(queued_messages(redis_url, settings.queue_name)) == 4  # nothing was sent for the refusal


def test_a_job_that_started_frees_its_place(settings: Settings, rollback_sessionmaker: sessionmaker[Session]) -> None:
    key, _ = new_key(rollback_sessionmaker, "turnover")
    with client_for(settings, rollback_sessionmaker) as client:
        ids = [client.post("/v1/jobs", json=DEMO_JOB, headers=bearer(key)).json()["id"] for _ in range(2)]
        assert_problem(client.post("/v1/jobs", json=DEMO_JOB, headers=bearer(key)), 429)
        with rollback_sessionmaker() as session:
            session.execute(update(Job).where(Job.id == uuid.UUID(ids[0])).values(status=JobStatus.running))
            session.commit()
        assert client.post("/v1/jobs", json=DEMO_JOB, headers=bearer(key)).status_code == 202


def test_admin_keys_and_a_keyless_service_are_exempt(
    settings: Settings, rollback_sessionmaker: sessionmaker[Session]
) -> None:
    admin, _ = new_key(rollback_sessionmaker, "operator", admin=True)
    with client_for(settings, rollback_sessionmaker) as client:
        for _ in range(3):
            assert client.post("/v1/jobs", json=DEMO_JOB, headers=bearer(admin)).status_code == 202
    # No keys (the embedded service, lorp serve's soak of 1,000): one tenant, nothing to keep apart.
    open_service = settings.model_copy(update={"auth_required": False})
    with client_for(open_service, rollback_sessionmaker) as client:
        for _ in range(3):
            assert client.post("/v1/jobs", json=DEMO_JOB).status_code == 202


# -- running jobs at the claim (committed rows: the runner uses its own sessions) --------------------------


@pytest.fixture()
def keys(pg_engine: Engine) -> Iterator[dict[str, uuid.UUID]]:
    """A limited key, a second one and an admin key, committed; they and their jobs are removed after."""
    factory = sessionmaker(bind=pg_engine)
    made: dict[str, uuid.UUID] = {}
    with factory() as session:
        for name, admin in (("limited", False), ("second", False), ("admin", True)):
            _, row = create_api_key(session, f"limits-{name}-{uuid.uuid4().hex[:6]}", admin)
            made[name] = row.id
        session.commit()
    yield made
    with pg_engine.begin() as conn:
        conn.execute(delete(Job).where(Job.owner_id.in_(made.values())))
        conn.execute(delete(ApiKey).where(ApiKey.id.in_(made.values())))


def _queued(settings: Settings, owner: uuid.UUID, n: int) -> list[uuid.UUID]:
    """``n`` queued demo jobs of ``owner``, submitted a minute ago and sent (as the API leaves them)."""
    ids = []
    with session_scope(session_factory(settings.sqlalchemy_url)) as session:
        for _ in range(n):
            job = Job(
                owner_id=owner,
                status=JobStatus.queued,
                request={**DEMO_JOB},
                request_hash="0" * 64,
                model_source="demo",
                method="auto",
                queue=settings.queue_name,
                queued_at=utcnow() - dt.timedelta(minutes=1),
                enqueued_at=utcnow(),
            )
            session.add(job)
            session.flush()
            ids.append(job.id)
    return ids


def _job(settings: Settings, job_id: uuid.UUID) -> Job:
    with session_scope(session_factory(settings.sqlalchemy_url)) as session:
        job = session.get(Job, job_id)
        assert job is not None
        session.expunge(job)
        return job


def _claim(settings: Settings, job_id: uuid.UUID) -> bool:
    with session_scope(session_factory(settings.sqlalchemy_url)) as session:
        claimed = lifecycle.claim(session, job_id, "other-worker", max_running_per_owner=settings.key_max_running_jobs)
        return claimed is not None


def test_a_key_at_its_running_limit_waits_queued_and_is_sent_again_when_it_has_room(
    settings: Settings, keys: dict[str, uuid.UUID], redis_url: str
) -> None:
    running, waiting = _queued(settings, keys["limited"], 2)
    assert _claim(settings, running)  # another worker runs the key's one allowed job
    assert runner.run_job(waiting, settings) == "deferred"
    job = _job(settings, waiting)
    assert job.status == JobStatus.queued and job.attempts == 0 and job.worker is None
    assert job.enqueued_at is None, "its message is spent: it must be sent again"
    # While the key has no room, the reconciler leaves it be (sending it would only defer it again).
    reconciler.reconcile_once(settings)
    assert queued_messages(redis_url, settings.queue_name) == []
    with session_scope(session_factory(settings.sqlalchemy_url)) as session:
        assert lifecycle.finish_failed(session, running, 1, "test", "done")
    reconciler.reconcile_once(settings)
    assert [m["args"] for m in queued_messages(redis_url, settings.queue_name)] == [[str(waiting)]]
    assert _job(settings, waiting).enqueued_at is not None
    assert _claim(settings, waiting)  # its first attempt
    assert _job(settings, waiting).attempts == 1


def test_only_the_free_slots_are_sent_again(settings: Settings, keys: dict[str, uuid.UUID], redis_url: str) -> None:
    """Three deferred jobs of a key with one slot: one message, the oldest; other keys unaffected."""
    limited = settings.model_copy(update={"key_max_running_jobs": 1})
    jobs = _queued(limited, keys["limited"], 3)
    other = _queued(limited, keys["second"], 1)[0]
    admin = _queued(limited, keys["admin"], 2)
    with session_scope(session_factory(settings.sqlalchemy_url)) as session:
        session.execute(update(Job).where(Job.id.in_([*jobs, other, *admin])).values(enqueued_at=None))
    reconciler.reconcile_once(limited)
    sent = sorted(m["args"][0] for m in queued_messages(redis_url, settings.queue_name))
    assert sent == sorted(map(str, [jobs[0], other, *admin]))


def test_concurrent_claims_of_one_key_never_pass_its_limit(settings: Settings, keys: dict[str, uuid.UUID]) -> None:
    two = settings.model_copy(update={"key_max_running_jobs": 2})
    jobs = _queued(two, keys["limited"], 6)
    barrier = threading.Barrier(len(jobs))
    results: list[bool] = []

    def claim(job_id: uuid.UUID) -> None:
        barrier.wait()
        results.append(_claim(two, job_id))

    threads = [threading.Thread(target=claim, args=(job_id,)) for job_id in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False] * 4 + [True] * 2
    with session_scope(session_factory(settings.sqlalchemy_url)) as session:
        statuses = session.scalars(select(Job.status).where(Job.id.in_(jobs))).all()
    assert statuses.count(JobStatus.running) == 2


def test_admin_and_anonymous_jobs_are_never_deferred(settings: Settings, keys: dict[str, uuid.UUID]) -> None:
    admin = _queued(settings, keys["admin"], 2)
    assert _claim(settings, admin[0]) and _claim(settings, admin[1])
    anonymous = _queued(settings, keys["admin"], 2)
    with session_scope(session_factory(settings.sqlalchemy_url)) as session:
        session.execute(update(Job).where(Job.id.in_(anonymous)).values(owner_id=None))
    try:
        assert _claim(settings, anonymous[0]) and _claim(settings, anonymous[1])
    finally:
        with session_scope(session_factory(settings.sqlalchemy_url)) as session:
            session.execute(delete(Job).where(Job.id.in_(anonymous)))
