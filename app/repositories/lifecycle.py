"""Every SQL statement of a job's life after submission: claim, progress, heartbeat, finish, reconcile.

State changes are conditional UPDATEs on the job row, fenced by the attempt number the worker
claimed: a worker whose job was taken away (requeued by the reconciler after a missed heartbeat, or
cancelled) finds its writes matching no row instead of overwriting another attempt's state. These
functions only flush; ``session_scope`` commits.

They see deleted jobs too (what shows jobs reads ``jobs.live_jobs``): a job deleted while running is
still stopped, requeued or finished here. The analysis a job stores and the dataset it reads are
``app.repositories.analyses``' and ``app.repositories.datasets``'.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import ColumnElement, and_, case, func, or_, select, update
from sqlalchemy.orm import Session, aliased

from app.db.base import as_utc, utcnow
from app.db.models import (
    DONE_STAGE,
    ApiKey,
    Artifact,
    EventKind,
    Job,
    JobStatus,
    Metric,
    Plan,
    TaskMetric,
)
from app.repositories.events import add_event
from app.repositories.jobs import delete_results, lock_owner

MAX_ERROR_MESSAGE = 4000


@dataclass(frozen=True)
class PlanRow:
    """One candidate plan of a finished job."""

    name: str
    k: int | None
    pruned_layers: list[int]
    validation_perplexity: float | None
    chosen: bool


@dataclass(frozen=True)
class MetricRow:
    """One measured value: ``phase`` is dense, pruned or ratio."""

    name: str
    phase: str
    value: float | None
    unit: str | None


@dataclass(frozen=True)
class TaskMetricRow:
    """One downstream task's metric: ``phase`` is dense or pruned."""

    task: str
    metric: str
    phase: str
    value: float | None
    stderr: float | None
    num_samples: int
    num_fewshot: int | None


@dataclass(frozen=True)
class ArtifactRow:
    """One uploaded output file."""

    name: str
    storage_key: str
    size_bytes: int
    sha256: str
    content_type: str


def _owned(job_id: uuid.UUID, attempt: int) -> list[Any]:
    # The fencing condition: still running, and still the attempt this worker claimed.
    return [Job.id == job_id, Job.status == JobStatus.running, Job.attempts == attempt]


def _limited_owner(session: Session, job_id: uuid.UUID) -> uuid.UUID | None:
    """The job's owner when the per-key limits apply to it: a key that is not an admin's."""
    row = session.execute(
        select(Job.owner_id, ApiKey.is_admin).outerjoin(ApiKey, ApiKey.id == Job.owner_id).where(Job.id == job_id)
    ).one_or_none()
    if row is None or row.owner_id is None or row.is_admin:
        return None
    return row.owner_id


def claim(session: Session, job_id: uuid.UUID, worker: str, *, max_running_per_owner: int | None = None) -> Job | None:
    """Move a queued job to running for this worker; None if it is not claimable (a duplicate delivery,
    or its owner already runs ``max_running_per_owner`` jobs: see :func:`defer`).

    One conditional UPDATE: of two deliveries racing for the same job, exactly one matches the row.
    The owner's running count is read under a lock on that owner held to the commit, so two claims of
    one owner's jobs cannot both take its last slot.
    """
    if max_running_per_owner is not None:
        owner = _limited_owner(session, job_id)
        if owner is not None:
            lock_owner(session, owner, "running")
            running = session.scalar(
                select(func.count()).select_from(Job).where(Job.owner_id == owner, Job.status == JobStatus.running)
            )
            if int(running or 0) >= max_running_per_owner:
                return None
    now = utcnow()
    stmt = (
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.queued, Job.cancel_requested_at.is_(None))
        .values(
            status=JobStatus.running,
            attempts=Job.attempts + 1,
            worker=worker[:255],
            started_at=now,
            heartbeat_at=now,
            progress_at=now,
            stage=None,
            progress=0.0,
            error_code=None,
            error_message=None,
            finished_at=None,
        )
        .returning(Job)
        .execution_options(populate_existing=True)
    )
    job = session.scalars(stmt).one_or_none()
    if job is None:
        return None
    add_event(
        session, job_id, EventKind.status, status=JobStatus.running.value, message=f"attempt {job.attempts} on {worker}"
    )
    return job


