"""The heartbeat of a running attempt: ``heartbeat_at`` every interval, in a thread of its own."""

from __future__ import annotations

import logging
import threading
import uuid

from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings
from app.db.session import session_scope
from app.repositories import lifecycle

log = logging.getLogger(__name__)


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
    ) -> None:
        """``lost`` is set when the job turns out to be no longer this attempt's; a beat finding that
        after ``finishing`` was set (the run's own final write) is expected and ends the thread quietly."""
        super().__init__(name=f"heartbeat-{job_id}", daemon=True)
        self.settings, self.factory, self.job_id, self.attempt = settings, factory, job_id, attempt
        self.lost, self.finishing = lost, finishing
        self._stop_event = threading.Event()

    def run(self) -> None:
        interval = self.settings.heartbeat_interval_s
        while not self._stop_event.wait(interval):
            try:
                with session_scope(self.factory) as session:
                    owned = lifecycle.heartbeat(session, self.job_id, self.attempt)
            except Exception:
                # A missed beat is survivable (the reconciler allows heartbeat_timeout_s); keep trying.
                log.warning("heartbeat of job %s failed", self.job_id, exc_info=True)
                continue
            if not owned:
                if self.finishing.is_set():
                    return  # our own final write got there first
                log.warning("job %s is no longer attempt %d's to run; stopping it", self.job_id, self.attempt)
                self.lost.set()
                return

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)
