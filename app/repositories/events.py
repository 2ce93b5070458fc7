"""The job timeline: one ``job_events`` row per status change, stage, retry and cancel request."""

from __future__ import annotations

import datetime as dt
import uuid

from sqlalchemy.orm import Session

from app.db.models import EventKind, JobEvent


def add_event(
    session: Session,
    job_id: uuid.UUID,
    kind: EventKind,
    *,
    status: str | None = None,
    stage: str | None = None,
    message: str | None = None,
    at: dt.datetime | None = None,
) -> JobEvent:
    event = JobEvent(job_id=job_id, kind=kind.value, status=status, stage=stage, message=message)
    if at is not None:
        event.at = at
    session.add(event)
    session.flush()
    return event
