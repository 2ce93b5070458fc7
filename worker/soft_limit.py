"""Celery's soft time limit, remembered by the job attempt it interrupted.

In a pool child the soft limit is a signal (SIGUSR1) whose handler raises ``SoftTimeLimitExceeded``
wherever the job happens to be. Code that catches ``Exception`` can hide it there: a library's
cleanup turns it into its own error (SQLAlchemy's connection ping, interrupted mid-query), the engine
reports a model that stopped loading as a model that cannot load, a loop of retries tries again. The
job then runs on to the hard limit, which kills the child and leaves the job to the reconciler, or it
fails with a code that blames the wrong thing.

:func:`watching` wraps the child's handler for the length of one job, so that the signal is also
recorded on a :class:`SoftLimit`. The runner raises the limit again at the engine's next checkpoint
(a progress report, a cancel check) and classifies any failure of an attempt whose limit fired as
``time_limit_exceeded`` (``worker.failures``).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from celery.exceptions import SoftTimeLimitExceeded

# The signal billiard's pool sends a child whose task passed its soft limit (None where there is none).
SIGNAL = getattr(signal, "SIGUSR1", None)


class SoftLimit:
    """Whether the soft limit's signal reached this attempt. One that is not watched never fires."""

    def __init__(self) -> None:
        # Written by a signal handler, read by the job's own thread: a plain attribute is enough.
        self._fired = False

    @property
    def fired(self) -> bool:
        return self._fired

    def check(self) -> None:
        """Raise the limit again if it fired: whatever caught it the first time did not end the job."""
        if self._fired:
            raise SoftTimeLimitExceeded()

    def _record(self) -> None:
        self._fired = True


@contextmanager
def watching() -> Iterator[SoftLimit]:
    """While the block runs, the soft limit's signal is recorded on the :class:`SoftLimit` yielded, then
    handled as before (billiard's handler raises the limit). Only a Python handler is wrapped: in a
    thread other than the main one, or where no handler is installed (not a pool child), nothing
    changes and the limit never fires."""
    limit = SoftLimit()
    signum = SIGNAL
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signum) if signum is not None and in_main_thread else None
    if signum is None or not callable(previous):
        yield limit
        return
    handle = previous

    def record_then_handle(received: int, frame: FrameType | None) -> None:
        limit._record()
        handle(received, frame)

    signal.signal(signum, record_then_handle)
    try:
        yield limit
    finally:
        signal.signal(signum, previous)
