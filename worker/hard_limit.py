"""A job whose pool process Celery killed at the hard time limit, recorded by the worker's main process.

The soft limit (``LORP_JOB_TIME_LIMIT_S``) is a signal that the job handles in Python
(``worker.soft_limit``). A job inside a native call that runs no Python for longer than
``LORP_JOB_HARD_LIMIT_GRACE_S`` after it, or a process that was stopped, never sees it: Celery
kills the process at the hard limit, and nothing in it could record why. Left alone, the job's
heartbeat would go silent and the reconciler would run it again, past the limit again, up to
``LORP_MAX_ATTEMPTS`` times, to fail at last as ``worker_lost``. Here the worker's main process
(torch-free) fails it with ``time_limit_exceeded`` at once and removes what the attempt left.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid

from app import job_errors
from app.core.config import Settings
from app.db.base import utcnow
from app.db.session import session_factory, session_scope
from app.repositories import lifecycle
from app.storage import artifact_store
from worker import leftovers
from worker.failures import time_limit_message

log = logging.getLogger(__name__)


def fail_after_hard_limit(job_id: uuid.UUID | str, settings: Settings, *, now: dt.datetime | None = None) -> bool:
    """Fail ``job_id`` with ``time_limit_exceeded`` when its attempt that started at least the time
    limit ago still runs (the one the hard limit killed: a later attempt is left alone); remove its
    partial outputs, work folder and scratch. Whether it was failed here."""
    job_id = uuid.UUID(str(job_id))
    cutoff = (now or utcnow()) - dt.timedelta(seconds=settings.job_time_limit_s)
    factory = session_factory(settings.sqlalchemy_url)
    with session_scope(factory) as session:
        attempt = lifecycle.running_attempt_started_before(session, job_id, cutoff)
    if attempt is None:
        return False
    # What the killed process left goes first (nothing runs there any more): once the job reads as
    # failed, nothing of it is left.
    leftovers.delete_outputs(artifact_store(settings), job_id)
    for folder in (leftovers.work_folder(settings, job_id), leftovers.scratch_folder(settings, job_id)):
        leftovers.remove_folder(folder)
    message = time_limit_message(settings, killed=True)
    with session_scope(factory) as session:
        done = lifecycle.finish_failed(session, job_id, attempt, job_errors.TIME_LIMIT_EXCEEDED.code, message)
    if done:
        log.error("job %s failed: %s: %s", job_id, job_errors.TIME_LIMIT_EXCEEDED.code, message)
    return done
