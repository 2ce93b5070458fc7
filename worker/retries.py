"""Storage calls retried with exponential backoff for as long as the job may wait, then a job failure
that says what to check.

The upload comes at the end of a job that may have run for hours: a store away for a minute (a
restart, a network cut) must not throw that work away. A retryable error is tried again after
``BACKOFF_S``, doubling up to ``MAX_BACKOFF_S``, the last try as ``patience_s`` from the first runs
out (``LORP_STORAGE_RETRY_S`` for a job's own transfers; ``CLEANUP_PATIENCE_S`` for removing
what a failed attempt left, which must not hold its failure up). While it waits, ``should_cancel``
is asked every ``CANCEL_POLL_S``: a cancel ends the wait, and so does the time limit (the runner's
cancel check raises it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from app import job_errors
from app.storage import StorageError
from lorp.errors import JobCancelled
from worker.failures import JobFailure

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
    """Call ``fn``, retrying retryable storage errors with backoff for up to ``patience_s``; then
    ``storage_unavailable``. A cancel seen while waiting raises :class:`JobCancelled`."""
    started = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except StorageError as exc:
            waited = time.monotonic() - started
            if not exc.retryable or waited >= patience_s:
                tries = f" after {attempt} attempts over {waited:.0f} s" if attempt > 1 else ""
                raise JobFailure(
                    job_errors.STORAGE_UNAVAILABLE.code,
                    f"{what} failed{tries}: {exc}. Check that the object store is reachable and writable, "
                    "then submit the job again.",
                ) from exc
            # The last try comes as the patience runs out.
            delay = min(BACKOFF_S * 2 ** (attempt - 1), MAX_BACKOFF_S, patience_s - waited)
            log.warning("%s failed (attempt %d), retrying in %.1fs: %s", what, attempt, delay, exc)
            _wait(delay, what, should_cancel)


def _wait(seconds: float, what: str, should_cancel: Callable[[], bool] | None) -> None:
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if should_cancel is not None and should_cancel():
            raise JobCancelled(f"the job was cancelled while {what} waited for object storage")
        time.sleep(min(left, CANCEL_POLL_S))
