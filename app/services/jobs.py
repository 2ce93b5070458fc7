"""Jobs: submission with idempotency, lookup, listing and cancellation.

Services only flush; the route's unit of work commits. Submitting is two steps on purpose:
``submit_job`` records the job, the route commits, and only then ``enqueue_submitted`` sends the
message, so a worker never receives the id of a row it cannot read. A job's view is
``app/services/job_views.py``, its analysis ``analysis.py``, its files ``artifacts.py``.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import logging
import uuid
from dataclasses import dataclass

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.errors import Conflict, NotFound, ServiceError, Unprocessable
from app.core.security import Principal
from app.db.base import utcnow
from app.db.models import EventKind, Job, JobStatus
from app.jobspec import DatasetReference, JobCreate, resolve_references, webhook_url_problem
from app.queue import enqueue_job
from app.repositories import datasets as datasets_repo
from app.repositories import events as events_repo
from app.repositories import jobs as jobs_repo
from app.repositories import lifecycle
from app.schemas import (
    JobListItem,
    Page,
)
from app.services import eval_tasks, preflight
from app.services.job_views import list_item, queue_waits

logger = logging.getLogger(__name__)

MAX_IDEMPOTENCY_KEY_LEN = 255
# When a key at its queued limit may try again: jobs take minutes, so sooner rarely helps.
QUEUE_FULL_RETRY_AFTER_S = 60


class TooManyJobs(ServiceError):
    """A key's submission beyond ``LORP_KEY_MAX_QUEUED_JOBS`` queued jobs: 429 with Retry-After."""

    status, code, title = 429, "too_many_jobs", "Too Many Requests"


@dataclass(frozen=True)
class Submission:
    """A recorded job; ``created`` is False when an Idempotency-Key replay returned an existing one."""

    job: Job
    created: bool


def _check_dataset_reference(session: Session, dataset: DatasetReference | None, principal: Principal) -> None:
    """An uploaded dataset must exist and be the caller's to use (the built-in corpus and hub datasets
    are the engine's to read)."""
    if dataset is None or dataset.upload_id is None:
        return
    if datasets_repo.get_visible(session, dataset.upload_id, principal) is None:
        raise Unprocessable(
            f"no uploaded dataset {dataset.name} (upload one with POST /v1/datasets)", field=dataset.field
        )


def _replay(existing: Job, fingerprint: str) -> Submission:
    if existing.request_hash != fingerprint:
        raise Conflict(
            "this Idempotency-Key was already used with a different request body; use a new key",
            field="Idempotency-Key",
            code="idempotency_key_reused",
        )
    return Submission(existing, created=False)


def _check_queued_limit(session: Session, principal: Principal, settings: Settings) -> None:
    """Refuse a key's job beyond its queued limit, so one key cannot fill the queue for every other.

    Admin keys are exempt (an operator's own batch), and so is the anonymous owner of a service without
    keys: with no keys there is one tenant, whose jobs queue as they come (``lorp serve``'s soak of
    1,000). Counted under a lock on the key, so concurrent submissions cannot both take the last place.
    """
    owner = principal.owner_id
    if owner is None or principal.is_admin:
        return
    jobs_repo.lock_owner(session, owner, "queued")
    queued, limit = jobs_repo.queued_count(session, owner), settings.key_max_queued_jobs
    if queued >= limit:
        raise TooManyJobs(
            f"this key has {queued} jobs queued, the most it may have (LORP_KEY_MAX_QUEUED_JOBS: {limit}); "
            "submit more once some have started, or cancel some",
            headers={"Retry-After": str(QUEUE_FULL_RETRY_AFTER_S)},
        )


def _record(session: Session, job: Job, at: dt.datetime) -> None:
    jobs_repo.add_job(session, job)
    events_repo.add_event(session, job.id, EventKind.status, status=JobStatus.queued.value, at=at)


