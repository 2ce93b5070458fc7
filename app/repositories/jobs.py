"""Queries on jobs, their events, plans, metrics and artifacts.

A deleted job stays as a tombstone row (``deleted_at`` set). Whatever shows or counts jobs reads
them through :func:`live_jobs` or :data:`LIVE` so that a deleted one is never among them. The
worker's and the reconciler's queries (``app.repositories.lifecycle``) see every job: a deleted job
that was running must still be stopped and purged.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from collections.abc import Sequence

from sqlalchemy import ColumnElement, Select, and_, delete, func, or_, select, text, true, update
from sqlalchemy.orm import InstrumentedAttribute, Session

from app.core.security import Principal
from app.db.base import as_utc
from app.db.models import Artifact, EventKind, Job, JobEvent, JobStatus, Metric, Plan, TaskMetric

LIVE: ColumnElement[bool] = Job.deleted_at.is_(None)
"""The condition of a job not deleted, for counts and aggregates; :func:`live_jobs` for rows."""


def live_jobs() -> Select[Job]:
    """The base query of every read that shows jobs: the ones not deleted."""
    return select(Job).where(LIVE)


def count_live(session: Session, *criteria: ColumnElement[bool]) -> int:
    """How many jobs not deleted match ``criteria``."""
    return int(session.scalar(select(func.count()).select_from(Job).where(LIVE, *criteria)) or 0)


def owned_by(column: InstrumentedAttribute[uuid.UUID | None], principal: Principal) -> ColumnElement[bool]:
    """Rows the principal may see: all for an admin, else its own (NULL-owned for the anonymous owner)."""
    if principal.is_admin:
        return true()
    if principal.owner_id is None:
        return column.is_(None)
    return column == principal.owner_id


def get_visible(session: Session, job_id: uuid.UUID, principal: Principal) -> Job | None:
    """The job if the principal may see it and it is not deleted."""
    stmt = live_jobs().where(Job.id == job_id, owned_by(Job.owner_id, principal))
    return session.scalars(stmt.execution_options(populate_existing=True)).one_or_none()


def owner_of(session: Session, job_id: uuid.UUID) -> uuid.UUID | None:
    """The key that owns the job, deleted or not (None: the anonymous owner, or no such job)."""
    return session.scalar(select(Job.owner_id).where(Job.id == job_id))


def get_by_idempotency_key(session: Session, owner_id: uuid.UUID | None, key: str) -> Job | None:
    """The owner's job submitted with this Idempotency-Key: only a live one, as deleting clears the key."""
    owner = Job.owner_id.is_(None) if owner_id is None else Job.owner_id == owner_id
    stmt = select(Job).where(owner, Job.idempotency_key == key).order_by(Job.created_at).limit(1)
    return session.scalars(stmt.execution_options(populate_existing=True)).first()


def lock_idempotency_key(session: Session, owner_id: uuid.UUID | None, key: str) -> None:
    """Serialize submissions that carry the same (owner, Idempotency-Key) until this transaction ends.

    The second submission then finds the first one's job instead of failing its insert. The database
    enforces the rule regardless: a unique constraint for owners and a partial unique index for the
    anonymous owner (NULLs are distinct in a unique constraint); the caller handles the violation.
    """
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        digest = hashlib.sha256(f"lorp-idempotency:{owner_id}:{key}".encode()).digest()
        session.execute(select(func.pg_advisory_xact_lock(int.from_bytes(digest[:8], "big", signed=True))))
    elif dialect == "sqlite":
        # SQLite has one writer at a time: a (no-op) write takes the write lock now, so the check
        # that follows and the insert run as one unit.
        session.execute(text("UPDATE jobs SET idempotency_key = idempotency_key WHERE 1 = 0"))


