"""Storage calls retried with exponential backoff, then a job failure that says what to check."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from app import job_errors
from app.storage import StorageError
from worker.failures import JobFailure

log = logging.getLogger(__name__)

STORAGE_ATTEMPTS = 4
STORAGE_BACKOFF_S = 0.5

T = TypeVar("T")


def with_storage_retries(what: str, fn: Callable[[], T]) -> T:
    """Call ``fn``, retrying retryable storage errors with exponential backoff; then storage_unavailable."""
    for attempt in range(1, STORAGE_ATTEMPTS + 1):
        try:
            return fn()
        except StorageError as exc:
            if not exc.retryable or attempt == STORAGE_ATTEMPTS:
                tries = f" after {attempt} attempts" if attempt > 1 else ""
                raise JobFailure(
                    job_errors.STORAGE_UNAVAILABLE.code,
                    f"{what} failed{tries}: {exc}. Check that the object store is reachable and writable, "
                    "then submit the job again.",
                ) from exc
            delay = STORAGE_BACKOFF_S * 2 ** (attempt - 1)
            log.warning("%s failed (attempt %d/%d), retrying in %.1fs: %s", what, attempt, STORAGE_ATTEMPTS, delay, exc)
            time.sleep(delay)
    raise AssertionError("unreachable")
