"""Worker liveness rows (``workers``): register, beat, stop, and who is live on which queue."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from app.db.base import as_utc, utcnow
from app.db.models import Job, JobStatus, Worker

# Rows of workers that stopped (or went silent) longer ago than this are removed at the next register.
FORGET_AFTER = dt.timedelta(days=7)


@dataclass(frozen=True)
class QueuePresence:
    """Who serves one queue: how many workers are live on it (beating and not stuck), how many beat but
    are stuck (a pool child could not start a job, and none has started since), and when one was last
    seen there."""

    queue: str
    live: int
    last_seen_at: dt.datetime | None
    stuck: int = 0


@dataclass(frozen=True)
class JobClaim:
    """What a job's row says of who started it."""

    status: JobStatus
    worker: str | None
    started_at: dt.datetime | None


def register(
    session: Session,
    *,
    name: str,
    host: str,
    pid: int,
    queues: Sequence[str],
    concurrency: int,
    pid_alive: Callable[[int], bool],
    at: dt.datetime | None = None,
    device: dict[str, Any] | None = None,
) -> uuid.UUID:
    """Record a worker that is ready to take jobs; returns its row id (the key of its beats).

    Rows that an earlier process on this host left open (killed before it could say it stopped)
    are closed when their pid is gone, so a restarted worker is not counted twice; long-stopped
    rows are removed.
    """
    now = at or utcnow()
    for row in session.scalars(select(Worker).where(Worker.host == host, Worker.stopped_at.is_(None))):
        if row.pid != pid and not pid_alive(row.pid):
            row.stopped_at, row.lost = row.beat_at, True
    session.execute(
        delete(Worker).where(Worker.beat_at < now - FORGET_AFTER).execution_options(synchronize_session=False)
    )
    worker = Worker(
        name=name,
        host=host,
        pid=pid,
        queues=list(queues),
        concurrency=concurrency,
        started_at=now,
        beat_at=now,
        lost=False,
        device=device,
    )
    session.add(worker)
    session.flush()
    return worker.id