def defer(session: Session, job_id: uuid.UUID) -> bool:
    """A job the claim left queued (its owner is at the running limit) waits for a message sent later.

    Its message is spent, so it is marked unsent (``enqueued_at`` NULL): the reconciler sends it again
    once its owner has a free slot (:func:`stale_queued`). No attempt was used. False when the job is
    not queued any more (another delivery claimed it, it was cancelled) or a cancel awaits it.
    """
    found = session.scalars(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.queued, Job.cancel_requested_at.is_(None))
        .values(enqueued_at=None)
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    ).one_or_none()
    return found is not None


def cancel_if_requested_while_queued(session: Session, job_id: uuid.UUID) -> bool:
    """A queued job whose cancellation was asked for ends cancelled without running."""
    now = utcnow()
    done = session.scalars(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.queued, Job.cancel_requested_at.is_not(None))
        .values(status=JobStatus.cancelled, finished_at=now)
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    ).one_or_none()
    if done is None:
        return False
    add_event(
        session, job_id, EventKind.status, status=JobStatus.cancelled.value, message="cancelled before it started"
    )
    return True


def heartbeat(session: Session, job_id: uuid.UUID, attempt: int) -> bool:
    """Record that the worker is alive; False when the job is no longer this attempt's to run."""
    found = session.scalars(
        update(Job)
        .where(*_owned(job_id, attempt))
        .values(heartbeat_at=utcnow())
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    ).one_or_none()
    return found is not None


def set_progress(session: Session, job_id: uuid.UUID, attempt: int, stage: str, progress: float) -> bool:
    """Write the current stage and overall progress (0..1); False when the job is no longer ours."""
    now = utcnow()
    found = session.scalars(
        update(Job)
        .where(*_owned(job_id, attempt))
        .values(stage=stage, progress=min(max(progress, 0.0), 1.0), progress_at=now, heartbeat_at=now)
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    ).one_or_none()
    return found is not None


@dataclass(frozen=True)
class RunState:
    """What a running worker needs to know at a checkpoint."""

    cancel_requested: bool
    owned: bool  # still running under this attempt
    status: JobStatus | None  # None: the job row is gone
    same_attempt: bool = False  # the row's attempt is this one, whatever its status


def run_state(session: Session, job_id: uuid.UUID, attempt: int) -> RunState:
    row = session.execute(
        select(Job.cancel_requested_at, Job.status, Job.attempts).where(Job.id == job_id)
    ).one_or_none()
    if row is None:  # deleted under us
        return RunState(cancel_requested=True, owned=False, status=None)
    cancel_at, status, attempts = row
    return RunState(
        cancel_requested=cancel_at is not None,
        owned=status == JobStatus.running and attempts == attempt,
        status=status,
        same_attempt=attempts == attempt,
    )


def _truncate(message: str) -> str:
    return message if len(message) <= MAX_ERROR_MESSAGE else message[: MAX_ERROR_MESSAGE - 3] + "..."


def finish_succeeded(
    session: Session,
    job_id: uuid.UUID,
    attempt: int,
    *,
    analysis_id: uuid.UUID | None,
    analysis_reused: bool,
    chosen_method: str | None,
    pruned_layers: list[int],
    plans: Sequence[PlanRow],
    metrics: Sequence[MetricRow],
    artifacts: Sequence[ArtifactRow],
    summary: dict[str, Any],
    task_metrics: Sequence[TaskMetricRow] = (),
) -> bool:
    """Publish a finished job: status, plans, metrics, artifacts and summary in one transaction.

    Refused (False) when the job is no longer this attempt's or a cancellation was requested
    meanwhile; the caller then treats the run as cancelled or lost.
    """
    now = utcnow()
    found = session.scalars(
        update(Job)
        .where(*_owned(job_id, attempt), Job.cancel_requested_at.is_(None))
        .values(
            status=JobStatus.succeeded,
            stage=DONE_STAGE,
            progress=1.0,
            progress_at=now,
            finished_at=now,
            analysis_id=analysis_id,
            analysis_reused=analysis_reused,
            chosen_method=chosen_method,
            pruned_layers=list(pruned_layers),
            summary=summary,
            error_code=None,
            error_message=None,
        )
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    ).one_or_none()
    if found is None:
        return False
    # Rows can only exist from an earlier attempt if it published, which ends the job; clearing them
    # keeps a retry from ever showing a mixed set.
    delete_results(session, job_id)
    # Each row's fields are its table's columns (PlanRow: plans, ...).
    for model, rows in ((Plan, plans), (Metric, metrics), (TaskMetric, task_metrics), (Artifact, artifacts)):
        session.add_all(model(job_id=job_id, **asdict(row)) for row in rows)
    add_event(session, job_id, EventKind.status, status=JobStatus.succeeded.value)
    return True