def lock_owner(session: Session, owner_id: uuid.UUID, purpose: str) -> None:
    """Serialize, until this transaction ends, what counts one owner's jobs and then adds to them
    (``purpose``: "queued" for submissions, "running" for claims), so two at once cannot both pass
    a limit. On SQLite, one writer at a time: taking the write lock now is the same."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        digest = hashlib.sha256(f"lorp-owner-{purpose}:{owner_id}".encode()).digest()
        session.execute(select(func.pg_advisory_xact_lock(int.from_bytes(digest[:8], "big", signed=True))))
    elif dialect == "sqlite":
        session.execute(text("UPDATE jobs SET owner_id = owner_id WHERE 1 = 0"))


def queued_count(session: Session, owner_id: uuid.UUID) -> int:
    """How many of the owner's jobs wait in the queue (deleted ones left out)."""
    return count_live(session, Job.owner_id == owner_id, Job.status == JobStatus.queued)


def add_job(session: Session, job: Job) -> Job:
    session.add(job)
    session.flush()
    return job


def list_jobs(
    session: Session,
    principal: Principal,
    *,
    status: JobStatus | None,
    model: str | None,
    after: tuple[dt.datetime, uuid.UUID] | None,
    limit: int,
) -> list[Job]:
    """Newest first; ``after`` is the (created_at, id) of the last row of the previous page."""
    stmt = live_jobs().where(owned_by(Job.owner_id, principal))
    if status is not None:
        stmt = stmt.where(Job.status == status)
    if model is not None:
        stmt = stmt.where(Job.model_source == model)
    if after is not None:
        created_at, job_id = after
        stmt = stmt.where(or_(Job.created_at < created_at, and_(Job.created_at == created_at, Job.id < job_id)))
    stmt = stmt.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)
    return list(session.scalars(stmt))


def cancel_if_queued(session: Session, job_id: uuid.UUID, at: dt.datetime) -> bool:
    """queued -> cancelled in one conditional UPDATE, so a worker's claim and a cancel cannot both win."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.queued)
        .values(status=JobStatus.cancelled, cancel_requested_at=at, finished_at=at, updated_at=at, progress_at=at)
        .execution_options(synchronize_session=False)
    )
    return bool(getattr(result, "rowcount", 0))


def request_cancel_if_running(session: Session, job_id: uuid.UUID, at: dt.datetime) -> bool:
    """Ask a running job to stop at its next checkpoint; keeps the first request's time."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.running)
        .values(cancel_requested_at=func.coalesce(Job.cancel_requested_at, at), updated_at=at)
        .execution_options(synchronize_session=False)
    )
    return bool(getattr(result, "rowcount", 0))


def reload(session: Session, job_id: uuid.UUID) -> Job:
    stmt = select(Job).where(Job.id == job_id).execution_options(populate_existing=True)
    return session.scalars(stmt).one()


def plans_for(session: Session, job_id: uuid.UUID) -> list[Plan]:
    return list(session.scalars(select(Plan).where(Plan.job_id == job_id).order_by(Plan.name)))


def metrics_for(session: Session, job_id: uuid.UUID) -> list[Metric]:
    return list(session.scalars(select(Metric).where(Metric.job_id == job_id).order_by(Metric.phase, Metric.name)))


def task_metrics_for(session: Session, job_id: uuid.UUID) -> list[TaskMetric]:
    query = select(TaskMetric).where(TaskMetric.job_id == job_id)
    return list(session.scalars(query.order_by(TaskMetric.task, TaskMetric.metric, TaskMetric.phase)))


def artifacts_for(session: Session, job_id: uuid.UUID) -> list[Artifact]:
    return list(session.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)))


def artifact_by_name(session: Session, job_id: uuid.UUID, name: str) -> Artifact | None:
    stmt = select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name)
    return session.scalars(stmt).one_or_none()


def count_by_status(session: Session) -> dict[str, int]:
    """Jobs per status, deleted ones left out."""
    rows = session.execute(select(Job.status, func.count()).where(LIVE).group_by(Job.status)).all()
    return {str(JobStatus(status).value): int(count) for status, count in rows}


