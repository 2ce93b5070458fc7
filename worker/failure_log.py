"""A failure that repeats while what it needs is away (the database, mostly), logged without a flood.

A heartbeat, a liveness beat, a progress write or a cancel check runs every second or so: during an
outage of five minutes each would log its traceback some 300 times. :class:`RepeatedFailure` logs
the first failure with its traceback, then one line at most every ``EVERY_S`` with how many there
were, and the recovery once, with how long it lasted.
"""

from __future__ import annotations

import logging
import threading
import time

from worker.failures import first_line

EVERY_S = 30.0


class RepeatedFailure:
    """The failures of one repeated action (``what``: "heartbeat of job X"), for ``logger``."""

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self.logger, self.what = logger, what
        self._lock = threading.Lock()
        self._since: float | None = None
        self._failures = 0
        self._said_at = 0.0

    def failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        with self._lock:
            first = self._since is None
            if first:
                self._since, self._failures = now, 0
            self._failures += 1
            due = first or now - self._said_at >= EVERY_S
            if due:
                self._said_at = now
            failures, since = self._failures, self._since
        if first:
            self.logger.warning("%s failed; trying again", self.what, exc_info=exc)
        elif due and since is not None:
            self.logger.warning(
                "%s still failing: %d times in %.0f s (%s: %s)",
                self.what,
                failures,
                now - since,
                type(exc).__name__,
                first_line(exc, 300),
            )

    def succeeded(self) -> None:
        with self._lock:
            since, failures = self._since, self._failures
            self._since, self._failures = None, 0
        if since is not None:
            self.logger.info(
                "%s works again, after %d failure%s over %.0f s",
                self.what,
                failures,
                "" if failures == 1 else "s",
                time.monotonic() - since,
            )
