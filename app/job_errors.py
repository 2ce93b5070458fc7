"""Every code a failed job can carry: what it means, and whether the same request may succeed if it is
submitted again. The one list: the worker's classification and the reconciler take their codes from
it, the API shows ``error.retryable`` from it, and the README's table of job error codes is checked
against it.

The engine's and the storage's errors keep their codes on their classes (``lorp.errors``,
``app.storage.base``): the entries for them are built from those classes, not spelled again.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.storage.base import ObjectNotFound, StorageError
from lorp.errors import (
    BudgetError,
    CalibrationError,
    EngineError,
    InvalidRequestError,
    LorpError,
    MissingStatisticError,
    ModelLoadError,
    ReloadCheckError,
    UnsupportedArchitectureError,
)


@dataclass(frozen=True)
class JobErrorCode:
    """One code: ``retryable`` is True where the failure came from the service's condition (a worker
    lost, a store down, a disk full), not from the request, so submitting it again may succeed."""

    code: str
    meaning: str
    retryable: bool


INVALID_REQUEST = JobErrorCode(
    InvalidRequestError.code,
    "the request cannot be met as written for this model or this worker (the message names the field)",
    retryable=False,
)
INVALID_BUDGET = JobErrorCode(
    BudgetError.code, "the pruning target is more than this model allows, or no plan meets it", retryable=False
)
UNSUPPORTED_ARCHITECTURE = JobErrorCode(
    UnsupportedArchitectureError.code, "the model's architecture has no known layout of decoder blocks", retryable=False
)
MODEL_LOAD_FAILED = JobErrorCode(
    ModelLoadError.code,
    "the model could not be read: missing, corrupt, needing remote code, or too large to copy",
    retryable=False,
)
CALIBRATION_DATA = JobErrorCode(
    CalibrationError.code,
    "the calibration or evaluation text cannot give what was asked (too short, empty, unreadable)",
    retryable=False,
)
MISSING_STATISTIC = JobErrorCode(
    MissingStatisticError.code, "the selection method needs a statistic the analysis does not hold", retryable=False
)
RELOAD_CHECK_FAILED = JobErrorCode(
    ReloadCheckError.code,
    "the pruned model, once written, did not reload to the model the job measured (a fault of the service)",
    retryable=False,
)
ENGINE_ERROR = JobErrorCode(EngineError.code, "the engine refused the job for a reason of its own", retryable=False)
OUT_OF_MEMORY = JobErrorCode(
    "out_of_memory",
    "the job needed more memory than its device has: lower the batch size or the window length, or use a smaller dtype",
    retryable=False,
)
TIME_LIMIT_EXCEEDED = JobErrorCode(
    "time_limit_exceeded", "the job ran longer than the worker's limit (LORP_JOB_TIME_LIMIT_S)", retryable=False
)
DISK_FULL = JobErrorCode(
    "disk_full",
    "the worker's disk filled up and nothing of the job was kept; it may succeed once an operator frees space",
    retryable=True,
)
STORAGE_UNAVAILABLE = JobErrorCode(
    StorageError.code, "object storage failed, after retries, while the job read or wrote it", retryable=True
)
OBJECT_MISSING = JobErrorCode(
    ObjectNotFound.code, "an object the job refers to is no longer in storage", retryable=False
)
WORKER_LOST = JobErrorCode(
    "worker_lost",
    "the job's worker stopped sending heartbeats in each of its attempts (killed, its machine lost; a job "
    "that takes more memory than the machine has ends its worker this way too)",
    retryable=True,
)
STALLED = JobErrorCode(
    "stalled",
    "the job made no progress for LORP_STALL_TIMEOUT_S in each of its attempts while its worker lived "
    "(a hung read of the model or the data)",
    retryable=True,
)
INTERNAL_ERROR = JobErrorCode(
    "internal_error", "an unexpected error (the message names it): a fault of the service to report", retryable=False
)
UNKNOWN = JobErrorCode(LorpError.code, "a failure that did not say what it was", retryable=False)

JOB_ERRORS: dict[str, JobErrorCode] = {
    entry.code: entry
    for entry in (
        INVALID_REQUEST,
        INVALID_BUDGET,
        UNSUPPORTED_ARCHITECTURE,
        MODEL_LOAD_FAILED,
        CALIBRATION_DATA,
        MISSING_STATISTIC,
        RELOAD_CHECK_FAILED,
        ENGINE_ERROR,
        OUT_OF_MEMORY,
        TIME_LIMIT_EXCEEDED,
        DISK_FULL,
        STORAGE_UNAVAILABLE,
        OBJECT_MISSING,
        WORKER_LOST,
        STALLED,
        INTERNAL_ERROR,
        UNKNOWN,
    )
}


def retryable(code: str | None) -> bool | None:
    """Whether the same request may succeed if submitted again; None for a code this list does not know
    (a row an older version wrote)."""
    entry = JOB_ERRORS.get(code or "")
    return None if entry is None else entry.retryable
