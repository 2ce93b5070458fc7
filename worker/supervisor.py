"""``lorp serve``'s watch over its worker: a worker that exits unasked is started again, with backoff.

A worker that ran at least ``steady_s`` before it died is restarted after ``base_delay_s``; each
further death within ``steady_s`` of its start doubles the wait (at most ``max_delay_s``). After
``max_quick_failures`` such quick deaths in a row the supervisor stops restarting and says why
(``gave_up``): a worker that cannot stay up (a broken install, a database it cannot reach) would
otherwise spin.
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class WorkerSupervisor:
    """Runs a worker from ``start`` and keeps it running until ``stop``; ``stop_fn`` ends one."""

    def __init__(
        self,
        start: Callable[[], subprocess.Popen[bytes]],
        stop_fn: Callable[[subprocess.Popen[bytes]], object],
        *,
        steady_s: float = 60.0,
        base_delay_s: float = 1.0,
        max_delay_s: float = 30.0,
        max_quick_failures: int = 5,
        poll_s: float = 0.5,
    ) -> None:
        self._start, self._stop_fn = start, stop_fn
        self.steady_s, self.base_delay_s, self.max_delay_s = steady_s, base_delay_s, max_delay_s
        self.max_quick_failures, self.poll_s = max_quick_failures, poll_s
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self.restarts = 0
        self.quick_failures = 0
        self.gave_up: str | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self._started_at = 0.0
        self._thread: threading.Thread | None = None

    def launch(self, worker: subprocess.Popen[bytes]) -> None:
        """Watch ``worker`` (already started) from a thread that restarts it when it dies."""
        self.worker, self._started_at = worker, time.monotonic()
        # The thread that forks a worker is the one whose exit would signal it (PR_SET_PDEATHSIG):
        # this thread lives until stop(), so restarted workers keep that tie to lorp serve.
        self._thread = threading.Thread(target=self._watch, name="worker-supervisor", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stopping.wait(self.poll_s):
            worker = self.worker
            if worker is None or worker.poll() is None:
                continue
            uptime = time.monotonic() - self._started_at
            self.quick_failures = self.quick_failures + 1 if uptime < self.steady_s else 1
            if self.quick_failures >= self.max_quick_failures:
                self.gave_up = (
                    f"the worker exited {self.quick_failures} times in a row within {self.steady_s:.0f} s of "
                    f"starting (last status {worker.returncode}); not restarting it"
                )
                log.error("lorp serve: %s", self.gave_up)
                self.worker = None
                return
            delay = min(self.max_delay_s, self.base_delay_s * 2 ** (self.quick_failures - 1))
            log.warning(
                "lorp serve: the worker exited with status %s after %.0f s; restarting it in %.0f s",
                worker.returncode,
                uptime,
                delay,
            )
            if self._stopping.wait(delay):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                try:
                    self.worker = self._start()
                except Exception:
                    # Counted as one more quick death: the dead worker stays in place for the next poll.
                    log.exception("lorp serve: could not start the worker again")
                    self._started_at = time.monotonic()
                    continue
                self._started_at = time.monotonic()
                self.restarts += 1
            log.warning("lorp serve: worker restarted (pid %d, restart %d)", self.worker.pid, self.restarts)

    def stop(self) -> None:
        """Stop watching, then stop the worker that runs now (if any)."""
        with self._lock:
            self._stopping.set()
            worker = self.worker
        if worker is not None:
            self._stop_fn(worker)
        if self._thread is not None:
            self._thread.join(timeout=5)
