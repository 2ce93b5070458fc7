"""Waiting out an outage of what a running job depends on: object storage and the database.

A job's last steps (uploading its outputs, publishing them) come after work that may have taken
hours: a store or a database away for a minute (a restart, a network cut) must not throw that work
away. A call that fails with a transient error is tried again after ``BACKOFF_S``, doubling up to
``MAX_BACKOFF_S``, the last try as ``patience_s`` from the first runs out (``LORP_OUTAGE_WAIT_S``
for a job's own calls; ``CLEANUP_PATIENCE_S`` for removing what a failed attempt left, which must
not hold its failure up). While it waits, ``should_cancel`` is asked every ``CANCEL_POLL_S``: a
cancel ends the wait, and so does the time limit (the runner's checks raise it).

Then storage fails the job (``storage_unavailable``, with what to check); the database's error is
raised as it is, and the runner leaves the job to the reconciler, which needs the database too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from app import job_errors
from app.storage import StorageError
from lorp.errors import JobCancelled
from worker.failures import JobFailure, is_database_outage

log = logging.getLogger(__name__)

BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
CANCEL_POLL_S = 1.0
# Removing a failed or cancelled attempt's objects waits a few seconds at most: it holds the failure up.
CLEANUP_PATIENCE_S = 4.0

T = TypeVar("T")


def with_storage_retries(
    what: str, fn: Callable[[], T], *, patience_s: float, should_cancel: Callable[[], bool] | None = None
) -> T:
    """Call ``fn``, retrying retryable storage errors for up to ``patience_s``; then ``storage_unavailable``.
    A cancel seen while waiting raises :class:`JobCancelled`."""
    tries = _Tries()
    try:
        return _retry(what, fn, tries, patience_s, should_cancel, _storage_transient, "object storage")
    except StorageError as exc:
        raise JobFailure(
            job_errors.STORAGE_UNAVAILABLE.code,
            f"{what} failed{tries.told()}: {exc}. Check that the object store is reachable and writable, "
            "then submit the job again.",
        ) from exc


def with_database_retries(
    what: str, fn: Callable[[], T], *, patience_s: float, should_cancel: Callable[[], bool] | None = None
) -> T:
    """Call ``fn`` (a transaction of its own), retrying it while the database is unreachable, for up to
    ``patience_s``; then the outage's error. A cancel seen while waiting raises :class:`JobCancelled`."""
    return _retry(what, fn, _Tries(), patience_s, should_cancel, is_database_outage, "the database")


@dataclass
class _Tries:
    attempts: int = 0
    waited_s: float = 0.0

    def told(self) -> str:
        return f" after {self.attempts} attempts over {self.waited_s:.0f} s" if self.attempts > 1 else ""


def _storage_transient(exc: Exception) -> bool:
    return isinstance(exc, StorageError) and exc.retryable


def _retry(
    what: str,
    fn: Callable[[], T],
    tries: _Tries,
    patience_s: float,
    should_cancel: Callable[[], bool] | None,
    transient: Callable[[Exception], bool],
    waiting_for: str,
) -> T:
    started = time.monotonic()
    while True:
        tries.attempts += 1
        try:
            return fn()
        except Exception as exc:
            tries.waited_s = time.monotonic() - started
            if not transient(exc) or tries.waited_s >= patience_s:
                raise
            # The last try comes as the patience runs out.
            delay = min(BACKOFF_S * 2 ** (tries.attempts - 1), MAX_BACKOFF_S, patience_s - tries.waited_s)
            log.warning("%s failed (attempt %d), retrying in %.1fs: %s", what, tries.attempts, delay, exc)
            _wait(delay, f"{what} waited for {waiting_for}", should_cancel)


def _wait(seconds: float, doing: str, should_cancel: Callable[[], bool] | None) -> None:
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if should_cancel is not None and should_cancel():
            raise JobCancelled(f"the job was cancelled while {doing}")
        time.sleep(min(left, CANCEL_POLL_S))
