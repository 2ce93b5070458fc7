"""Celery task: a thin adapter from a "run job X" message to `worker.runner`.

``celery -A worker.tasks worker -Q gpu`` finds the app here (``app``). Importing this module stays
light (no torch): the engine is imported once, by the fork server every pool child comes from
(``worker.forkserver``), so each job starts in a fresh, warm child.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from celery import Task
from celery.exceptions import TimeLimitExceeded
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
def exit_with_serve(**_: Any) -> None:
    """A worker ``lorp serve`` owns dies with it (``worker.service_cli.exit_with_parent``)."""
    from worker.service_cli import exit_with_parent

    exit_with_parent()


def _publish_catalogue() -> None:
    """Say in the database which downstream tasks this worker can run (``worker.catalogue``).

    A failure is logged, not fatal: jobs without tasks run as before, and the API refuses those
    with tasks until a worker publishes. Its pooled connections are closed: the main process keeps none.
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
def on_ready(sender: Any = None, **_: Any) -> None:
    """The pool is up (its fork server warm, ``worker.forkserver``) and the consumer takes jobs: publish
    which downstream tasks this worker can run (``worker.catalogue``), then record in the database that
    it takes jobs, and keep saying so (``worker.liveness``); each beat also looks for pool children
    stuck before their job's start (``worker.startwatch``). Both say "ready" to the API and to tests,
    so neither comes before the worker can start a job at once."""
    global _beat
    from worker.liveness import WorkerBeat
    from worker.startwatch import StartWatch

    if _beat is not None and _beat.is_alive():
        return
    started = time.perf_counter()
    _publish_catalogue()
    log.info("task catalogue published in %.1f s", time.perf_counter() - started)
    settings = get_settings()
    task_consumer = getattr(sender, "task_consumer", None)
    queues = [q.name for q in getattr(task_consumer, "queues", None) or []] or [settings.queue_name]
    controller = getattr(sender, "controller", None)
    name = str(getattr(sender, "hostname", None) or "celery")
    _beat = WorkerBeat(
        settings,
        name=name,
        queues=queues,
        concurrency=int(getattr(controller, "concurrency", None) or 1),
        watch=StartWatch(settings, name),
    )
    _beat.start()


@worker_shutdown.connect
def stop_liveness_beat(**_: Any) -> None:
    """A warm shutdown: the API stops counting this worker now rather than after its timeout."""
    if _beat is not None:
        _beat.stop()


def _exit_pool_child() -> None:
    """End this pool child at once: it runs one job only (``worker_max_tasks_per_child=1``), and that
    job was taken from it while it hung. The fork server forks a fresh child for the next job."""
    logging.shutdown()
    os._exit(ABANDONED_EXIT_CODE)


class _JobTask(Task):
    """The job task's class: what happens when Celery kills a job's pool process at the hard limit."""

    def on_failure(self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        # Called in the worker's main process when the pool process was killed at the hard time limit
        # (in the pool process for anything the task raised, which is not this exception).
        if isinstance(exc, TimeLimitExceeded) and args:
            from worker.hard_limit import fail_after_hard_limit

            try:
                fail_after_hard_limit(args[0], get_settings())
            except Exception:
                log.exception("job %s: could not record its hard time limit; the reconciler takes it back", args[0])


@celery_app.task(name=RUN_JOB_TASK, bind=True, ignore_result=True, base=_JobTask)
def run_job(self: Any, job_id: str) -> str:
    """Run the pruning job with this id; a duplicate delivery finds it claimed and does nothing."""
    from worker import soft_limit
    from worker.runner import run_job as run

    with soft_limit.watching() as limit:
        return run(job_id, get_settings(), worker=self.request.hostname, abandon=_exit_pool_child, soft_limit=limit)
