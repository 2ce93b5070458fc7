"""The reconciler: no job stays queued without a message, and none stays running without a worker.

The broker only carries "run job X", so a message can be lost (a broker restart, an enqueue that
failed after the commit). Each pass re-enqueues queued jobs that were never enqueued, or whose
message is older than ``queued_timeout_s`` and presumed lost: its queue sat idle with a free slot,
or a message sent after it was taken first (:func:`presumed_lost_before`; a message waiting behind a
backlog is left alone, and a duplicate is refused by the claim), and takes back running jobs whose
heartbeat is older than ``heartbeat_timeout_s`` (the worker died) or whose progress has not moved
for ``stall_timeout_s`` (the worker lives but the job hangs): requeued while attempts remain, else
failed with ``worker_lost`` or ``stalled``; after an outage of the database (nobody could beat),
only once each timeout has passed again since it came back (:class:`OutageWatch`). A worker that
died without a warm stop (its liveness beats went silent, or its restart found its process gone) may
have held a queued job's message, prefetched: the queued jobs on its queue whose message went out
before it counted as dead are sent again at once, rather than after ``queued_timeout_s``. Rows are
locked with SKIP LOCKED and every change is a conditional update, so passes may run concurrently.
Each pass also expires jobs past ``artifact_ttl_days`` and purges deleted jobs once they stopped
(``app.services.deletion``). Webhooks go out from a dispatcher of their own (``worker.webhooks``),
so a slow receiver never delays a pass.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid

from sqlalchemy.orm import Session, sessionmaker

from app import job_errors
from app.core.config import Settings
from app.db.base import utcnow
from app.db.models import Job
from app.db.session import session_factory, session_scope
from app.queue import enqueue_job
from app.repositories import lifecycle
from app.repositories import workers as workers_repo
from worker.failures import is_database_outage

log = logging.getLogger(__name__)

BATCH = 100
# A job the API committed a moment ago may not be enqueued yet; leave it this long first.
ENQUEUE_GRACE_S = 10.0


def _worker_lost_message(job_attempts: int, max_attempts: int, worker: str | None, heartbeat_at: object) -> str:
    return (
        f"the worker running this job ({worker or 'unknown'}) stopped sending heartbeats (last at {heartbeat_at}) "
        f"on attempt {job_attempts} of {max_attempts}, so it was not retried again. Check that worker's logs "
        "(killed for memory? machine lost?) and submit the job again, perhaps with a smaller batch_size."
    )


def _remove_outputs(settings: Settings, job_ids: list[uuid.UUID]) -> None:
    if not job_ids:
        return
    from app.storage import artifact_store
    from app.storage.keys import job_prefix

    try:
        storage = artifact_store(settings)
        for job_id in job_ids:
            storage.delete_prefix(job_prefix(job_id))
    except Exception:
        # Leftover objects without artifact rows are invisible to clients; the next run overwrites them.
        log.warning("could not remove partial outputs of %s", [str(j) for j in job_ids], exc_info=True)


def _send_locked(
    session: Session, settings: Settings, job_id: uuid.UUID, queue: str, counts: dict[str, int], counter: str
) -> bool:
    """Send a queued job whose row this pass holds locked (a concurrent pass skips it rather than send it
    too) and note when; False when the broker refused, so the caller stops and the next pass retries."""
    try:
        enqueue_job(job_id, settings, queue)
    except Exception:
        counts["enqueue_errors"] += 1
        log.warning("could not enqueue job %s; the next pass retries", job_id, exc_info=True)
        return False
    lifecycle.mark_enqueued(session, job_id)
    counts[counter] += 1
    return True


def _take_back(
    session: Session,
    job: Job,
    counts: dict[str, int],
    finished: list[uuid.UUID],
    requeued: list[tuple[uuid.UUID, str]],
    reason: str,
    failure: tuple[str, str],
) -> None:
    """A running job taken back from its worker (silent or stuck): cancelled when a cancel was asked,
    else queued again with ``reason`` while it has attempts left, else failed with ``failure`` (code,
    message). Each change is fenced by the attempt, so one that another writer made first counts nothing."""
    if job.cancel_requested_at is not None:
        if lifecycle.finish_cancelled(session, job.id, job.attempts):
            counts["cancelled"] += 1
            finished.append(job.id)
    elif job.attempts < job.max_attempts:
        if lifecycle.requeue(session, job.id, job.attempts, reason):
            counts["requeued"] += 1
            requeued.append((job.id, job.queue))
            log.warning("job %s: %s", job.id, reason)
    else:
        code, message = failure
        if lifecycle.finish_failed(session, job.id, job.attempts, code, message):
            counts["failed"] += 1
            finished.append(job.id)
            log.error("job %s failed: %s", job.id, message)


def reconcile_once(
    settings: Settings, *, now: dt.datetime | None = None, database_back_at: dt.datetime | None = None
) -> dict[str, int]:
    """One reconciliation pass; returns how many jobs were enqueued, requeued, failed and cancelled.

    ``database_back_at``: when this reconciler last reached the database again after an outage
    (:class:`OutageWatch`). Nobody could record a heartbeat or progress while it was away, so their
    absence is judged again only a whole ``LORP_HEARTBEAT_TIMEOUT_S`` (``LORP_STALL_TIMEOUT_S``)
    after it came back: a live worker has beaten by then, and the jobs that waited the outage out
    (``worker.retries``) are not taken back to run again. Workers' liveness beats likewise: queued
    jobs are not sent again for workers that only look dead until ``LORP_WORKER_TIMEOUT_S`` has passed.
    """
    factory = session_factory(settings.sqlalchemy_url)
    now = now or utcnow()
    counts = {
        "enqueued": 0,
        "requeued": 0,
        "failed": 0,
        "cancelled": 0,
        "stalled": 0,
        "resent_after_lost_worker": 0,
        "enqueue_errors": 0,
    }
    finished: list[uuid.UUID] = []
    requeued: list[tuple[uuid.UUID, str]] = []
    with session_scope(factory) as session:
        _take_back_running(session, settings, now, counts, finished, requeued, database_back_at)
    _remove_outputs(settings, finished)
    _send_requeued(settings, factory, requeued, counts)
    if _judged(now, database_back_at, settings.worker_timeout_s):  # workers could not beat either
        _resend_after_lost_workers(settings, factory, now, counts)
    _send_due_queued(settings, factory, now, counts)
    counts.update(_purge_deleted(settings, factory))
    if any(counts.values()):
        log.info("reconcile: %s", counts)
    return counts


def _judged(now: dt.datetime, database_back_at: dt.datetime | None, timeout_s: float) -> bool:
    """Whether a silence of ``timeout_s`` means anything: a whole timeout has passed since the database
    came back (or it was never away), so whoever is alive has written since."""
    return database_back_at is None or (now - database_back_at).total_seconds() >= timeout_s


class OutageWatch:
    """Runs reconciliation passes and remembers when the database came back after this reconciler
    failed to reach it: the first pass that reaches it again marks the time (``reconcile_once``'s
    ``database_back_at``). A pass that fails for another reason changes nothing."""

    def __init__(self) -> None:
        self.back_at: dt.datetime | None = None
        self._away = False

    def run(self, settings: Settings, now: dt.datetime | None = None) -> dict[str, int]:
        now = now or utcnow()
        back_at = now if self._away else self.back_at
        try:
            counts = reconcile_once(settings, now=now, database_back_at=back_at)
        except Exception as exc:
            self._away = self._away or is_database_outage(exc)
            raise
        self.back_at, self._away = back_at, False
        return counts


def _take_back_running(
    session: Session,
    settings: Settings,
    now: dt.datetime,
    counts: dict[str, int],
    finished: list[uuid.UUID],
    requeued: list[tuple[uuid.UUID, str]],
    database_back_at: dt.datetime | None = None,
) -> None:
    """Running jobs whose worker went silent (no heartbeat) or got stuck (beating, no progress)."""
    cutoff = now - dt.timedelta(seconds=settings.heartbeat_timeout_s)
    silent = (
        lifecycle.stale_running(session, cutoff, limit=BATCH)
        if _judged(now, database_back_at, settings.heartbeat_timeout_s)
        else []
    )
    for job in silent:
        requeue = (
            f"worker {job.worker or 'unknown'} stopped sending heartbeats (last at {job.heartbeat_at}); "
            f"attempt {job.attempts + 1} of {job.max_attempts} queued"
        )
        failure = _worker_lost_message(job.attempts, job.max_attempts, job.worker, job.heartbeat_at)
        _take_back(session, job, counts, finished, requeued, requeue, (job_errors.WORKER_LOST.code, failure))

    stall_cutoff = now - dt.timedelta(seconds=settings.stall_timeout_s)
    stuck = (
        lifecycle.stalled_running(session, stall_cutoff, limit=BATCH)
        if _judged(now, database_back_at, settings.stall_timeout_s)
        else []
    )
    for job in stuck:
        counts["stalled"] += 1
        quiet = f"no progress for {settings.stall_timeout_s:.0f} s in stage {job.stage or 'start'}"
        requeue = (
            f"{quiet} on {job.worker or 'unknown'} (LORP_STALL_TIMEOUT_S); "
            f"attempt {job.attempts + 1} of {job.max_attempts} queued"
        )
        failure = (
            f"the job stalled: {quiet} on attempt {job.attempts} of {job.max_attempts} (worker "
            f"{job.worker or 'unknown'} kept beating, so it was alive but stuck: a hung read of the model "
            "or the data, or a deadlock). Check that the model and data are readable from the worker, "
            "or raise LORP_STALL_TIMEOUT_S if a single step of this model legitimately takes longer."
        )
        _take_back(session, job, counts, finished, requeued, requeue, (job_errors.STALLED.code, failure))


def _send_requeued(
    settings: Settings, factory: sessionmaker[Session], requeued: list[tuple[uuid.UUID, str]], counts: dict[str, int]
) -> None:
    """Send the jobs queued again; only after the requeue is committed, so the claim finds them queued."""
    for job_id, queue in requeued:
        try:
            enqueue_job(job_id, settings, queue)
        except Exception:
            # It stays queued and never enqueued: the queued sweep (or the next pass) sends it.
            counts["enqueue_errors"] += 1
            log.warning("could not enqueue requeued job %s", job_id, exc_info=True)
            continue
        with session_scope(factory) as session:
            lifecycle.mark_enqueued(session, job_id)
        counts["enqueued"] += 1


def _resend_after_lost_workers(
    settings: Settings, factory: sessionmaker[Session], now: dt.datetime, counts: dict[str, int]
) -> None:
    """Queued jobs whose message a worker that died may have taken: sent again (a duplicate is harmless)."""
    with session_scope(factory) as session:
        since = now - dt.timedelta(seconds=settings.queued_timeout_s)  # older: the due sweep resends anyway
        lost = workers_repo.lost_by_queue(session, since, settings.worker_timeout_s, now)
        for queue, last_beat in lost.items():
            # It died some time after its last beat: a message sent up to when it counts as dead may be its.
            sent_before = min(last_beat + dt.timedelta(seconds=settings.worker_timeout_s), now)
            for job_id in lifecycle.queued_sent_before(session, queue, sent_before, limit=BATCH):
                # A duplicate is harmless: the claim refuses it.
                if not _send_locked(session, settings, job_id, queue, counts, "resent_after_lost_worker"):
                    break
                log.warning("job %s: sent again, a worker on queue %s died (last beat %s)", job_id, queue, last_beat)


def _send_due_queued(
    settings: Settings, factory: sessionmaker[Session], now: dt.datetime, counts: dict[str, int]
) -> None:
    """Queued jobs never sent, or whose message is taken for lost, sent (cancelled if asked meanwhile)."""
    with session_scope(factory) as session:
        grace = now - dt.timedelta(seconds=min(settings.queued_timeout_s, ENQUEUE_GRACE_S))
        # Jobs deferred at their claim (their key at LORP_KEY_MAX_RUNNING_JOBS) go again once it has room.
        due = lifecycle.stale_queued(
            session,
            presumed_lost_before(session, settings, now),
            unenqueued_before=grace,
            limit=BATCH,
            max_running_per_owner=settings.key_max_running_jobs,
        )
        for job_id, queue in due:
            if lifecycle.cancel_if_requested_while_queued(session, job_id):
                counts["cancelled"] += 1
                continue
            if not _send_locked(session, settings, job_id, queue, counts, "enqueued"):
                break


def presumed_lost_before(session: Session, settings: Settings, now: dt.datetime) -> dict[str, dt.datetime]:
    """Per queue, the send time before which a queued job's message is taken for lost.

    Age alone says nothing: behind a deep backlog or a long job, a message waits its turn for hours,
    and sending it again every ``queued_timeout_s`` filled the queue with duplicates that the workers
    then had to take and refuse one by one (a soak of 1,000 queued jobs ran its second batch at half
    the first's rate). A message older than ``queued_timeout_s`` is taken for lost only when

    - its queue has had a free job slot for ``queue_quiet_s``: live workers registered that long ago have
      more slots than jobs run on it, and no job on it started or ended since: a waiting message
      would have been taken; or
    - a job sent after it was claimed more than ``ENQUEUE_GRACE_S`` ago: the queue hands messages out
      in order, so this one was passed over.

    A queue no live worker consumes has no entry: sending again would reach nobody (a worker that died
    holding messages is handled apart, by its last beat).
    """
    cutoff = now - dt.timedelta(seconds=settings.queued_timeout_s)
    quiet_since = now - dt.timedelta(seconds=settings.queue_quiet_s)
    capacity = workers_repo.capacity_by_queue(session, settings.worker_timeout_s, now, started_before=quiet_since)
    activity = lifecycle.queue_activity(session, claimed_before=now - dt.timedelta(seconds=ENQUEUE_GRACE_S))
    lost: dict[str, dt.datetime] = {}
    for queue in capacity.keys() | activity.keys():
        seen = activity.get(queue, lifecycle.QueueActivity())
        idle = capacity.get(queue, 0) > seen.running and (seen.last_change is None or seen.last_change < quiet_since)
        if idle:
            lost[queue] = cutoff
        elif seen.last_claimed_send is not None:
            lost[queue] = min(cutoff, seen.last_claimed_send)
    return lost


def _purge_deleted(settings: Settings, factory: sessionmaker[Session]) -> dict[str, int]:
    """Expire old jobs (LORP_ARTIFACT_TTL_DAYS) and purge deleted ones that have stopped."""
    from app.services.deletion import purge_pending
    from app.storage import artifact_store

    try:
        storage = artifact_store(settings)
        with session_scope(factory) as session:
            return purge_pending(session, storage, ttl_days=settings.artifact_ttl_days, limit=BATCH)
    except Exception:
        log.warning("could not purge deleted jobs; the next pass retries", exc_info=True)
        return {"expired": 0, "purged": 0}
