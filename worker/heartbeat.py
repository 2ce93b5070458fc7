"""The heartbeat of a running attempt: ``heartbeat_at`` every interval, in a thread of its own."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable

from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings
from app.db.session import session_scope
from app.repositories import lifecycle
from worker.failure_log import RepeatedFailure

log = logging.getLogger(__name__)

# How long a run that lost its job may take to notice at a cancel check before it is abandoned.
ABANDON_AFTER_BEATS = 10
MIN_ABANDON_AFTER_S = 5.0


class Heartbeat(threading.Thread):
    """Updates heartbeat_at every interval while the job runs, with its own database sessions."""

    def __init__(
        self,
        settings: Settings,
        factory: sessionmaker[Session],
        job_id: uuid.UUID,
        attempt: int,
        *,
        lost: threading.Event,
        finishing: threading.Event,
        abandon: Callable[[], None] | None = None,
    ) -> None:
        """``lost`` is set when the job turns out to be no longer this attempt's; a beat finding that
        after ``finishing`` was set (the run's own final write) is expected and ends the thread quietly.

        ``abandon`` is called when the run has not stopped ``abandon_after_s`` after it was told: a
        job taken back because it stalled may be stuck where no cancel check ever runs (a hung read,
        a deadlock), and a worker process whose only purpose is this job ends itself there.
        """
        super().__init__(name=f"heartbeat-{job_id}", daemon=True)
        self.settings, self.factory, self.job_id, self.attempt = settings, factory, job_id, attempt
        self.lost, self.finishing = lost, finishing
        self.abandon = abandon
        self.abandon_after_s = max(ABANDON_AFTER_BEATS * settings.heartbeat_interval_s, MIN_ABANDON_AFTER_S)
        self._stop_event = threading.Event()
        self._failures = RepeatedFailure(log, f"heartbeat of job {job_id}")

    def run(self) -> None:
        interval = self.settings.heartbeat_interval_s
        while not self._stop_event.wait(interval):
            try:
                with session_scope(self.factory) as session:
                    owned = lifecycle.heartbeat(session, self.job_id, self.attempt)
            except Exception as exc:
                # A missed beat is survivable (the reconciler allows heartbeat_timeout_s); keep trying.
                self._failures.failed(exc)
                continue
            self._failures.succeeded()
            if not owned:
                if self.finishing.is_set():
                    return  # our own final write got there first
                log.warning("job %s is no longer attempt %d's to run; stopping it", self.job_id, self.attempt)
                self.lost.set()
                if not self._stop_event.wait(self.abandon_after_s) and self.abandon is not None:
                    log.error(
                        "job %s: attempt %d did not stop within %.0f s of losing the job; abandoning it",
                        self.job_id,
                        self.attempt,
                        self.abandon_after_s,
                    )
                    self.abandon()
                return

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)