def finish_failed(session: Session, job_id: uuid.UUID, attempt: int, code: str, message: str) -> bool:
    """Mark this attempt's job failed with a code and a message a person can act on."""
    now = utcnow()
    found = session.scalars(
        update(Job)
        .where(*_owned(job_id, attempt))
        .values(status=JobStatus.failed, finished_at=now, error_code=code[:64], error_message=_truncate(message))
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    ).one_or_none()
    if found is None:
        return False
    add_event(session, job_id, EventKind.status, status=JobStatus.failed.value, message=f"{code}: {_truncate(message)}")
    return True


def finish_cancelled(session: Session, job_id: uuid.UUID, attempt: int) -> bool:
    """Mark this attempt's job cancelled."""
    now = utcnow()
    found = session.scalars(
        update(Job)
        .where(*_owned(job_id, attempt))
        .values(status=JobStatus.cancelled, finished_at=now)
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    ).one_or_none()
    if found is None:
        return False
    add_event(session, job_id, EventKind.status, status=JobStatus.cancelled.value, message="cancelled while running")
    return True


# -- reconciler -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueueActivity:
    """What a queue's jobs say of its consumers: jobs running now, the latest claim or end (a slot
    taken or freed), and the latest send time among the jobs claimed before a cutoff (a queued job sent
    before that was passed over)."""

    running: int = 0
    last_change: dt.datetime | None = None
    last_claimed_send: dt.datetime | None = None


def queue_activity(session: Session, claimed_before: dt.datetime) -> dict[str, QueueActivity]:
    """Per queue: :class:`QueueActivity`, ``last_claimed_send`` counting claims made before ``claimed_before``."""
    claimed = and_(Job.status != JobStatus.queued, Job.started_at.is_not(None), Job.started_at < claimed_before)
    stmt = (
        select(
            Job.queue,
            func.sum(case((Job.status == JobStatus.running, 1), else_=0)),
            func.max(Job.started_at),
            func.max(Job.finished_at),
            func.max(case((claimed, Job.enqueued_at), else_=None)),
        )
        .where(or_(Job.started_at.is_not(None), Job.finished_at.is_not(None), Job.status == JobStatus.running))
        .group_by(Job.queue)
    )
    found = {}
    for queue, running, started, finished, sent in session.execute(stmt):
        changes = [as_utc(t) for t in (started, finished) if t is not None]
        found[queue] = QueueActivity(
            running=int(running or 0),
            last_change=max(changes, default=None),
            last_claimed_send=as_utc(sent) if sent is not None else None,
        )
    return found


def _due(job: Any, lost_before: dict[str, dt.datetime], unenqueued_before: dt.datetime | None) -> ColumnElement[bool]:
    """Queued, and never sent (and submitted before ``unenqueued_before``) or sent on a queue of
    ``lost_before`` before that queue's time."""
    never: ColumnElement[bool] = job.enqueued_at.is_(None)
    if unenqueued_before is not None:
        never = and_(never, job.queued_at < unenqueued_before)
    lost = [and_(job.queue == queue, job.enqueued_at < before) for queue, before in sorted(lost_before.items())]
    return and_(job.status == JobStatus.queued, or_(never, *lost))


