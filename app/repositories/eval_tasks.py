"""The catalogue of downstream tasks the workers can run (``eval_tasks``)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import case, delete, func, insert, select
from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.models import EvalTask


@dataclass(frozen=True)
class EvalTaskRow:
    name: str
    source: str
    metrics: list[str]


def replace_catalogue(session: Session, rows: Sequence[EvalTaskRow], at: dt.datetime | None = None) -> None:
    """Replace the whole catalogue with ``rows`` (the last worker to start publishes what it can run)."""
    now = at or utcnow()
    session.execute(delete(EvalTask).execution_options(synchronize_session=False))
    if rows:
        session.execute(
            insert(EvalTask),
            [{"name": r.name, "source": r.source, "metrics": list(r.metrics), "published_at": now} for r in rows],
        )


def count(session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(EvalTask)) or 0)


def known(session: Session, names: Iterable[str]) -> set[str]:
    wanted = sorted(set(names))
    if not wanted:
        return set()
    return set(session.scalars(select(EvalTask.name).where(EvalTask.name.in_(wanted))))


def listed(
    session: Session, *, source: str | None, prefix: str | None, limit: int, offset: int
) -> tuple[list[EvalTask], int, dt.datetime | None]:
    """A page of tasks (built-in, local, then the registry's, each by name), the total and when published."""
    query = select(EvalTask)
    if source is not None:
        query = query.where(EvalTask.source == source)
    if prefix:
        query = query.where(EvalTask.name.startswith(prefix, autoescape=True))
    total = int(session.scalar(select(func.count()).select_from(query.subquery())) or 0)
    rank = case({"built-in": 0, "local": 1}, value=EvalTask.source, else_=2)
    rows = list(session.scalars(query.order_by(rank, EvalTask.name).limit(limit).offset(offset)))
    published = session.scalar(select(func.max(EvalTask.published_at)))
    return rows, total, published
