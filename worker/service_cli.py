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


def _die_with_parent() -> None:
    """In a forked child before exec: ask the kernel for SIGTERM when the parent dies (Linux).

    SIGTERM is Celery's warm shutdown: the worker stops taking jobs, lets a running one finish and
    exits, so even a ``kill -9`` of ``lorp serve`` leaves no worker consuming its queue.
    """
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the parent stops the worker on its own way out
        return
    if os.getppid() != parent:  # the parent died before the request took effect
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
    reaches its pool children too) and SIGTERM when this process dies, however it dies. Start an
    owned worker before this process starts threads (the parent-death signal is set between fork
    and exec, and follows the thread that forked).
    """
    argv = worker_command(settings, concurrency=concurrency, loglevel=loglevel, banner=banner)
    if owned:
        popen.setdefault("start_new_session", True)
        popen.setdefault("preexec_fn", _die_with_parent)
    return subprocess.Popen(argv, env=settings_env(settings, popen.pop("env", None)), **popen)


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
    """
    from worker.reconciler import reconcile_once

    stop = stop or threading.Event()
    while True:
        try:
            counts = reconcile_once(settings)
            if any(counts.values()):
                log.info("reconciler: %s", counts)
        except Exception:
            log.exception("reconciler pass failed; retrying in %.0f s", settings.reconcile_interval_s)
        if once or stop.wait(settings.reconcile_interval_s):
            return
