"""Queries on analyses (S and D with LoRP's structure, reused across jobs by fingerprint)."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import Analysis


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
