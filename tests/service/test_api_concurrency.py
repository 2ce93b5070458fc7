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

from .test_api import DEMO_JOB, bearer, client_for, isolated_queue, new_key, queued_messages

THREADS = 8


@pytest.fixture()
def api_settings(service_settings):
    return isolated_queue(service_settings)


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
