"""Concurrent submissions with one Idempotency-Key make one job, on a real, committed database."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import delete, func, select
from sqlalchemy.orm import sessionmaker

from app.db.models import ApiKey, Job
from app.db.session import get_engine

from .api_helpers import DEMO_JOB, bearer, client_for, new_key, queued_messages

THREADS = 8


@pytest.mark.parametrize("owner", ["anonymous", "keyed"])
def test_concurrent_posts_with_one_key_make_one_job(api_settings, pg_url, redis_url, owner):
    factory = sessionmaker(bind=get_engine(pg_url), expire_on_commit=False)
    idempotency_key = f"race-{uuid.uuid4()}"
    headers = {"Idempotency-Key": idempotency_key}
    key_id = None
    if owner == "keyed":
        plaintext, key_id = new_key(factory, "racer")
        headers.update(bearer(plaintext))
    client = client_for(api_settings, factory)
    barrier = threading.Barrier(THREADS)

    def post(_: int) -> tuple[int, str]:
        barrier.wait()
        response = client.post("/v1/jobs", json=DEMO_JOB, headers=headers)
        return response.status_code, response.json().get("id", response.text)

    try:
        with ThreadPoolExecutor(THREADS) as pool:
            results = list(pool.map(post, range(THREADS)))
        statuses = sorted(status for status, _ in results)
        ids = {job_id for _, job_id in results}
        assert statuses == [200] * (THREADS - 1) + [202], results
        assert len(ids) == 1
        with factory() as session:
            count = session.scalar(select(func.count()).select_from(Job).where(Job.idempotency_key == idempotency_key))
            assert count == 1
        assert [m["args"] for m in queued_messages(redis_url, api_settings.queue_name)] == [[ids.pop()]]
    finally:
        with factory() as session:
            session.execute(delete(Job).where(Job.idempotency_key == idempotency_key))
            if key_id is not None:
                session.execute(delete(ApiKey).where(ApiKey.id == key_id))
            session.commit()


def test_routes_give_their_connection_back_before_the_dependency_exit(api_settings, pg_url):
    """Many concurrent polls with fewer connections than requests: none waits for the pool (no 503)."""
    from sqlalchemy import create_engine

    from app.api.deps import _ends_its_unit_of_work

    # Without the fix this deadlocks until the pool timeout: every pool thread waits for the one
    # connection, held by a request whose dependency exit waits for a thread. With it, waits are
    # short; 10 s leaves room for a loaded machine.
    engine = create_engine(pg_url, pool_size=1, max_overflow=0, pool_timeout=10)
    factory = sessionmaker(bind=engine, expire_on_commit=False)
    job_id = None
    try:
        session = factory()

        def route(session):
            return session.scalar(select(func.count()).select_from(Job))

        count = _ends_its_unit_of_work(route)(session=session)
        assert count is not None
        assert engine.pool.checkedout() == 0, "the route's thread must return the connection itself"
        assert not session.in_transaction()

        def failing(session):
            session.scalar(select(func.count()).select_from(Job))
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError):
            _ends_its_unit_of_work(failing)(session=session)
        assert engine.pool.checkedout() == 0
        session.close()

        # Through the app: more concurrent reads (100) than the thread pool has threads (40), on a
        # pool of one connection.
        # The client as a context manager runs the app on one event loop (one thread pool) for all.
        with client_for(api_settings, factory) as client:
            job_id = client.post("/v1/jobs", json=DEMO_JOB).json()["id"]
            with ThreadPoolExecutor(100) as pool:
                statuses = list(pool.map(lambda _: client.get(f"/v1/jobs/{job_id}").status_code, range(300)))
        assert statuses == [200] * 300
    finally:
        if job_id is not None:  # committed for real: other tests count jobs
            with factory() as cleanup:
                cleanup.execute(delete(Job).where(Job.id == uuid.UUID(job_id)))
                cleanup.commit()
        engine.dispose()
