"""Celery task: a thin adapter from a "run job X" message to `worker.runner`.

``celery -A worker.tasks worker -Q gpu`` finds the app here (``app``). Importing this module stays
light (no torch); the worker's main process imports the engine once at start (``preload_engine``),
so every pool child, forked fresh for each job, starts its job without paying for the import.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from celery.signals import worker_init, worker_ready, worker_shutdown

from app.core.config import get_settings
from app.queue import RUN_JOB_TASK
from worker.celery_app import celery_app

# Library progress bars (weights loading, shard writing) only clutter a worker's log; the job row
# carries the progress.
os.environ.setdefault("TQDM_DISABLE", "1")

app = celery_app

log = logging.getLogger(__name__)

ABANDONED_EXIT_CODE = 75  # EX_TEMPFAIL: the job was taken back and will run again (or has failed)


@worker_init.connect
def preload_engine(**_: Any) -> None:
    """Import the runner and the engine in the worker's main process, before the pool forks.

    With one task per child (``worker_max_tasks_per_child=1``) each job runs in a newly forked child;
    a parent that already holds torch and transformers hands them to every child for free instead of
    each job importing them for seconds. Only imports: nothing here may create a CUDA context, which
    a forked child could not use.
    """
    started = time.perf_counter()
    import torch

    import worker.runner  # noqa: F401
    from worker.warmup import warm_imports

    steps = warm_imports()
    publish_started = time.perf_counter()
    _publish_catalogue()
    steps["task catalogue"] = time.perf_counter() - publish_started
    if torch.cuda.is_initialized():  # pragma: no cover - a guard for future imports
        log.warning("CUDA was initialised while preloading the engine; pool children may fail to use it")
    shown = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in steps.items())
    log.info("engine preloaded in %.1f s (%s)", time.perf_counter() - started, shown)


def _publish_catalogue() -> None:
    """Say in the database which downstream tasks this worker can run (``worker.catalogue``).

    A failure is logged, not fatal: jobs without tasks run as before, and the API refuses those
    with tasks until a worker publishes. The pooled connections are closed before the pool forks.
    """
    from app.db.session import get_engine
    from worker.catalogue import publish_catalogue

    settings = get_settings()
    try:
        publish_catalogue(settings)
    except Exception:
        log.exception("could not publish the downstream task catalogue; jobs that ask for tasks are refused")
    finally:
        get_engine(settings.sqlalchemy_url).dispose()


_beat: Any = None


@worker_ready.connect
def start_liveness_beat(sender: Any = None, **_: Any) -> None:
    """Record in the database that this worker now takes jobs, and keep saying so (``worker.liveness``)."""
    global _beat
    from worker.liveness import WorkerBeat

    if _beat is not None and _beat.is_alive():
        return
    settings = get_settings()
    task_consumer = getattr(sender, "task_consumer", None)
    queues = [q.name for q in getattr(task_consumer, "queues", None) or []] or [settings.queue_name]
    controller = getattr(sender, "controller", None)
    _beat = WorkerBeat(
        settings,
        name=str(getattr(sender, "hostname", None) or "celery"),
        queues=queues,
        concurrency=int(getattr(controller, "concurrency", None) or 1),
    )
    _beat.start()


@worker_shutdown.connect
def stop_liveness_beat(**_: Any) -> None:
    """A warm shutdown: the API stops counting this worker now rather than after its timeout."""
    if _beat is not None:
        _beat.stop()


def _exit_pool_child() -> None:
    """End this pool child at once: it runs one job only (``worker_max_tasks_per_child=1``), and that
    job was taken from it while it hung. Celery forks a fresh child for the next job."""
    logging.shutdown()
    os._exit(ABANDONED_EXIT_CODE)


@celery_app.task(name=RUN_JOB_TASK, bind=True, ignore_result=True)
def run_job(self: Any, job_id: str) -> str:
    """Run the pruning job with this id; a duplicate delivery finds it claimed and does nothing."""
    from worker.runner import run_job as run

    return run(job_id, get_settings(), worker=self.request.hostname, abandon=_exit_pool_child)
