"""Delivering webhooks: POST each finished job's view to its ``notify.url``, signed, at least once.

Runs on the worker side after the final state is committed: right after a worker's own final write
(:func:`deliver_job`, so the receiver hears at once), and in every reconciler pass
(:func:`deliver_due`), which covers final states written elsewhere (a cancel by the API, the
reconciler failing a lost job) and retries failed attempts with backoff
(``LORP_WEBHOOK_RETRY_BASE_S``, 30 s, doubling, at most an hour) up to
``LORP_WEBHOOK_MAX_ATTEMPTS``. A 2xx answer is a delivery; anything else, or no answer within
``LORP_WEBHOOK_TIMEOUT_S``, is retried. Redirects are not followed. Every attempt is recorded
(``GET /v1/jobs/{id}/deliveries``); a receiver may see a delivery twice and should use
``Lorp-Delivery`` (stable per job and event) to ignore repeats.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
import uuid

import httpx
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.db.base import utcnow
from app.db.models import Job, WebhookDelivery
from app.db.session import session_factory, session_scope
from app.jobspec import webhook_url_problem
from app.repositories import webhooks as webhooks_repo
from app.services.job_views import job_out
from lorp_client.webhooks import DELIVERY_HEADER, EVENT_HEADER, SIGNATURE_HEADER, sign

log = logging.getLogger(__name__)

MAX_RETRY_S = 3600.0


def retry_delay_s(attempt: int, base_s: float) -> float:
    """The wait after failed attempt ``attempt`` (1-based): ``base_s`` (LORP_WEBHOOK_RETRY_BASE_S, 30 s),
    doubling, at most an hour."""
    return min(base_s * 2 ** (attempt - 1), MAX_RETRY_S)


def _payload(session: Session, job: Job, settings: Settings) -> tuple[str, str, bytes]:
    event = f"job.{job.status.value}"
    delivery_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"lorp:{job.id}:{event}"))
    view = job_out(session, job, settings).model_dump(mode="json")
    body = json.dumps({"event": event, "delivery": delivery_id, "job": view}, separators=(",", ":")).encode()
    return event, delivery_id, body


def _attempt(session: Session, job: Job, settings: Settings, http: httpx.Client) -> bool:
    assert job.notify_url is not None and job.notify_secret is not None
    attempt = job.notify_attempts + 1
    problem = webhook_url_problem(job.notify_url, settings.webhook_allowed_hosts)
    if problem is not None:  # the operator's list changed since submission
        log.warning("job %s: not delivering its webhook: %s", job.id, problem)
        webhooks_repo.give_up(session, job, settings.webhook_max_attempts)
        return False
    event, delivery_id, body = _payload(session, job, settings)
    headers = {
        "Content-Type": "application/json",
        SIGNATURE_HEADER: sign(job.notify_secret, body),
        EVENT_HEADER: event,
        DELIVERY_HEADER: delivery_id,
        "User-Agent": "lorp-webhooks/1",
    }
    started = time.perf_counter()
    status: int | None = None
    error: str | None = None
    try:
        response = http.post(job.notify_url, content=body, headers=headers)
        status = response.status_code
        if not 200 <= status < 300:
            error = f"HTTP {status}: {response.text[:200]}"
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"[:500]
    delivered = error is None
    now = utcnow()
    retry = not delivered and attempt < settings.webhook_max_attempts
    record = WebhookDelivery(
        job_id=job.id,
        attempt=attempt,
        event=event,
        url=job.notify_url,
        at=now,
        status_code=status,
        error=error,
        duration_ms=round((time.perf_counter() - started) * 1000, 1),
        delivered=delivered,
    )
    next_at = now + dt.timedelta(seconds=retry_delay_s(attempt, settings.webhook_retry_base_s)) if retry else None
    webhooks_repo.record(session, job, record, next_at=next_at)
    if delivered:
        log.info("job %s: webhook %s delivered (attempt %d)", job.id, event, attempt)
    else:
        log.warning(
            "job %s: webhook %s attempt %d failed: %s%s", job.id, event, attempt, error, "" if retry else "; giving up"
        )
    return delivered


def deliver_due(
    settings: Settings, *, job_id: uuid.UUID | None = None, now: dt.datetime | None = None
) -> dict[str, int]:
    """Attempt every webhook that is due (or only ``job_id``'s); returns delivered and failed counts."""
    counts = {"delivered": 0, "failed": 0}
    factory = session_factory(settings.sqlalchemy_url)
    with (
        httpx.Client(timeout=settings.webhook_timeout_s, follow_redirects=False) as http,
        session_scope(factory) as session,
    ):
        jobs = webhooks_repo.due(session, now or utcnow(), max_attempts=settings.webhook_max_attempts, job_id=job_id)
        for job in jobs:
            counts["delivered" if _attempt(session, job, settings, http) else "failed"] += 1
            session.commit()  # each attempt durable on its own
    return counts


def deliver_job(settings: Settings, job_id: uuid.UUID) -> None:
    """Right after a worker's final write: this job's webhook now, if it has one (failures are retried later)."""
    try:
        deliver_due(settings, job_id=job_id)
    except Exception:
        log.warning("job %s: webhook delivery failed; the reconciler retries", job_id, exc_info=True)