def submit_job(
    session: Session,
    spec: JobCreate,
    principal: Principal,
    settings: Settings,
    idempotency_key: str | None = None,
) -> Submission:
    """Validate a job request and record it as queued (flushed, not committed)."""
    if idempotency_key is not None:
        idempotency_key = idempotency_key.strip()
        if not idempotency_key or len(idempotency_key) > MAX_IDEMPOTENCY_KEY_LEN:
            raise Unprocessable(
                f"Idempotency-Key must hold 1 to {MAX_IDEMPOTENCY_KEY_LEN} characters", field="Idempotency-Key"
            )
    references = resolve_references(spec, settings)
    preflight.check_execution(spec)
    preflight.check_against_model(spec, references.model, settings)
    _check_dataset_reference(session, references.calibration, principal)
    _check_dataset_reference(session, references.evaluation, principal)
    eval_tasks.check_tasks(session, spec.evaluation.tasks)
    if spec.notify is not None:
        webhook_problem = webhook_url_problem(
            spec.notify.url, settings.webhook_allowed_hosts, settings.webhook_allowed_networks
        )
        if webhook_problem is not None:
            raise Unprocessable(webhook_problem, field="notify.url")

    fingerprint = spec.fingerprint()
    owner_id = principal.owner_id
    if idempotency_key is not None:
        jobs_repo.lock_idempotency_key(session, owner_id, idempotency_key)
        existing = jobs_repo.get_by_idempotency_key(session, owner_id, idempotency_key)
        if existing is not None:
            return _replay(existing, fingerprint)
    _check_queued_limit(session, principal, settings)

    now = utcnow()
    job = Job(
        owner_id=owner_id,
        status=JobStatus.queued,
        progress=0.0,
        request=spec.stored(),
        notify_url=spec.notify.url if spec.notify else None,
        notify_secret=spec.notify.secret if spec.notify else None,
        request_hash=fingerprint,
        model_source=spec.model.id,
        method=spec.method,
        queue=settings.queue_name,
        idempotency_key=idempotency_key,
        attempts=0,
        max_attempts=settings.max_attempts,
        queued_at=now,
        created_at=now,
        updated_at=now,
    )
    if idempotency_key is None:
        _record(session, job, now)
        return Submission(job, created=True)
    try:
        # A savepoint: when a concurrent submission with the same key won the unique constraint,
        # only this insert is undone and the winner's job is returned.
        with session.begin_nested():
            _record(session, job, now)
    except IntegrityError:
        existing = jobs_repo.get_by_idempotency_key(session, owner_id, idempotency_key)
        if existing is None:
            raise
        return _replay(existing, fingerprint)
    return Submission(job, created=True)


def enqueue_submitted(session: Session, job_id: uuid.UUID, settings: Settings) -> bool:
    """Send the committed job to the workers and note when; a broker outage leaves it to the reconciler."""
    try:
        enqueue_job(job_id, settings)
    except Exception as exc:
        # The job row is committed and queued with enqueued_at NULL: the reconciler re-sends it.
        logger.warning("could not enqueue job %s (the reconciler will retry): %s", job_id, exc)
        return False
    lifecycle.mark_enqueued(session, job_id)
    return True


def get_job(session: Session, job_id: uuid.UUID, principal: Principal, *, field: str = "job_id") -> Job:
    """The job if the principal may see it; 404 for unknown ids and other owners' jobs alike."""
    job = jobs_repo.get_visible(session, job_id, principal)
    if job is None:
        raise NotFound(f"no job {job_id}", field=field)
    return job


def encode_cursor(job: Job) -> str:
    raw = json.dumps([job.created_at.isoformat(), str(job.id)], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[dt.datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, job_id = json.loads(raw)
        return dt.datetime.fromisoformat(created), uuid.UUID(job_id)
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError):
        raise Unprocessable("not a cursor returned by this API", field="cursor") from None


def list_jobs(
    session: Session,
    principal: Principal,
    settings: Settings,
    *,
    status: JobStatus | None = None,
    model: str | None = None,
    cursor: str | None = None,
    limit: int = 20,
) -> Page[JobListItem]:
    """Newest first, filtered, one page at a time."""
    after = decode_cursor(cursor) if cursor else None
    rows = jobs_repo.list_jobs(session, principal, status=status, model=model, after=after, limit=limit + 1)
    page, more = rows[:limit], len(rows) > limit
    waits = queue_waits(session, settings, page)
    return Page[JobListItem](
        items=[list_item(job, waits) for job in page],
        next_cursor=encode_cursor(page[-1]) if more and page else None,
    )


def cancel_job(session: Session, job_id: uuid.UUID, principal: Principal) -> tuple[Job, bool]:
    """Cancel a queued job now or flag a running one; returns (job, is final); succeeded/failed is 409."""
    job = get_job(session, job_id, principal)
    now = utcnow()
    if jobs_repo.cancel_if_queued(session, job.id, now):
        events_repo.add_event(
            session, job.id, EventKind.status, status=JobStatus.cancelled.value, message="cancelled", at=now
        )
        return jobs_repo.reload(session, job.id), True
    if jobs_repo.request_cancel_if_running(session, job.id, now):
        events_repo.add_event(session, job.id, EventKind.cancel_requested, status=JobStatus.running.value, at=now)
        return jobs_repo.reload(session, job.id), False
    job = jobs_repo.reload(session, job.id)
    if job.status == JobStatus.cancelled:
        return job, True
    raise Conflict(f"job {job.id} already {job.status.value}; it cannot be cancelled", code="job_finished")
