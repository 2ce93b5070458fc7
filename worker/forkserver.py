"""The fork server the worker's pool children come from: one single-threaded process, warm with the engine.

Why not fork from the worker's main process: that process runs threads (the liveness beat and the
start watch; in the embedded mode also billiard's supervisor, task and result threads beside the
broker's SQLite polling loop). ``fork()`` copies only the calling thread, so a lock that another
thread held at that instant (SQLite's, the allocator's, a logging handler's) stays held for ever in
the child, and the child hangs at its first use of it. It happened: 1,000 jobs through ``lorp
serve``, and after about 116 a fresh pool child hung for good on its first SQLite connect.

So the pool (``worker.pool.JobPool``) uses billiard's ``forkserver`` start method: billiard starts
one fork server per worker by exec (a fresh interpreter, no inherited locks), which runs
:func:`preload` (billiard imports ``worker.forkserver_preload``) and from then on forks every pool
child from its one thread. :func:`preload` warms the engine (``worker.warmup``), so each child
starts a job without paying for imports, as a child forked from a warmed main process did (docs/benchmarks.md has the
start cost of each way, measured side by side).

It also replaces one step of billiard's fork server (``_serve_one``: what runs for each new child),
to fix two things billiard's own leaves out:

- Exit statuses. billiard's server ignores SIGCHLD, so it never learns how a child ended; a child
  that leaves through ``os._exit`` (every pool child does) or is killed is reported as 255. Here a
  small reaper, forked for each child, waits for it and reports its real status (128 + the signal
  when it was killed, the shell's convention, since billiard reads the status as unsigned).
- Outliving the worker. A child forked by the server is not the main process's child, so the
  kernel's parent-death signal cannot tie it to the main process. The reaper watches the main
  process (a pidfd) and kills the child the moment the main process is gone, however it died.

Nothing here may start a thread: this process must stay single-threaded (:func:`server_threads`
counts them, native ones included; numpy's BLAS pool is kept to the calling thread for that).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import select
import signal
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# The worker's main process (the server's parent), watched by every reaper; None where pidfds are
# not available (not Linux), and then a child lives until its job ends.
_main_pidfd: int | None = None


def server_threads(pid: int | None = None) -> int:
    """Threads of a process (this one by default), native ones included, as the kernel counts them."""
    task_dir = Path(f"/proc/{pid or os.getpid()}/task")
    try:
        return len(os.listdir(task_dir))
    except OSError:  # not Linux: Python's own count is the best available
        import threading

        return threading.active_count()


def exit_status(status: int) -> int:
    """A ``waitpid`` status as a non-negative exit code: the code itself, or 128 + the signal."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _watch_main_process() -> int | None:
    """A pidfd of this server's parent, the worker's main process; None where pidfds do not exist."""
    parent = os.getppid()
    if parent == 1:  # the main process died before this server finished starting
        os._exit(1)
    try:
        fd = os.pidfd_open(parent)
    except (AttributeError, OSError):
        return None
    if os.getppid() != parent:  # it died while the pidfd was opened: the pid may be another's now
        os._exit(1)
    return fd


def _wait_for(pid: int) -> int:
    """Wait for pool child ``pid``; kill it when the worker's main process dies first. Its exit code."""
    if _main_pidfd is not None:
        child_fd = os.pidfd_open(pid)
        while True:
            ready, _, _ = select.select([child_fd, _main_pidfd], [], [])
            if child_fd in ready:
                break
            # The main process is gone (kill -9, the kernel's OOM killer, lorp serve's death): so
            # is whoever would read this child's result, and its job goes back to the queue.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            break
        os.close(child_fd)
    _, status = os.waitpid(pid, 0)
    return exit_status(status)


def _serve_one(s: Any, listener: Any, alive_r: int, handler: Any) -> None:
    """billiard's step for one new pool child, with a reaper between the server and the child.

    The protocol towards the worker's main process is billiard's: the child's pid, then its exit
    code, on the status pipe. The reaper writes both; the child runs what billiard's step runs.
    """
    from billiard import forkserver, reduction, semaphore_tracker, spawn

    listener.close()
    os.close(alive_r)
    signal.signal(signal.SIGCHLD, handler)  # the server ignores it; the reaper needs waitpid
    fds = reduction.recvfds(s, forkserver.MAXFDS_TO_SEND + 1)
    s.close()
    child_r, child_w, alive_w, tracker_fd, *inherited = fds

    # A signal to the whole process group (a warm stop, Ctrl-C) is for the pool child, not its reaper,
    # which must live to report how the child ended.
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in (signal.SIGTERM, signal.SIGINT)}
    pid = os.fork()
    if pid == 0:  # the pool child
        code = 1
        try:
            for signum, disposition in previous.items():
                signal.signal(signum, disposition)
            os.close(child_w)
            if _main_pidfd is not None:
                os.close(_main_pidfd)
            forkserver._forkserver._forkserver_alive_fd = alive_w
            forkserver._forkserver._inherited_fds = inherited
            semaphore_tracker._semaphore_tracker._fd = tracker_fd
            if "random" in sys.modules:
                random.seed()
            code = spawn._main(child_r)
        finally:
            os._exit(code)

    os.close(child_r)
    os.close(alive_w)
    forkserver.write_unsigned(child_w, pid)
    forkserver.write_unsigned(child_w, _wait_for(pid))


def preload() -> None:
    """In the fork server only: import and warm what a job needs, then take over billiard's per-child step."""
    global _main_pidfd
    started = time.perf_counter()
    # numpy's OpenBLAS starts a pool of threads when it is imported; this process must have none.
    # (Jobs do their heavy algebra in torch, whose own threads start in each child.)
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    import billiard.forkserver

    import worker.runner  # the engine's service side
    import worker.tasks  # noqa: F401  (registers the job task)
    from worker.warmup import warm_imports

    steps = warm_imports()
    _main_pidfd = _watch_main_process()
    billiard.forkserver._serve_one = _serve_one
    threads = server_threads()
    shown = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in steps.items())
    if threads != 1:
        log.error("the fork server runs %d threads; pool children forked from it may hang", threads)
    log.info("fork server %d warm in %.1f s (%s)", os.getpid(), time.perf_counter() - started, shown)
