"""What ``lorp worker`` and ``lorp reconciler`` run: a real Celery worker process, and the reconciler loop.

The child reads its settings from ``LORP_*`` environment variables, so the settings object given here
(which may hold values from command-line flags) is exported into the child's environment.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from typing import Any, NoReturn

from app.core.config import Settings

CELERY_APP = "worker.tasks"

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


def start_worker(
    settings: Settings,
    *,
    concurrency: int = 1,
    loglevel: str = "info",
    banner: bool = True,
    **popen: Any,
) -> subprocess.Popen[bytes]:
    """Start a worker as a child process (``lorp serve`` runs one beside the API); ``popen`` goes to Popen."""
    argv = worker_command(settings, concurrency=concurrency, loglevel=loglevel, banner=banner)
    return subprocess.Popen(argv, env=settings_env(settings, popen.pop("env", None)), **popen)


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
