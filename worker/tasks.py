"""Celery task: a thin adapter from a "run job X" message to `worker.runner`.

``celery -A worker.tasks worker -Q gpu`` finds the app here (``app``). The runner, and through it the
engine (torch, transformers), is imported inside the task so this module and the worker start fast.
"""

from __future__ import annotations

import os
from typing import Any

from app.core.config import get_settings
from worker.celery_app import RUN_JOB_TASK, celery_app

# Library progress bars (weights loading, shard writing) only clutter a worker's log; the job row
# carries the progress.
os.environ.setdefault("TQDM_DISABLE", "1")

app = celery_app


@celery_app.task(name=RUN_JOB_TASK, bind=True, ignore_result=True)
def run_job(self: Any, job_id: str) -> str:
    """Run the pruning job with this id; a duplicate delivery finds it claimed and does nothing."""
    from worker.runner import run_job as run

    return run(job_id, get_settings(), worker=self.request.hostname)
