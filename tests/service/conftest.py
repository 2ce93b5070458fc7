"""Fixtures for the service tests: a real Postgres database migrated by Alembic, Redis, settings.

Postgres and Redis run on the development machines and in CI at their standard local ports
(.ci/run starts them when they are down). Each test's database work is rolled back.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, delete, select, text
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings
from app.db.migrate import upgrade_head
from app.db.models import Analysis, Job

from .moto_server import s3_server  # noqa: F401  (one S3 server for the whole session)

PG_ADMIN_URL = os.environ.get("LORP_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_TEST_URL = os.environ.get("LORP_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def create_test_database(prefix: str = "lorp_test") -> str:
    """A fresh, migrated Postgres database; returns its URL."""
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    upgrade_head(url)
    return url


def drop_test_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    url = create_test_database()
    yield url
    drop_test_database(url)


@pytest.fixture(scope="session")
def pg_engine(pg_url: str) -> Iterator[Engine]:
    engine = create_engine(pg_url, pool_pre_ping=True)
    yield engine
    engine.dispose()


@pytest.fixture()
def db_session(pg_engine: Engine) -> Iterator[Session]:
    """A session whose commits become savepoints inside one transaction that is rolled back."""
    conn = pg_engine.connect()
    outer = conn.begin()
    session = Session(bind=conn, join_transaction_mode="create_savepoint", expire_on_commit=False)
    try:
        yield session
    finally:
        session.close()
        outer.rollback()
        conn.close()


@pytest.fixture()
def rollback_sessionmaker(pg_engine: Engine) -> Iterator[sessionmaker[Session]]:
    """A sessionmaker bound to one connection whose outer transaction is rolled back after the test.

    Hand it to the app under test (``create_app(settings, sessionmaker=...)``): every request's
    commit becomes a savepoint, and nothing outlives the test.
    """
    conn = pg_engine.connect()
    outer = conn.begin()
    factory = sessionmaker(bind=conn, join_transaction_mode="create_savepoint", expire_on_commit=False)
    try:
        yield factory
    finally:
        outer.rollback()
        conn.close()


@pytest.fixture()
def redis_url() -> Iterator[str]:
    import redis

    client = redis.Redis.from_url(REDIS_TEST_URL)
    client.flushdb()
    yield REDIS_TEST_URL
    client.flushdb()
    client.close()


@pytest.fixture()
def api_settings(service_settings: Settings) -> Settings:
    """The service settings with a queue of their own: a worker another test runs must not take our messages."""
    return service_settings.model_copy(update={"queue_name": f"api-test-{uuid.uuid4().hex[:10]}"})


@pytest.fixture()
def service_settings(tmp_path: Path, pg_url: str, redis_url: str) -> Settings:
    """Settings for the full stack on this machine: Postgres, Redis, artifacts in a local folder."""
    return Settings(
        data_dir=tmp_path / "data",
        database_url=pg_url,
        broker_url=redis_url,
        storage_url=(tmp_path / "artifacts").as_uri(),
        model_roots=[tmp_path / "models"],
    )


@pytest.fixture()
def committed_jobs(pg_engine: Engine) -> Iterator[list[uuid.UUID]]:
    """Ids of job rows a test commits to the shared database (outside a rolled-back session); they and
    their analyses are removed afterwards, so tests that count every job do not see them."""
    ids: list[uuid.UUID] = []
    yield ids
    if ids:
        with pg_engine.begin() as conn:
            analyses = [a for a in conn.scalars(select(Job.analysis_id).where(Job.id.in_(ids))) if a is not None]
            conn.execute(delete(Job).where(Job.id.in_(ids)))
            if analyses:
                conn.execute(delete(Analysis).where(Analysis.id.in_(analyses)))
