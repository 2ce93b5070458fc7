"""Webhook deliveries as the API shows them: every attempt is a ``webhook_deliveries`` row.

Which URLs a job may name is checked with its request (``app.jobspec.webhook_url_problem``); the
worker side delivers (``worker/webhooks.py``).
"""

from __future__ import annotations

import uuid

from sqlalchemy.orm import Session

from app.core.security import Principal
from app.repositories import webhooks as webhooks_repo
from app.schemas import DeliveryOut
from app.services.jobs import get_job


def list_deliveries(session: Session, job_id: uuid.UUID, principal: Principal) -> list[DeliveryOut]:
    """Every delivery attempt of a job the principal may see, in order (404 otherwise)."""
    job = get_job(session, job_id, principal)
    return [
        DeliveryOut(
            attempt=r.attempt,
            event=r.event,
            url=r.url,
            at=r.at,
            status_code=r.status_code,
            error=r.error,
            duration_ms=r.duration_ms,
            delivered=r.delivered,
        )
        for r in webhooks_repo.deliveries_of(session, job.id)
    ]
