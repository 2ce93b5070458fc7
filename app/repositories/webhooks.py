"""Webhook delivery state: which jobs have a delivery due, the claim of one attempt, and each attempt's row.

One delivery per attempt, even with two dispatchers on SQLite (which has no SKIP LOCKED): an attempt
is claimed by a conditional UPDATE that moves the job's ``notify_attempts`` on from the number the
claimer read, and leases the job (``notify_next_at`` = the attempt's deadline plus a margin, so no
one else finds it due meanwhile); its ``webhook_deliveries`` row is written in the same transaction,
unique per (job, attempt). A row that is neither delivered nor has a status or an error is in flight;
the result is recorded on it by attempt number. An attempt whose sender stopped before recording
(its lease long past) is marked as such, and the job is due again while attempts remain.
"""

from __future__ import annotations

import datetime as dt
import uuid

from sqlalchemy import ColumnElement, func, or_, select, update
from sqlalchemy.orm import Session

from app.db.models import Job, JobStatus, WebhookDelivery

FINAL = (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)
ABANDONED = "no result recorded: the sender stopped during this attempt"


def _in_flight() -> list[ColumnElement[bool]]:
    return [
        WebhookDelivery.delivered.is_(False),
        WebhookDelivery.error.is_(None),
        WebhookDelivery.status_code.is_(None),
    ]


def due(
    session: Session,
    now: dt.datetime,
    *,
    max_attempts: int,
    limit: int = 50,
    job_ids: list[uuid.UUID] | None = None,
    exclude: set[uuid.UUID] | None = None,
) -> list[tuple[uuid.UUID, int]]:
    """Finished jobs whose webhook is not delivered and whose next attempt is due, first attempts first,
    then the oldest end (only ``job_ids``, none of ``exclude``): (job id, attempts so far), the number
    a claim must find unchanged."""
    stmt = select(Job.id, Job.notify_attempts).where(
        Job.notify_url.is_not(None),
        Job.notified_at.is_(None),
        Job.status.in_(FINAL),
        Job.notify_attempts < max_attempts,
        or_(Job.notify_next_at.is_(None), Job.notify_next_at <= now),
    )
    if job_ids is not None:
        stmt = stmt.where(Job.id.in_(job_ids))
    if exclude:
        stmt = stmt.where(Job.id.not_in(exclude))
    # First attempts before retries: receivers that keep failing cannot hold back fresh deliveries.
    rows = session.execute(stmt.order_by(Job.notify_attempts, Job.finished_at, Job.id).limit(limit))
    return [(job_id, attempts) for job_id, attempts in rows]


def claim(session: Session, job_id: uuid.UUID, seen: int, *, now: dt.datetime, lease_until: dt.datetime) -> Job | None:
    """Take attempt ``seen + 1`` of the job's webhook, or None when another sender moved it on first
    (or it is no longer due). The caller writes the attempt's row in the same transaction."""
    taken = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.notify_attempts == seen,
            Job.notified_at.is_(None),
            or_(Job.notify_next_at.is_(None), Job.notify_next_at <= now),
        )
        .values(notify_attempts=seen + 1, notify_next_at=lease_until)
        .execution_options(synchronize_session=False)
    )
    if taken.rowcount != 1:  # type: ignore[attr-defined]
        return None
    # An earlier attempt of this job still in flight: its sender stopped (the lease ran out).
    session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.job_id == job_id, WebhookDelivery.attempt <= seen, *_in_flight())
        .values(error=ABANDONED)
        .execution_options(synchronize_session=False)
    )
    return session.scalars(select(Job).where(Job.id == job_id).execution_options(populate_existing=True)).one()


def start_attempt(session: Session, job: Job, *, event: str, at: dt.datetime) -> None:
    """The row of the attempt just claimed, in flight until :func:`finish_attempt`."""
    assert job.notify_url is not None
    session.add(
        WebhookDelivery(
            job_id=job.id,
            attempt=job.notify_attempts,
            event=event,
            url=job.notify_url,
            at=at,
            status_code=None,
            error=None,
            duration_ms=0.0,
            delivered=False,
        )
    )
    session.flush()


def finish_attempt(
    session: Session,
    job_id: uuid.UUID,
    attempt: int,
    *,
    status_code: int | None,
    error: str | None,
    duration_ms: float,
    at: dt.datetime,
    next_at: dt.datetime | None,
) -> None:
    """Record attempt ``attempt``'s result on its row and move the job on: delivered (no further
    attempt), due again at ``next_at``, or (``next_at`` None) given up. A later attempt claimed
    meanwhile keeps the job's state; a delivery is kept whatever came after."""
    delivered = error is None
    session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.job_id == job_id, WebhookDelivery.attempt == attempt)
        .values(status_code=status_code, error=error, duration_ms=duration_ms, delivered=delivered)
        .execution_options(synchronize_session=False)
    )
    if delivered:
        values = {"notified_at": func.coalesce(Job.notified_at, at), "notify_next_at": None}
        session.execute(
            update(Job).where(Job.id == job_id).values(**values).execution_options(synchronize_session=False)
        )
    else:
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.notify_attempts == attempt, Job.notified_at.is_(None))
            .values(notify_next_at=next_at)
            .execution_options(synchronize_session=False)
        )


def give_up(
    session: Session, job_id: uuid.UUID, seen: int, *, max_attempts: int, event: str, reason: str, at: dt.datetime
) -> bool:
    """No further attempt for a webhook that cannot be attempted at all (its URL is no longer allowed,
    its payload cannot be built): recorded as the next attempt with ``reason``. False when another
    sender moved the job on first."""
    taken = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.notify_attempts == seen, Job.notified_at.is_(None))
        .values(notify_attempts=max(seen + 1, max_attempts), notify_next_at=None)
        .execution_options(synchronize_session=False)
    )
    if taken.rowcount != 1:  # type: ignore[attr-defined]
        return False
    url = session.scalar(select(Job.notify_url).where(Job.id == job_id)) or ""
    last = session.scalar(select(func.max(WebhookDelivery.attempt)).where(WebhookDelivery.job_id == job_id))
    session.add(
        WebhookDelivery(
            job_id=job_id,
            attempt=max(seen, last or 0) + 1,
            event=event,
            url=url,
            at=at,
            status_code=None,
            error=reason,
            duration_ms=0.0,
            delivered=False,
        )
    )
    session.flush()
    return True


def close_abandoned(session: Session, started_before: dt.datetime) -> int:
    """Mark attempts still in flight that started before ``started_before`` (longer ago than any attempt
    may last) as abandoned: their sender stopped. Returns how many."""
    result = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.at < started_before, *_in_flight())
        .values(error=ABANDONED)
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def deliveries_of(session: Session, job_id: uuid.UUID) -> list[WebhookDelivery]:
    query = select(WebhookDelivery).where(WebhookDelivery.job_id == job_id).order_by(WebhookDelivery.attempt)
    return list(session.scalars(query))
