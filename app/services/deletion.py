"""Deleting and expiring jobs: hide the job at once, then remove its files and result rows once it stopped.

``DELETE /v1/jobs/{id}`` cancels a queued job, asks a running one to stop, and marks the job
deleted (it is gone from every read, and its Idempotency-Key is free again); a job that has stopped
is purged in the same request: the objects under ``jobs/{id}/`` and its artifact, plan, metric and
task rows, and its analysis unless another live job still uses it. A running job is purged by the
reconciler once its worker stopped it (or finished it first), and so is any purge that storage
refused: nothing is left behind, however the race goes. ``LORP_ARTIFACT_TTL_DAYS`` makes the
reconciler delete finished jobs that old the same way. The job row stays, marked, as a tombstone
with its events.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from dataclasses import dataclass

from sqlalchemy.orm import Session

from app.core.security import Principal
from app.db.base import utcnow
from app.db.models import EventKind, Job, JobStatus
from app.repositories import analyses as analyses_repo
from app.repositories import events as events_repo
from app.repositories import jobs as jobs_repo
from app.services.jobs import get_job
from app.storage import Storage
from app.storage.keys import job_prefix

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Deletion:
    job_id: uuid.UUID
    status: JobStatus
    deleted_at: dt.datetime
    purged: bool


def mark_deleted(session: Session, job_id: uuid.UUID, principal: Principal) -> Job:
    """Cancel a queued job, ask a running one to stop, and hide it (404 for a job the principal cannot
    see). The caller commits before purging: from then on a failure leaves a hidden job the
    reconciler purges, never a visible one without its files."""
    job = get_job(session, job_id, principal)
    now = utcnow()
    if jobs_repo.cancel_if_queued(session, job.id, now):
        events_repo.add_event(session, job.id, EventKind.status, status=JobStatus.cancelled.value, message="deleted")
    elif jobs_repo.request_cancel_if_running(session, job.id, now):
        events_repo.add_event(session, job.id, EventKind.cancel_requested, status=JobStatus.running.value, at=now)
    jobs_repo.mark_deleted(session, job.id, now)
    return jobs_repo.reload(session, job.id)


def purge_if_stopped(session: Session, storage: Storage, job: Job) -> Deletion:
    """Purge a deleted job now if it has stopped (a running one is the reconciler's, once it stops)."""
    purged = job.status.terminal and purge(session, storage, job)
    assert job.deleted_at is not None
    return Deletion(job.id, job.status, job.deleted_at, purged)


def purge(session: Session, storage: Storage, job: Job) -> bool:
    """Remove a stopped, deleted job's objects, then its result rows (flushed, not committed); False,
    and left for the reconciler, when storage refused."""
    try:
        storage.delete_prefix(job_prefix(job.id))
    except Exception:
        log.warning("could not remove the files of deleted job %s; the reconciler retries", job.id, exc_info=True)
        return False
    analysis_id = jobs_repo.purge_rows(session, job, utcnow())
    removed_analysis = analysis_id is not None and analyses_repo.remove_if_unused(session, analysis_id)
    log.info("purged deleted job %s%s", job.id, " and its analysis" if removed_analysis else "")
    return True


def purge_pending(session: Session, storage: Storage, *, ttl_days: float | None, limit: int = 100) -> dict[str, int]:
    """The reconciler's part: expire jobs past ``ttl_days``, then purge every deleted job that stopped."""
    counts = {"expired": 0, "purged": 0}
    if ttl_days is not None:
        cutoff = utcnow() - dt.timedelta(days=ttl_days)
        for job_id in jobs_repo.expired(session, cutoff, limit=limit):
            if jobs_repo.mark_deleted(session, job_id, utcnow()):
                events_repo.add_event(session, job_id, EventKind.status, message=f"expired after {ttl_days:g} days")
                counts["expired"] += 1
        session.commit()
    for job in jobs_repo.to_purge(session, limit=limit):
        if purge(session, storage, job):
            counts["purged"] += 1
            session.commit()
    return counts
