"""The schema comes only from the migrations: they must build exactly what the models describe."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, insert, text
from sqlalchemy.exc import IntegrityError

from alembic import command
from app.db.base import Base
from app.db.migrate import REPO_ROOT, upgrade_head
from app.db.models import Job

from .conftest import create_test_database, drop_test_database


@pytest.fixture(params=["postgresql", "sqlite"])
def fresh_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'lorp.db'}"
        upgrade_head(url)
        yield url
    else:
        url = create_test_database("lorp_migrations")
        yield url
        drop_test_database(url)


def _config(url: str) -> Config:
    cfg = Config(str(REPO_ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(REPO_ROOT / "alembic"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def _drift(url: str) -> list[object]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


def test_migrations_build_the_models_schema(fresh_url: str) -> None:
    assert _drift(fresh_url) == []


def test_the_latest_migration_goes_down_and_up_again(fresh_url: str) -> None:
    command.downgrade(_config(fresh_url), "-1")
    assert _drift(fresh_url) != [], "after a downgrade the schema must differ from the models"
    command.upgrade(_config(fresh_url), "head")
    assert _drift(fresh_url) == []


def _job(key: str | None, owner: uuid.UUID | None = None) -> dict[str, object]:
    return {
        "id": uuid.uuid4(),
        "owner_id": owner,
        "status": "queued",
        "progress": 0.0,
        "request": {},
        "request_hash": "0" * 64,
        "model_source": "demo",
        "method": "auto",
        "idempotency_key": key,
        "attempts": 0,
        "max_attempts": 3,
    }


def test_one_idempotency_key_per_anonymous_owner(fresh_url: str) -> None:
    """The database itself refuses a second anonymous job with a key, but not keyless jobs."""
    engine = create_engine(fresh_url)
    try:
        with engine.begin() as conn:
            conn.execute(insert(Job), [_job("k1"), _job(None), _job(None), _job("k2")])
        with pytest.raises(IntegrityError), engine.begin() as conn:
            conn.execute(insert(Job), [_job("k1")])
        with engine.connect() as conn:
            assert conn.execute(text("select count(*) from jobs")).scalar_one() == 4
    finally:
        engine.dispose()
