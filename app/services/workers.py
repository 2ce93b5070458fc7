"""Who runs the queued jobs: live workers per queue (from their liveness beats), readiness, and why a job waits.

A job records the queue it was sent to (``LORP_QUEUE_NAME`` when submitted). The ``workers``
readiness check fails when this API's queue holds queued jobs and no live worker serves it, or when
``lorp serve``'s supervisor gave up restarting its worker; with nothing queued, no worker is not an
error (workers may scale to zero while idle). A worker that beats but is stuck (a pool child of it
took a job and did not start it within ``LORP_JOB_START_TIMEOUT_S``, and no job has started on it
since: ``worker/startwatch.py``) does not count as serving its queue while that lasts. Other
queues in the same database (another deployment's) are listed but do not make this API unready.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy.orm import Session

from app.core.config import Settings
from app.db.base import utcnow
from app.repositories import jobs as jobs_repo
from app.repositories import workers as workers_repo

WAITING_FOR_WORKER = "worker"


class SupervisedWorker(Protocol):
    """``lorp serve``'s view of its embedded worker (worker/supervisor.py), as the API reads it."""

    @property
    def restarts(self) -> int: ...

    @property
    def gave_up(self) -> str | None: ...


@dataclass(frozen=True)
class WorkerWait:
    """A queue with no live worker: when a worker was last seen on it (None: never), and how many of
    those that beat are stuck."""

    queue: str
    last_seen_at: dt.datetime | None
    unseen_s: float | None
    stuck: int = 0

    @property
    def detail(self) -> str:
        if self.stuck:
            return f"the {self.stuck} worker(s) on queue {self.queue} are stuck: none can start a job"
        if self.unseen_s is None:
            return f"no worker has ever served queue {self.queue}"
        return f"no live worker serves queue {self.queue} (the last was seen {self.unseen_s:.0f} s ago)"


def _since(now: dt.datetime, then: dt.datetime | None) -> float | None:
    return None if then is None else round(max((now - then).total_seconds(), 0.0), 1)


def worker_waits(
    session: Session, settings: Settings, queues: Iterable[str], now: dt.datetime | None = None
) -> dict[str, WorkerWait]:
    """For each of ``queues`` that no live worker serves: since when nobody was seen on it."""
    now = now or utcnow()
    waits: dict[str, WorkerWait] = {}
    for queue in sorted(set(queues)):
        presence = workers_repo.presence(session, queue, settings.worker_timeout_s, now)
        if not presence.live:
            waits[queue] = WorkerWait(
                queue, presence.last_seen_at, _since(now, presence.last_seen_at), stuck=presence.stuck
            )
    return waits


def readiness(session: Session, settings: Settings, supervised: SupervisedWorker | None) -> dict[str, Any]:
    """The ``workers`` check of /readyz: ``ok``, live workers and queued jobs per queue, ``error`` when not ok."""
    now = utcnow()
    live = workers_repo.live_by_queue(session, settings.worker_timeout_s, now)
    queued = jobs_repo.queued_by_queue(session)
    for queue in (settings.queue_name, *queued):
        live.setdefault(queue, 0)
        queued.setdefault(queue, 0)
    check: dict[str, Any] = {
        "ok": True,
        "queue": settings.queue_name,
        "live": dict(sorted(live.items())),
        "queued": dict(sorted(queued.items())),
    }
    live_rows = workers_repo.live_workers(session, settings.worker_timeout_s, now)
    # Each live worker's device as it registered it: {"worker", "queues", "kind", "name", "count",
    # "memory_bytes", "budget_bytes"} (worker/device.py).
    check["devices"] = [
        {**(row.device or {}), "worker": row.name, "queues": list(row.queues or [])} for row in live_rows
    ]
    stuck = [row for row in live_rows if row.stuck]
    if stuck:
        check["stuck"] = [
            {
                "name": row.name,
                "queues": list(row.queues or []),
                "since": row.stuck_since.isoformat() if row.stuck_since else None,
                "stuck_starts": row.stuck_starts,
                "detail": row.stuck_detail,
            }
            for row in stuck
        ]
    problems: list[str] = []
    if supervised is not None:
        check["restarts"] = supervised.restarts
        if supervised.gave_up is not None:
            problems.append(f"the embedded worker is down: {supervised.gave_up}")
    own = settings.queue_name
    if queued.get(own):
        for wait in worker_waits(session, settings, [own], now).values():
            problems.append(f"{queued[own]} job(s) queued and {wait.detail}")
            problems.extend(f"{row.name}: {row.stuck_detail}" for row in stuck if own in (row.queues or []))
            if wait.last_seen_at is not None:
                check["last_seen_at"] = wait.last_seen_at.isoformat()
    if problems:
        check.update(ok=False, error="; ".join(problems))
    return check
