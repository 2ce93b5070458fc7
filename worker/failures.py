"""Why a run ended: the job error code and a message a person can act on, for any exception."""

from __future__ import annotations

from celery.exceptions import SoftTimeLimitExceeded
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from app.core.config import Settings
from app.storage import StorageError
from lorp.errors import LorpError, is_out_of_memory


class JobFailure(LorpError):
    """A failure the runner itself detects, with the job error code to record."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def first_line(exc: BaseException, limit: int = 500) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def is_database_outage(exc: BaseException) -> bool:
    """A lost or refused database connection (a restart, a network cut, an exhausted pool)."""
    if isinstance(exc, OperationalError | PoolTimeoutError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def classify_failure(exc: BaseException, settings: Settings) -> tuple[str, str]:
    """The job error code and a message a person can act on, for an exception that ended a run."""
    if isinstance(exc, StorageError):
        return exc.code, f"object storage failed: {exc.message}"
    if isinstance(exc, LorpError):
        where = f" (field {exc.field})" if exc.field else ""
        return exc.code, f"{exc.message}{where}"
    if isinstance(exc, ValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'request'}: {err['msg']}" for err in exc.errors()[:5]
        )
        return "invalid_request", f"the stored request is not valid for this worker: {problems}"
    if is_out_of_memory(exc):
        return (
            "out_of_memory",
            f"the job ran out of memory ({first_line(exc, 300)}); lower calibration.batch_size or "
            "calibration.seq_len, use a smaller dtype (options.dtype), or run it on a GPU with more memory",
        )
    if isinstance(exc, SoftTimeLimitExceeded):
        return (
            "time_limit_exceeded",
            f"the job ran longer than the worker's limit of {settings.job_time_limit_s} s "
            "(LORP_JOB_TIME_LIMIT_S); lower calibration.num_samples or evaluation.max_windows, or raise the limit",
        )
    return "internal_error", f"unexpected {type(exc).__name__}: {first_line(exc)}"
