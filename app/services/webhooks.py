"""Webhooks: which URLs a job may name, and the deliveries the API shows.

A job's ``notify.url`` must name a host an operator allows (``LORP_WEBHOOK_ALLOWED_HOSTS``: exact
names, or ``*.example.com`` for its subdomains); with none allowed, webhooks are off. The worker
side delivers (``worker/webhooks.py``); every attempt is a ``webhook_deliveries`` row.
"""

from __future__ import annotations

import uuid
from urllib.parse import urlsplit

from sqlalchemy.orm import Session

from app.core.errors import NotFound
from app.core.security import Principal
from app.repositories import jobs as jobs_repo
from app.repositories import webhooks as webhooks_repo
from app.schemas import DeliveryOut


def host_allowed(host: str, allowed: list[str]) -> bool:
    host = host.lower().rstrip(".")
    for entry in (e.lower().rstrip(".") for e in allowed):
        if host == entry or (entry.startswith("*.") and host.endswith(entry[1:]) and host != entry[2:]):
            return True
    return False


def url_problem(url: str, allowed: list[str]) -> str | None:
    """Why a webhook URL is refused, or None when it may be used."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"notify.url must be an http(s) URL with a host, not {url!r}"
    if parts.username or parts.password:
        return "notify.url must not carry credentials; the signature authenticates the service"
    if not allowed:
        return "webhooks are off on this service: an operator allows hosts with LORP_WEBHOOK_ALLOWED_HOSTS"
    if not host_allowed(parts.hostname, allowed):
        listed = ", ".join(allowed)
        return f"host {parts.hostname!r} is not one this service may call (LORP_WEBHOOK_ALLOWED_HOSTS: {listed})"
    return None


def list_deliveries(session: Session, job_id: uuid.UUID, principal: Principal) -> list[DeliveryOut]:
    """Every delivery attempt of a job the principal may see, in order (404 otherwise)."""
    if jobs_repo.get_visible(session, job_id, principal) is None:
        raise NotFound(f"no job {job_id}", field="job_id")
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
        for r in webhooks_repo.deliveries_of(session, job_id)
    ]
