"""Pool children that took a job and never started it: found, killed, the job handed back, and said so.

A pool child's first act for a job is the claim, one conditional UPDATE of the job's row. A child
that hangs before that (a lock it inherited, a database connect that never returns) holds the job's
message for ever while its worker keeps beating, and nothing else would notice: the job stays
queued, the reconciler sees a message that went out recently, ``/readyz`` sees a live worker.

The worker's main process looks every liveness beat (``worker.liveness``) at the jobs its children
accepted (Celery's ``active_requests``): one accepted more than ``LORP_JOB_START_TIMEOUT_S`` ago
whose row this worker has not claimed since is stuck. Its child is killed (SIGKILL); with late
acknowledgement and reject-on-worker-lost Celery puts the message back on the broker and replaces
the child, so the job runs on the next one. The worker's liveness row records the stuck start and
stays stuck until a job starts on the worker again: ``/readyz`` then does not count it as serving
its queue, and ``/metrics`` exports it (``app/services/workers.py``, ``app/observability.py``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import signal
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from app.core.config import Settings
from app.db.base import utcnow
from app.queue import RUN_JOB_TASK
from app.repositories import workers as workers_repo
from app.repositories.workers import JobClaim

log = logging.getLogger(__name__)

# The claim is written by the child's clock and the acceptance read by this process's: same host,
# but allow for the resolution of both.
CLOCK_SLACK = dt.timedelta(seconds=1)


@dataclass(frozen=True)
class Accepted:
    """A job a pool child accepted: which child, and when (wall clock)."""

    job_id: uuid.UUID
    pid: int
    at: dt.datetime


@dataclass(frozen=True)
class StuckStart:
    """A child that did not start the job it took within the bound."""

    job_id: uuid.UUID
    pid: int
    waited_s: float


def accepted_jobs(requests: Iterable[Any]) -> list[Accepted]:
    """The job tasks among Celery requests that a pool child has accepted (pid and start time known)."""
    found = []
    for request in requests:
        pid, started = getattr(request, "worker_pid", None), getattr(request, "time_start", None)
        if request.name != RUN_JOB_TASK or pid is None or started is None or not request.args:
            continue
        try:
            job_id = uuid.UUID(str(request.args[0]))
        except ValueError:
            continue
        found.append(Accepted(job_id, int(pid), dt.datetime.fromtimestamp(started, dt.UTC)))
    return found


def _active_requests() -> list[Any]:
    from celery.worker import state

    # A copy made in one step: the pool's threads add and remove requests while this one reads.
    return list(state.active_requests.copy())


def started_by(claim: JobClaim | None, worker_name: str, accepted_at: dt.datetime) -> bool:
    """Whether the job's row shows this worker claimed it after a child of it accepted it."""
    return (
        claim is not None
        and claim.worker == worker_name
        and claim.started_at is not None
        and claim.started_at >= accepted_at - CLOCK_SLACK
    )


class StartWatch:
    """Finds and ends stuck starts among this worker's children; one instance per worker main process."""

    def __init__(
        self,
        settings: Settings,
        worker_name: str,
        *,
        requests: Callable[[], list[Any]] = _active_requests,
        kill: Callable[[int, int], None] = os.kill,
    ) -> None:
        self.timeout = dt.timedelta(seconds=settings.job_start_timeout_s)
        self.worker_name = worker_name
        self._requests, self._kill = requests, kill
        self.stuck_since: dt.datetime | None = None
        self.stuck_starts = 0
        # Children killed here whose loss Celery has not processed yet: counted once.
        self._killed: set[tuple[uuid.UUID, int]] = set()

    def check(self, session: Session, worker_id: uuid.UUID, now: dt.datetime | None = None) -> list[StuckStart]:
        """One look: kill the children that overstayed the bound, record them; clear a stuck state
        once a job started on this worker after it. Returns the stuck starts found now."""
        now = now or utcnow()
        if self.stuck_since is not None and workers_repo.started_since(session, self.worker_name, self.stuck_since):
            log.warning("worker %s: a job started again; no longer stuck", self.worker_name)
            workers_repo.clear_stuck(session, worker_id)
            self.stuck_since = None
        accepted = accepted_jobs(self._requests())
        self._killed &= {(a.job_id, a.pid) for a in accepted}
        overdue = [a for a in accepted if now - a.at > self.timeout and (a.job_id, a.pid) not in self._killed]
        if not overdue:
            return []
        claims = workers_repo.job_claims(session, [a.job_id for a in overdue])
        stuck = [
            StuckStart(a.job_id, a.pid, round((now - a.at).total_seconds(), 1))
            for a in overdue
            if not started_by(claims.get(a.job_id), self.worker_name, a.at)
        ]
        for found in stuck:
            log.error(
                "worker %s: pool child %d took job %s %.0f s ago and has not started it; killing the child "
                "(the job goes back to the queue)",
                self.worker_name,
                found.pid,
                found.job_id,
                found.waited_s,
            )
            self._killed.add((found.job_id, found.pid))
            with contextlib.suppress(ProcessLookupError):
                self._kill(found.pid, signal.SIGKILL)
        if stuck:
            last = stuck[-1]
            detail = (
                f"a pool child took job {last.job_id} and did not start it within "
                f"{self.timeout.total_seconds():.0f} s (LORP_JOB_START_TIMEOUT_S); it was killed and the job "
                f"handed back at {now:%Y-%m-%d %H:%M:%S} UTC, and no job has started on this worker since"
            )
            workers_repo.record_stuck(session, worker_id, count=len(stuck), detail=detail, at=now)
            self.stuck_since = self.stuck_since or now
            self.stuck_starts += len(stuck)
        return stuck
