"""A worker process's liveness beat: the row in ``workers`` that says it is here, and which queues it serves.

The Celery main process registers once it is ready to take jobs (``worker_ready``), beats every
``worker_beat_interval_s`` from a thread of its own and marks the row stopped on a warm shutdown.
A worker killed outright stops beating, and after ``worker_timeout_s`` the API no longer counts it.
The database is the source of truth (not Celery's broadcast): the API reads it without a broker
round trip, and it works the same over every broker.

Each beat also runs the start watch (``worker.startwatch``): a pool child that took a job and did not
start it within ``LORP_JOB_START_TIMEOUT_S`` is killed, its job handed back, and the row says so.

The thread uses an engine without a pool: it holds no connection between beats. A beat that fails (the
database away) is tried again every :data:`RETRY_AFTER_FAILED_BEAT_S`, so the worker counts as live
again about a second after the database is back, not up to an interval later.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Sequence

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings
from app.db.session import make_engine, session_scope
from app.repositories import workers as workers_repo
from worker.device import describe_device
from worker.failure_log import RepeatedFailure
from worker.startwatch import StartWatch

log = logging.getLogger(__name__)

RETRY_AFTER_FAILED_BEAT_S = 1.0
"""How soon a beat (or a registration) that failed is tried again, rather than a whole interval later."""


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


class WorkerBeat(threading.Thread):
    """Registers this worker, then beats until stopped; a lost row (someone closed it) is registered again."""

    def __init__(
        self,
        settings: Settings,
        *,
        name: str,
        queues: Sequence[str],
        concurrency: int,
        watch: StartWatch | None = None,
    ) -> None:
        super().__init__(name="worker-beat", daemon=True)
        self.settings = settings
        self.worker_name, self.queues, self.concurrency = name, list(queues), concurrency
        self.watch = watch
        self.host = socket.gethostname()
        self.device = describe_device()
        self.worker_id: uuid.UUID | None = None
        self.registered = threading.Event()
        self._stop_event = threading.Event()
        self._failures = RepeatedFailure(log, f"worker {name}: liveness beat")
        self._engine: Engine = make_engine(settings.sqlalchemy_url, pooled=False)
        self._factory: sessionmaker[Session] = sessionmaker(bind=self._engine, expire_on_commit=False)

    def _register(self) -> None:
        with session_scope(self._factory) as session:
            self.worker_id = workers_repo.register(
                session,
                name=self.worker_name,
                host=self.host,
                pid=os.getpid(),
                queues=self.queues,
                concurrency=self.concurrency,
                pid_alive=pid_alive,
                device=self.device,
            )
        self.registered.set()
        log.info("worker %s registered (queues %s)", self.worker_name, ", ".join(self.queues))

    def _beat(self) -> None:
        if self.worker_id is None:
            self._register()
            return
        with session_scope(self._factory) as session:
            alive = workers_repo.beat(session, self.worker_id)
            if alive and self.watch is not None:
                self.watch.check(session, self.worker_id)
        if not alive:
            log.warning("worker %s: its liveness row was closed; registering again", self.worker_name)
            self._register()

    def run(self) -> None:
        wait = 0.0
        while not self._stop_event.wait(wait):
            wait = self.settings.worker_beat_interval_s
            try:
                self._beat()
            except Exception as exc:
                # A missed beat is survivable within worker_timeout_s, but the next one should land as
                # soon as the database is back: during an outage longer than the timeout this worker
                # reads as dead (/readyz 503, its queue's jobs held back) until it beats again.
                self._failures.failed(exc)
                wait = min(wait, RETRY_AFTER_FAILED_BEAT_S)
                continue
            self._failures.succeeded()

    def stop(self) -> None:
        """Stop beating and say so in the row, so the API stops counting this worker at once."""
        self._stop_event.set()
        self.join(timeout=10)
        if self.worker_id is not None:
            try:
                with session_scope(self._factory) as session:
                    workers_repo.mark_stopped(session, self.worker_id)
            except Exception:
                log.warning("worker %s: could not mark itself stopped", self.worker_name, exc_info=True)
        self._engine.dispose()
