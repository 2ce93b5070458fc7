"""Queries on uploaded calibration datasets."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.security import Principal
from app.db.models import Dataset
from app.repositories.jobs import owned_by


def get(session: Session, dataset_id: uuid.UUID) -> Dataset | None:
    """The dataset, whoever owns it: the worker's read of a job's reference, which the API checked
    at submission against the job's owner."""
    return session.get(Dataset, dataset_id)


def get_visible(session: Session, dataset_id: uuid.UUID, principal: Principal) -> Dataset | None:
    stmt = select(Dataset).where(Dataset.id == dataset_id, owned_by(Dataset.owner_id, principal))
    return session.scalars(stmt).one_or_none()


def add(session: Session, dataset: Dataset) -> Dataset:
    session.add(dataset)
    session.flush()
    return dataset
