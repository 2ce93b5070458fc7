"""Why a run ended: the job error code and a message a person can act on, for any exception."""

from __future__ import annotations

from celery.exceptions import SoftTimeLimitExceeded
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from app import job_errors
from app.core.client_json import escape_unstorable
from app.core.config import Settings
from app.core.disk import exception_chain, is_disk_full, is_disk_full_at
from app.db.models import UPLOADING_STAGE
from app.storage import StorageError
from lorp.errors import LorpError, is_out_of_memory
from lorp.stages import Stage

# What a job was writing when the disk filled, in the client's terms, by the stage it was in.
_WRITING: dict[str, str] = {
    Stage.loading: "fetching the model and the calibration text",
    Stage.saving: "saving the pruned model",
    Stage.verifying: "checking the saved pruned model",
    Stage.reporting: "writing the report and the heatmap",
    UPLOADING_STAGE: "storing the job's files",
}
_WRITING_DEFAULT = "writing the job's working files"


class JobFailure(LorpError):
    """A failure the runner itself detects, with the job error code to record."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def time_limit_in(exc: BaseException) -> bool:
    """Whether Celery's soft time limit is ``exc`` or in its chain. The limit is a signal that lands
    wherever the job is: inside a library's own error handling it may surface as that library's error
    (SQLAlchemy's connection ping, interrupted, then failing to put the connection back), with the
    limit only as its context."""
    return any(isinstance(e, SoftTimeLimitExceeded) for e in exception_chain(exc))


def time_limit_message(settings: Settings, *, killed: bool = False) -> str:
    """Why a job past ``LORP_JOB_TIME_LIMIT_S`` failed; ``killed``: it did not stop at the limit and its
    process was killed at the hard limit, ``LORP_JOB_HARD_LIMIT_GRACE_S`` later."""
    ran = f"the job ran longer than the worker's limit of {settings.job_time_limit_s} s (LORP_JOB_TIME_LIMIT_S)"
    if killed:
        ran += (
            f" and did not stop within {settings.job_hard_limit_grace_s} s of it (LORP_JOB_HARD_LIMIT_GRACE_S: "
            "a native call that ran all that time, or a stopped process), so its process was killed"
        )
    return f"{ran}; lower calibration.num_samples or evaluation.max_windows, or raise the limit"


def first_line(exc: BaseException, limit: int = 500) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def is_database_outage(exc: BaseException) -> bool:
    """A lost or refused database connection (a restart, a network cut, an exhausted pool).

    Not a full disk (SQLite's "database or disk is full", Postgres' disk_full are OperationalErrors
    too): retrying cannot help until someone frees space, so the job fails with ``disk_full``."""
    if is_disk_full(exc):
        return False
    if isinstance(exc, OperationalError | PoolTimeoutError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def _disk_filled(exc: BaseException, settings: Settings) -> bool:
    return is_disk_full_at(exc, (settings.work_dir, settings.resolved_data_dir))


def _what_was_written(exc: BaseException, stage: str | None) -> str:
    """What the run was writing, from the most telling evidence: the database's error, the storage
    transfer that failed (the worker's own "downloading ..." / "uploading ..." messages), the stage,
    then the writer's own error (safetensors saves the weights)."""
    chain = list(exception_chain(exc))
    texts = [str(e) for e in chain]
    if any(isinstance(e, DBAPIError) for e in chain):
        return "recording the job in the database"
    if any(text.startswith("downloading ") for text in texts):
        return _WRITING[Stage.loading]
    if stage is not None and stage in _WRITING:
        return _WRITING[stage]
    if any(isinstance(e, StorageError) for e in chain) or any(text.startswith("uploading ") for text in texts):
        return _WRITING[UPLOADING_STAGE]
    if any(type(e).__name__ == "SafetensorError" for e in chain):
        return _WRITING[Stage.saving]
    return _WRITING_DEFAULT


def _disk_full_message(exc: BaseException, stage: str | None) -> str:
    return (
        f"the worker's disk filled up while {_what_was_written(exc, stage)} (no space left on the device), "
        "and nothing of the job was kept; submit it again once an operator has freed disk space on the "
        "worker, or run it on a worker with more disk"
    )


def classify_failure(
    exc: BaseException, settings: Settings, stage: str | None = None, *, time_limit: bool = False
) -> tuple[str, str]:
    """The job error code and a message a person can act on, for an exception that ended a run.

    ``stage`` is the stage the run was in (its last recorded progress), which says what a full disk
    interrupted. ``time_limit`` says that Celery's soft time limit reached the run (``worker.soft_limit``):
    whatever error it ended with, the limit is why. Messages never hold a NUL or an unpaired surrogate
    (an error may quote the job's input, and the database stores the message).
    """
    code, message = _classify(exc, settings, stage, time_limit)
    return code, escape_unstorable(message)


def _classify(exc: BaseException, settings: Settings, stage: str | None, time_limit: bool) -> tuple[str, str]:
    # First: a full disk surfaces wrapped (a storage error, an engine error, the database's), and the
    # wrapper's code would hide the only thing that helps.
    if _disk_filled(exc, settings):
        return job_errors.DISK_FULL.code, _disk_full_message(exc, stage)
    # Then the time limit, which also surfaces wrapped: a model whose loading it interrupted is not a
    # model that cannot load.
    if time_limit or time_limit_in(exc):
        return job_errors.TIME_LIMIT_EXCEEDED.code, time_limit_message(settings)
    if isinstance(exc, StorageError):
        return exc.code, f"object storage failed: {exc.message}"
    if isinstance(exc, LorpError):
        where = f" (field {exc.field})" if exc.field else ""
        return exc.code, f"{exc.message}{where}"
    if isinstance(exc, ValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'request'}: {err['msg']}" for err in exc.errors()[:5]
        )
        return job_errors.INVALID_REQUEST.code, f"the stored request is not valid for this worker: {problems}"
    if is_out_of_memory(exc):
        return (
            job_errors.OUT_OF_MEMORY.code,
            f"the job ran out of memory ({first_line(exc, 300)}); lower calibration.batch_size or "
            "calibration.seq_len, use a smaller dtype (options.dtype), or run it on a GPU with more memory",
        )
    return job_errors.INTERNAL_ERROR.code, f"unexpected {type(exc).__name__}: {first_line(exc)}"
