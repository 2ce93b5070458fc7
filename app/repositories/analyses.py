"""Queries on analyses (S and D with LoRP's structure, reused across jobs by fingerprint)."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db.models import Analysis, Job
from app.repositories.jobs import count_live


def get(session: Session, analysis_id: uuid.UUID) -> Analysis | None:
    return session.get(Analysis, analysis_id)


def structure_of(session: Session, analysis_id: uuid.UUID) -> dict[str, Any] | None:
    """RLS, K, clusters and N without loading S and D, which can be large."""
    row = session.execute(
        select(Analysis.rls, Analysis.k, Analysis.clusters, Analysis.num_blocks).where(Analysis.id == analysis_id)
    ).one_or_none()
    if row is None:
        return None
    return {"rls": row.rls, "k": row.k, "clusters": list(row.clusters), "num_blocks": row.num_blocks}


def by_fingerprint(session: Session, fingerprint: str) -> Analysis | None:
    """The analysis an earlier job stored for this calibration fingerprint."""
    return session.scalars(select(Analysis).where(Analysis.fingerprint == fingerprint)).one_or_none()


def store(session: Session, *, fingerprint: str, **fields: Any) -> Analysis:
    """Insert the analysis of ``fingerprint``, or return the one another job stored first.

    The insert runs in a savepoint: when a concurrent job wins the unique fingerprint, only the
    savepoint rolls back and the winner's row is read instead.
    """
    existing = by_fingerprint(session, fingerprint)
    if existing is not None:
        return existing
    analysis = Analysis(fingerprint=fingerprint, **fields)
    try:
        with session.begin_nested():
            session.add(analysis)
    except IntegrityError:
        winner = by_fingerprint(session, fingerprint)
        if winner is None:
            raise
        return winner
    return analysis


def remove_if_unused(session: Session, analysis_id: uuid.UUID) -> bool:
    """Delete the analysis when no job that is not deleted uses it; whether it was deleted."""
    if count_live(session, Job.analysis_id == analysis_id):
        return False
    session.execute(delete(Analysis).where(Analysis.id == analysis_id).execution_options(synchronize_session=False))
    return True
