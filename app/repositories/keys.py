"""Queries on API keys."""

from __future__ import annotations

import datetime as dt
import uuid

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.db.models import ApiKey


def get_by_hash(session: Session, key_hash: str) -> ApiKey | None:
    return session.scalars(select(ApiKey).where(ApiKey.key_hash == key_hash)).one_or_none()


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)))


def add(session: Session, key: ApiKey) -> ApiKey:
    session.add(key)
    session.flush()
    return key


def revoke(session: Session, key_id: uuid.UUID, at: dt.datetime) -> bool:
    """Mark the key revoked; False when it does not exist or was revoked already."""
    result = session.execute(
        update(ApiKey)
        .where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
        .values(revoked_at=at, updated_at=at)
        .execution_options(synchronize_session="fetch")
    )
    return bool(getattr(result, "rowcount", 0))


def touch(session: Session, key_id: uuid.UUID, at: dt.datetime) -> None:
    # A Core UPDATE of one column: it must not bump updated_at or race with other writers of the row.
    session.execute(
        update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=at).execution_options(synchronize_session=False)
    )
