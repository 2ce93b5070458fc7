"""What ``lorp worker`` and ``lorp reconciler`` run: a real Celery worker process, and the reconciler loop.

The child reads its settings from ``LORP_*`` environment variables, so the settings object given here
(which may hold values from command-line flags) is exported into the child's environment.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from typing import Any, NoReturn

from app.core.config import Settings

CELERY_APP = "worker.tasks"
# How long `lorp serve` lets a running job finish when it stops, before a cold shutdown.
WARM_SHUTDOWN_S = 30.0
COLD_SHUTDOWN_S = 10.0
_PR_SET_PDEATHSIG = 1
# Set by lorp serve for the worker it owns: serve's pid (see exit_with_parent).
PARENT_PID_ENV = "LORP_EXIT_WITH_PARENT"

log = logging.getLogger(__name__)


def settings_env(settings: Settings, base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with every set setting as a LORP_ variable."""
    env = dict(os.environ if base is None else base)
    values = settings.model_dump()
    # Relative folders would resolve against the child's working directory, not this one's.
    values["data_dir"] = settings.resolved_data_dir
    values["model_roots"] = [root.expanduser().resolve() for root in settings.model_roots]
    for name, value in values.items():
        key = f"LORP_{name.upper()}"
        if value is None:
            env.pop(key, None)
        elif isinstance(value, list | dict):
            # pydantic-settings parses complex values from JSON.
            env[key] = json.dumps(value, default=str)
        elif isinstance(value, bool):
            env[key] = "true" if value else "false"
        else:
            env[key] = str(value)
    return env


def worker_command(
    settings: Settings, *, concurrency: int = 1, loglevel: str = "info", banner: bool = True
) -> list[str]:
    """The argv of a Celery worker on the job queue (prefork: one child process per job).

    ``banner=False`` drops Celery's start-up banner (``lorp serve`` prints its own summary line).
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        CELERY_APP,
        *([] if banner else ["--quiet"]),
        "worker",
        "-Q",
        settings.queue_name,
        "--concurrency",
        str(concurrency),
        "--pool",
        "prefork",
        "--loglevel",
        loglevel,
    ]
    return argv


def exit_with_parent() -> None:
    """In a worker that ``lorp serve`` started (``start_worker(owned=True)``): SIGKILL when serve dies (Linux).

    ``lorp serve`` stops its worker itself on every way out it controls (SIGINT, SIGTERM: a warm
    shutdown that lets a running job finish). This covers the ways it does not: killed outright, or
    killed while it waited for that warm shutdown. Nothing waits then for the worker's job, so the
    worker goes at once; its fork server's reapers kill the pool children with it
    (``worker.forkserver``), and the job, no longer beating, is taken back by the reconciler. A
    gentler signal is not enough: a worker already in its warm shutdown ignores a second SIGTERM
    (and one was seen stuck there for good in billiard's pool teardown).

    Called at the worker's start rather than between fork and exec: Python code run there, in a copy
    of serve's threaded process, could hang on a lock another thread held. The signal still follows
    the thread that forked. The variable is removed so that the worker's own children ignore it.
    """
    expected = os.environ.pop(PARENT_PID_ENV, None)
    if expected is None:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the parent stops the worker on its own way out
        return
    if str(os.getppid()) != expected:  # serve died before the request took effect
        log.error("lorp serve (pid %s) is gone; its worker exits", expected)
        os._exit(1)


def start_worker(
    settings: Settings,
    *,
    concurrency: int = 1,
    loglevel: str = "info",
    banner: bool = True,
    owned: bool = False,
    **popen: Any,
) -> subprocess.Popen[bytes]:
    """Start a worker as a child process (``lorp serve`` runs one beside the API); ``popen`` goes to Popen.

    ``owned=True`` ties the worker to this process: its own process group (so :func:`stop_worker`
    reaches its pool children too) and SIGKILL when this process dies, however it dies (the worker
    asks for it as it starts: :func:`exit_with_parent`). The parent-death signal follows the thread
    that forked: start an owned worker from a thread that lives as long as the worker should
    (``lorp serve``'s main thread, or its supervisor's).
    """
    argv = worker_command(settings, concurrency=concurrency, loglevel=loglevel, banner=banner)
    env = settings_env(settings, popen.pop("env", None))
    if owned:
        popen.setdefault("start_new_session", True)
        env[PARENT_PID_ENV] = str(os.getpid())
    return subprocess.Popen(argv, env=env, **popen)


def stop_worker(worker: subprocess.Popen[bytes], *, grace_s: float = WARM_SHUTDOWN_S) -> int | None:
    """Stop an owned worker: warm shutdown, then cold, then SIGKILL of its process group.

    Warm (SIGTERM) lets a running job finish within ``grace_s``; cold (SIGQUIT) ends it at once and
    leaves its message unacknowledged, so the job is delivered again (or the reconciler takes it
    back once its heartbeat is stale). Returns the worker's exit status.
    """
    for signum, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGQUIT, COLD_SHUTDOWN_S)):
        if worker.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            worker.send_signal(signum)
        try:
            worker.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            log.warning("worker %d still running %.0f s after %s", worker.pid, wait_s, signal.Signals(signum).name)
    if worker.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)
    # Whatever of its group outlived it (a pool child whose parent was killed) goes too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(worker.pid, signal.SIGKILL)
    return worker.returncode


def run_worker(settings: Settings, *, concurrency: int = 1, loglevel: str = "info") -> NoReturn:
    """Replace this process with a Celery worker, so signals (TERM: warm shutdown) reach Celery directly."""
    argv = worker_command(settings, concurrency=concurrency, loglevel=loglevel)
    os.execve(argv[0], argv, settings_env(settings))


def run_reconciler(settings: Settings, *, stop: threading.Event | None = None, once: bool = False) -> None:
    """Run reconciliation passes every ``reconcile_interval_s`` until ``stop`` is set (or once).

    Passes are safe to run concurrently (conditional updates, SKIP LOCKED), so one per deployment is
    enough and two do no harm. A failing pass (database down) is logged and retried next interval.
    The webhook dispatcher (``worker.webhooks``) runs beside it on a thread of its own until ``stop``;
    ``once`` makes one dispatch pass after the reconciliation pass instead.
    """
    from worker.reconciler import OutageWatch
    from worker.webhooks import deliver_due, start_dispatcher

    stop = stop or threading.Event()
    dispatcher = None if once else start_dispatcher(settings, stop)
    passes = OutageWatch()  # heartbeats missed while the database was away do not count
    while True:
        try:
            counts = passes.run(settings)
            if any(counts.values()):
                log.info("reconciler: %s", counts)
        except Exception:
            log.exception("reconciler pass failed; retrying in %.0f s", settings.reconcile_interval_s)
        if once:
            deliver_due(settings)
            return
        if stop.wait(settings.reconcile_interval_s):
            if dispatcher is not None:  # its attempts in flight end by their deadline
                dispatcher.join(timeout=settings.webhook_timeout_s + 10)
            return
