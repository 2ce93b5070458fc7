"""The service's own errors, a branch of the project's one error tree (``lorp.errors.LorpError``):
each fixes an HTTP status, a stable code and a title, and names the input at fault.
``app/api/problems.py`` renders the whole tree (and every other error) as problem+json.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lorp.errors import LorpError


@dataclass(frozen=True)
class FieldError:
    """One input at fault: a dotted JSON path (or parameter name) and what is wrong with it."""

    field: str | None
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"field": self.field, "message": self.message}


class ServiceError(LorpError):
    """Base of the service's errors; each subclass fixes the HTTP status, a stable code and a title."""

    status: int = 500
    code: str = "internal_error"
    title: str = "Internal Server Error"

    def __init__(
        self,
        detail: str,
        *,
        field: str | None = None,
        code: str | None = None,
        errors: Sequence[FieldError] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail, field=field)
        if code is not None:
            self.code = code
        self.errors = list(errors) if errors is not None else ([FieldError(field, detail)] if field else [])
        self.headers = headers or {}

    @property
    def detail(self) -> str:
        return self.message


class Unauthorized(ServiceError):
    status, code, title = 401, "unauthorized", "Unauthorized"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"WWW-Authenticate": "Bearer"})


class NotFound(ServiceError):
    status, code, title = 404, "not_found", "Not Found"


class Conflict(ServiceError):
    status, code, title = 409, "conflict", "Conflict"


class PayloadTooLarge(ServiceError):
    status, code, title = 413, "payload_too_large", "Content Too Large"


class Unprocessable(ServiceError):
    status, code, title = 422, "validation_error", "Unprocessable Content"


class Unavailable(ServiceError):
    status, code, title = 503, "unavailable", "Service Unavailable"
