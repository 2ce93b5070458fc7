"""Webhook delivery state: which jobs have a delivery due, and each attempt's record."""

from __future__ import annotations

import datetime as dt
import uuid

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from app.db.models import Job, JobStatus, WebhookDelivery

FINAL = (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


def due(
    session: Session, now: dt.datetime, *, max_attempts: int, job_id: uuid.UUID | None = None, limit: int = 50
) -> list[Job]:
    """Finished jobs with a webhook not yet delivered whose next attempt is due; locked, skipping rows others hold."""
    stmt = select(Job).where(
        Job.notify_url.is_not(None),
        Job.notified_at.is_(None),
        Job.status.in_(FINAL),
        Job.notify_attempts < max_attempts,
        or_(Job.notify_next_at.is_(None), Job.notify_next_at <= now),
    )
    if job_id is not None:
        stmt = stmt.where(Job.id == job_id)
    return list(session.scalars(stmt.order_by(Job.finished_at).limit(limit).with_for_update(skip_locked=True)))


def record(session: Session, job: Job, delivery: WebhookDelivery, *, next_at: dt.datetime | None) -> None:
    """Keep an attempt and move the job's delivery state on: delivered, due again at ``next_at``, or
    (``next_at`` None without a delivery) given up."""
    session.add(delivery)
    job.notify_attempts = delivery.attempt
    if delivery.delivered:
        job.notified_at = delivery.at
    job.notify_next_at = next_at
    session.flush()


def give_up(session: Session, job: Job, max_attempts: int) -> None:
    """No further attempt for this job's webhook."""
    job.notify_attempts = max(job.notify_attempts, max_attempts)
    job.notify_next_at = None
    session.flush()


def deliveries_of(session: Session, job_id: uuid.UUID) -> list[WebhookDelivery]:
    query = select(WebhookDelivery).where(WebhookDelivery.job_id == job_id).order_by(WebhookDelivery.attempt)
    return list(session.scalars(query))