def beat(session: Session, worker_id: uuid.UUID, at: dt.datetime | None = None) -> bool:
    """A beat; False when the row is gone or marked stopped (the worker then registers again)."""
    result = session.execute(
        update(Worker)
        .where(Worker.id == worker_id, Worker.stopped_at.is_(None))
        .values(beat_at=at or utcnow())
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def mark_stopped(session: Session, worker_id: uuid.UUID, at: dt.datetime | None = None) -> None:
    session.execute(
        update(Worker)
        .where(Worker.id == worker_id, Worker.stopped_at.is_(None))
        .values(stopped_at=at or utcnow())
        .execution_options(synchronize_session=False)
    )


def record_stuck(
    session: Session, worker_id: uuid.UUID, *, count: int, detail: str, at: dt.datetime | None = None
) -> None:
    """``count`` more pool children of this worker did not start the job they took; stuck since ``at``
    (kept when already stuck)."""
    now = at or utcnow()
    row = session.get(Worker, worker_id)
    if row is None:
        return
    row.stuck_starts = (row.stuck_starts or 0) + count
    row.stuck_since = row.stuck_since or now
    row.stuck_detail = detail[:500]
    session.flush()


def clear_stuck(session: Session, worker_id: uuid.UUID) -> None:
    """A job started on this worker again: it is no longer stuck (the count stays)."""
    session.execute(
        update(Worker)
        .where(Worker.id == worker_id)
        .values(stuck_since=None, stuck_detail=None)
        .execution_options(synchronize_session=False)
    )


def job_claims(session: Session, job_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, JobClaim]:
    """Who started each of these jobs, as their rows say."""
    if not job_ids:
        return {}
    rows = session.execute(select(Job.id, Job.status, Job.worker, Job.started_at).where(Job.id.in_(job_ids)))
    return {
        job_id: JobClaim(status, worker, None if started is None else as_utc(started))
        for job_id, status, worker, started in rows
    }


def started_since(session: Session, worker_name: str, since: dt.datetime) -> bool:
    """Whether a job was claimed by worker ``worker_name`` at or after ``since``."""
    query = select(Job.id).where(Job.worker == worker_name, Job.started_at >= since).limit(1)
    return session.scalars(query).first() is not None


def live_workers(session: Session, timeout_s: float, now: dt.datetime | None = None) -> list[Worker]:
    """Workers not stopped whose last beat is newer than ``timeout_s``, newest beat first."""
    cutoff = (now or utcnow()) - dt.timedelta(seconds=timeout_s)
    query = select(Worker).where(Worker.stopped_at.is_(None), Worker.beat_at >= cutoff)
    return list(session.scalars(query.order_by(Worker.beat_at.desc())))


def presence(session: Session, queue: str, timeout_s: float, now: dt.datetime | None = None) -> QueuePresence:
    """How many live workers consume ``queue``, and the last time any worker on it was seen."""
    now = now or utcnow()
    cutoff = now - dt.timedelta(seconds=timeout_s)
    live = stuck = 0
    last: dt.datetime | None = None
    for row in session.scalars(select(Worker).where(Worker.beat_at >= now - FORGET_AFTER)):
        if queue not in (row.queues or []):
            continue
        seen = as_utc(row.stopped_at or row.beat_at)
        last = seen if last is None or seen > last else last
        if row.stopped_at is None and as_utc(row.beat_at) >= cutoff:
            if row.stuck:
                stuck += 1
            else:
                live += 1
    return QueuePresence(queue=queue, live=live, last_seen_at=last, stuck=stuck)


def lost_by_queue(
    session: Session, since: dt.datetime, timeout_s: float, now: dt.datetime | None = None
) -> dict[str, dt.datetime]:
    """For each queue, the last beat of a worker on it that died without a warm stop since ``since``.

    Such a worker may have held a job's message (prefetched, or running when it was killed): the
    reconciler sends again the queued jobs on that queue whose message went out before it died.
    A worker is taken for dead when its row was closed as lost, or its beats are ``timeout_s`` old.
    """
    now = now or utcnow()
    silent_since = now - dt.timedelta(seconds=timeout_s)
    found: dict[str, dt.datetime] = {}
    for row in session.scalars(select(Worker).where(Worker.beat_at >= since)):
        beat_at = as_utc(row.beat_at)
        if not (row.lost or (row.stopped_at is None and beat_at < silent_since)):
            continue
        for queue in row.queues or []:
            if queue not in found or beat_at > found[queue]:
                found[queue] = beat_at
    return found


def capacity_by_queue(
    session: Session, timeout_s: float, now: dt.datetime | None = None, *, started_before: dt.datetime | None = None
) -> dict[str, int]:
    """Per queue, the job slots (pool concurrency) of the live workers that consume it; with
    ``started_before``, only of those that registered before then."""
    slots: dict[str, int] = {}
    for row in live_workers(session, timeout_s, now):
        if started_before is not None and as_utc(row.started_at) >= started_before:
            continue
        for queue in row.queues or []:
            slots[queue] = slots.get(queue, 0) + max(row.concurrency, 0)
    return slots


def live_by_queue(session: Session, timeout_s: float, now: dt.datetime | None = None) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in live_workers(session, timeout_s, now):
        for queue in row.queues or []:
            counts[queue] = counts.get(queue, 0) + 1
    return counts


@dataclass(frozen=True)
class QueueStarts:
    """Per queue: live workers stuck now, and the stuck starts the live workers have recorded."""

    stuck_workers: int = 0
    stuck_starts: int = 0


def starts_by_queue(session: Session, timeout_s: float, now: dt.datetime | None = None) -> dict[str, QueueStarts]:
    found: dict[str, QueueStarts] = {}
    for row in live_workers(session, timeout_s, now):
        for queue in row.queues or []:
            seen = found.get(queue, QueueStarts())
            found[queue] = QueueStarts(seen.stuck_workers + int(row.stuck), seen.stuck_starts + (row.stuck_starts or 0))
    return found
