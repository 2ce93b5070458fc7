"""What an attempt leaves behind, and its removal: the objects it uploaded under ``jobs/{id}/``, its work
folder (``LORP_DATA_DIR/work/<job id>``) and its scratch (``LORP_SCRATCH_DIR/<job id>``, the states a
sequential run keeps so that a retry resumes).

Used by the runner in the pool process and by the worker's main process after a hard time limit
(``worker.hard_limit``), which must stay free of torch: nothing here imports the engine.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from pathlib import Path

from app.core.config import Settings
from app.storage import Storage
from app.storage.keys import job_prefix
from worker.failures import JobFailure
from worker.retries import CLEANUP_PATIENCE_S, with_storage_retries

log = logging.getLogger(__name__)


def work_folder(settings: Settings, job_id: uuid.UUID) -> Path:
    """Where an attempt fetches its inputs and writes its outputs; a retry starts it afresh."""
    return settings.work_dir / str(job_id)


def scratch_folder(settings: Settings, job_id: uuid.UUID) -> Path:
    """Where a job keeps what a retry may resume from; removed once the job has ended."""
    return settings.job_scratch_root / str(job_id)


def delete_outputs(storage: Storage, job_id: uuid.UUID) -> None:
    """Remove whatever an attempt uploaded (after a failure or a cancel); logged, never raised."""
    prefix = job_prefix(job_id)
    try:
        removed = with_storage_retries(
            f"deleting {prefix}", lambda: storage.delete_prefix(prefix), patience_s=CLEANUP_PATIENCE_S
        )
    except JobFailure:
        log.error("job %s: uploaded objects under %s could not be removed", job_id, prefix, exc_info=True)
        return
    if removed:
        log.info("job %s: removed %d uploaded object(s) under %s", job_id, removed, prefix)


def remove_folder(folder: Path) -> None:
    """``folder`` and all it holds, if it is there; a failure is logged, never raised."""
    try:
        shutil.rmtree(folder)
    except FileNotFoundError:
        pass
    except OSError:
        log.warning("could not remove %s", folder, exc_info=True)
