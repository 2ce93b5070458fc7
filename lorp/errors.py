"""The project's one error tree, rooted here: ``LorpError``.

Every error raised on purpose carries a stable ``code`` (a job's error code, a problem's type), a
message a person can act on, and ``field``, the path of the input at fault in the job spec (the
same path the service's request uses: ``target.num_layers``). The engine's errors derive from
``EngineError``; the service's (``app.core.errors.ServiceError``: HTTP statuses, storage, request
references) derive from ``LorpError`` too, so the API maps the whole tree to problem+json in one
place and the worker records any of them on a failed job the same way.
"""

from __future__ import annotations

import sys


class LorpError(Exception):
    """An error with a stable code, a message a person can act on and the field at fault."""

    code = "error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    @property
    def public_message(self) -> str:
        """What a client may be shown (subclasses that hold internal detail say less)."""
        return self.message


class EngineError(LorpError):
    """Base class of the engine's errors."""

    code = "engine_error"


class InvalidRequestError(EngineError, ValueError):
    """The request cannot be satisfied as stated (bad budget, unknown method, bad option)."""

    code = "invalid_request"


class BudgetError(InvalidRequestError):
    """The pruning budget exceeds what the model allows."""

    code = "invalid_budget"


class UnsupportedArchitectureError(EngineError, ValueError):
    """The model's architecture has no known decoder-block layout."""

    code = "unsupported_architecture"


class ModelLoadError(EngineError):
    """The model could not be loaded (missing, unsafe weights, remote code not allowed ...)."""

    code = "model_load_failed"


class CalibrationError(EngineError, ValueError):
    """The calibration or evaluation text cannot provide what was asked (too short, empty ...)."""

    code = "calibration_data"


class MissingStatisticError(InvalidRequestError):
    """A selection method needs a statistic (e.g. D) that the analysis does not hold."""

    code = "missing_statistic"


class ReloadCheckError(EngineError):
    """The saved pruned model does not reload to the same function as the in-memory one."""

    code = "reload_check_failed"


class JobCancelled(EngineError):
    """Raised between batches when the caller's cancel check says stop."""

    code = "cancelled"


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says the process ran out of memory: host (MemoryError, "cannot allocate
    memory") or accelerator (torch's OutOfMemoryError), without importing torch."""
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, torch.OutOfMemoryError):
        return True
    if isinstance(exc, RuntimeError | OSError):
        text = str(exc).lower()
        return any(phrase in text for phrase in ("out of memory", "can't allocate memory", "cannot allocate memory"))
    return False