def queued_by_queue(session: Session) -> dict[str, int]:
    """How many jobs are queued on each broker queue."""
    rows = session.execute(select(Job.queue, func.count()).where(Job.status == JobStatus.queued).group_by(Job.queue))
    return {str(queue): int(count) for queue, count in rows.all()}


def oldest_queued_by_queue(session: Session) -> dict[str, dt.datetime]:
    """For each queue holding queued jobs: when its longest-waiting one was submitted."""
    rows = session.execute(
        select(Job.queue, func.min(Job.queued_at)).where(Job.status == JobStatus.queued).group_by(Job.queue)
    ).all()
    # SQLite hands back naive datetimes; every stored time is UTC.
    return {str(q): as_utc(t) for q, t in rows if t is not None}


def stage_spans(session: Session, since: dt.datetime) -> Sequence[tuple[str, dt.datetime, dt.datetime]]:
    """(stage, started, ended) for every stage that ended since ``since``.

    A stage starts at its ``stage`` event and ends at the job's next event of any kind (the next
    stage, or the final status).
    """
    # The window function's result type must be given: untyped, SQLite hands back its text form.
    next_at = func.lead(JobEvent.at, type_=JobEvent.at.type).over(
        partition_by=JobEvent.job_id, order_by=(JobEvent.at, JobEvent.id)
    )
    inner = (
        select(JobEvent.kind, JobEvent.stage, JobEvent.at, next_at.label("next_at"))
        .where(JobEvent.at >= since)
        .subquery()
    )
    stmt = select(inner.c.stage, inner.c.at, inner.c.next_at).where(
        inner.c.kind == EventKind.stage.value, inner.c.stage.is_not(None), inner.c.next_at.is_not(None)
    )
    return [(str(stage), started, ended) for stage, started, ended in session.execute(stmt).all()]


# -- deletion ---------------------------------------------------------------------------------------


def mark_deleted(session: Session, job_id: uuid.UUID, at: dt.datetime) -> bool:
    """Hide the job from now on and free its Idempotency-Key; False when it was deleted already."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, LIVE)
        .values(deleted_at=at, idempotency_key=None)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def to_purge(session: Session, *, limit: int) -> list[Job]:
    """Deleted jobs that have stopped and whose files and result rows are not removed yet; locked."""
    stmt = (
        select(Job)
        .where(
            Job.deleted_at.is_not(None),
            Job.purged_at.is_(None),
            Job.status.in_([JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled]),
        )
        .order_by(Job.deleted_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return list(session.scalars(stmt))


def expired(session: Session, finished_before: dt.datetime, *, limit: int) -> list[uuid.UUID]:
    """Finished, not deleted jobs that finished before ``finished_before`` (LORP_ARTIFACT_TTL_DAYS)."""
    stmt = (
        select(Job.id)
        .where(
            LIVE,
            Job.finished_at.is_not(None),
            Job.finished_at < finished_before,
            Job.status.in_([JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled]),
        )
        .order_by(Job.finished_at)
        .limit(limit)
    )
    return list(session.scalars(stmt))


def delete_results(session: Session, job_id: uuid.UUID) -> None:
    """Remove the job's result rows: artifacts, plans, metrics and task scores."""
    for model in (Artifact, Plan, Metric, TaskMetric):
        session.execute(delete(model).where(model.job_id == job_id).execution_options(synchronize_session=False))


def purge_rows(session: Session, job: Job, at: dt.datetime) -> uuid.UUID | None:
    """Remove a deleted job's result rows and unlink its analysis; mark it purged. Returns the
    analysis it used (``analyses.remove_if_unused`` decides whether that goes too)."""
    delete_results(session, job.id)
    analysis_id = job.analysis_id
    job.analysis_id, job.purged_at = None, at
    session.flush()
    return analysis_id