def stale_queued(
    session: Session,
    lost_before: dict[str, dt.datetime],
    *,
    unenqueued_before: dt.datetime | None = None,
    limit: int = 100,
    max_running_per_owner: int | None = None,
) -> list[tuple[uuid.UUID, str]]:
    """(id, queue) of queued jobs whose message is presumed lost: sent on a queue of ``lost_before``
    before that queue's time (the reconciler decides which queues and times), or never sent (and
    queued before ``unenqueued_before``).

    The rows are locked, skipping rows another reconciler holds. ``unenqueued_before`` gives the API
    a moment between committing a job and recording its enqueue. With ``max_running_per_owner``, an
    owner's jobs are left out beyond its free running slots (its oldest first): sending them would
    only see them deferred again (:func:`defer`). The anonymous owner and admin keys have no limit.
    """
    stmt = select(Job.id, Job.queue).where(_due(Job, lost_before, unenqueued_before))
    if max_running_per_owner is not None:
        due, running = aliased(Job), aliased(Job)
        running_now = (
            select(func.count())
            .where(running.owner_id == due.owner_id, running.status == JobStatus.running)
            .correlate(due)
            .scalar_subquery()
        )
        ranked = (
            select(
                due.id,
                due.owner_id,
                func.row_number().over(partition_by=due.owner_id, order_by=(due.queued_at, due.id)).label("rank"),
                running_now.label("running"),
            )
            .where(_due(due, lost_before, unenqueued_before))
            .subquery()
        )
        admins = select(ApiKey.id).where(ApiKey.is_admin.is_(True))
        sendable = select(ranked.c.id).where(
            or_(
                ranked.c.owner_id.is_(None),
                ranked.c.owner_id.in_(admins),
                ranked.c.rank + ranked.c.running <= max_running_per_owner,
            )
        )
        stmt = stmt.where(Job.id.in_(sendable))
    stmt = stmt.order_by(Job.queued_at).limit(limit).with_for_update(skip_locked=True)
    return [(job_id, queue) for job_id, queue in session.execute(stmt)]


def queued_sent_before(session: Session, queue: str, before: dt.datetime, *, limit: int = 100) -> list[uuid.UUID]:
    """Queued jobs on ``queue`` whose message was sent at or before ``before``; locked, skipping rows others hold."""
    stmt = (
        select(Job.id)
        .where(
            Job.status == JobStatus.queued,
            Job.queue == queue,
            Job.enqueued_at.is_not(None),
            Job.enqueued_at <= before,
        )
        .order_by(Job.queued_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return list(session.scalars(stmt))


def running_attempt_started_before(session: Session, job_id: uuid.UUID, before: dt.datetime) -> int | None:
    """The attempt of ``job_id`` that still runs and started before ``before``; None when there is none."""
    return session.scalars(
        select(Job.attempts).where(Job.id == job_id, Job.status == JobStatus.running, Job.started_at < before)
    ).one_or_none()


def stale_running(session: Session, heartbeat_older_than: dt.datetime, *, limit: int = 100) -> list[Job]:
    """Running jobs whose heartbeat stopped before the cutoff; locked, skipping rows others hold."""
    stmt = (
        select(Job)
        .where(
            Job.status == JobStatus.running,
            or_(
                Job.heartbeat_at < heartbeat_older_than,
                Job.heartbeat_at.is_(None) & (Job.started_at < heartbeat_older_than),
            ),
        )
        .order_by(Job.heartbeat_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return list(session.scalars(stmt))


def stalled_running(session: Session, progress_older_than: dt.datetime, *, limit: int = 100) -> list[Job]:
    """Running jobs whose progress last moved before the cutoff (heartbeat or not); locked, skipping
    rows others hold. A live heartbeat with no progress is a hung job: a deadlock, a stuck read."""
    stmt = (
        select(Job)
        .where(Job.status == JobStatus.running, Job.progress_at < progress_older_than)
        .order_by(Job.progress_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return list(session.scalars(stmt))


def mark_enqueued(session: Session, job_id: uuid.UUID) -> bool:
    """Record that a run message for the queued job was just sent."""
    found = session.scalars(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.queued)
        .values(enqueued_at=utcnow())
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    ).one_or_none()
    return found is not None


def requeue(session: Session, job_id: uuid.UUID, attempt: int, reason: str) -> bool:
    """Put a running job whose worker vanished back in the queue for another attempt."""
    found = session.scalars(
        update(Job)
        .where(*_owned(job_id, attempt))
        .values(
            status=JobStatus.queued,
            stage=None,
            progress=0.0,
            worker=None,
            heartbeat_at=None,
            enqueued_at=None,
        )
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    ).one_or_none()
    if found is None:
        return False
    add_event(session, job_id, EventKind.attempt, status=JobStatus.queued.value, message=_truncate(reason))
    return True
