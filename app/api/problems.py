"""Every error as an RFC 9457 problem (application/problem+json), from one place.

A problem body holds ``type``, ``title``, ``status``, ``detail``, ``instance``, a stable ``code`` and
``errors: [{field, message}]`` naming the input at fault. Caller mistakes are 4xx; a database or
storage outage is 503; anything else is a 500 that reveals no internals.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.core.client_json import escape_unstorable
from app.core.disk import is_disk_full_at, write_dirs
from app.core.errors import FieldError, ServiceError
from app.storage import ObjectNotFound
from lorp.errors import InvalidRequestError, LorpError

logger = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
PROBLEM_TYPE_BASE = "urn:lorp:problem:"
_LOCATIONS = ("body", "query", "path", "header", "cookie")


class BodyTooLarge(StarletteHTTPException):
    """Raised while the body is read: an HTTPException so FastAPI's body parsing lets it through."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body exceeds the limit of {limit} bytes")
        self.limit = limit


class InvalidInput(StarletteHTTPException):
    """Input refused where the request is read (text no database can store, JSON nested too deep), before
    the route's models see it: an HTTPException so FastAPI's body parsing lets it through, rendered
    as the 422 of a validation error."""

    def __init__(self, errors: Sequence[FieldError]) -> None:
        super().__init__(422, "; ".join(f"{e.field}: {e.message}" for e in errors))
        self.errors = list(errors)


RETRY_AFTER_S = 5
DISK_FULL_DETAIL = "the service's disk is full; retry later (an operator must free space)"


def problem_response(
    request: Request | None,
    *,
    status: int,
    code: str,
    title: str | None = None,
    detail: str | None = None,
    errors: Sequence[FieldError] = (),
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
    instance: str | None = None,
) -> JSONResponse:
    """A problem+json response; ``instance`` defaults to the request's path."""
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_BASE + code,
        "title": title or _phrase(status),
        "status": status,
        "detail": _showable(detail or _phrase(status)),
        "instance": _showable(
            instance if instance is not None else (request.url.path if request is not None else None)
        ),
        "code": code,
        "errors": [FieldError(_showable(e.field), _showable(e.message)).as_dict() for e in errors],
    }
    if extra:
        body.update(extra)
    if status == 503:
        # Every 503 here is a dependency that may come back (database, broker, storage, workers):
        # say when a client may try again (RFC 9110), unless the caller said something else.
        headers = {"Retry-After": str(RETRY_AFTER_S), **(headers or {})}
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_JSON)


def _showable(text: str | None) -> Any:
    # A message may quote the caller's input; a NUL or an unpaired surrogate in it must not make the
    # response itself unencodable (a lone surrogate cannot be written as UTF-8).
    return escape_unstorable(text) if isinstance(text, str) else text


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def field_from_loc(loc: Sequence[int | str]) -> str:
    """``("body", "model", "id")`` -> ``"model.id"``; list indexes stay as path segments."""
    parts = list(loc)
    if len(parts) > 1 and parts[0] in _LOCATIONS:
        parts = parts[1:]
    return ".".join(str(p) for p in parts) if parts else "body"


def _validation_message(error: dict[str, Any]) -> str:
    message = str(error.get("msg", "invalid value"))
    # pydantic prefixes messages of ValueError-raising validators; the prefix tells a caller nothing.
    for prefix in ("Value error, ", "Assertion failed, "):
        if message.startswith(prefix):
            message = message[len(prefix) :]
    if error.get("type") == "extra_forbidden":
        message = "unknown field (not allowed)"
    return message


def _validation_problem(request: Request, errors: Sequence[FieldError]) -> JSONResponse:
    fields = ", ".join(sorted({e.field for e in errors if e.field}))
    return problem_response(
        request,
        status=422,
        code="validation_error",
        title="Unprocessable Content",
        detail=f"the request is not valid ({fields})" if fields else "the request is not valid",
        errors=errors,
    )


def _disk_full(request: Request, exc: BaseException) -> JSONResponse | None:
    """503 ``disk_full`` when ``exc`` (however wrapped: storage, database, a plain write) says a disk is full,
    or is a write that failed without a reason on a disk the service writes that is (nearly) full."""
    service = getattr(request.app.state, "service", None)
    folders = write_dirs(service.settings).values() if service is not None else ()
    if not is_disk_full_at(exc, folders):
        return None
    logger.error("disk full on %s %s: %s", request.method, request.url.path, exc)
    return problem_response(request, status=503, code="disk_full", detail=DISK_FULL_DETAIL)


def validation_errors(exc: RequestValidationError) -> list[FieldError]:
    out: list[FieldError] = []
    for error in exc.errors():
        loc = tuple(error.get("loc", ()))
        field = "body" if error.get("type") == "json_invalid" else field_from_loc(loc)
        out.append(FieldError(field, _validation_message(error)))
    return out


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
}


def _is_connection_failure(exc: DBAPIError) -> bool:
    return isinstance(exc, OperationalError) or bool(getattr(exc, "connection_invalidated", False))


async def _lorp_error(request: Request, exc: LorpError) -> JSONResponse:
    # The project's one error tree: the service's errors carry their status; the engine's are the
    # caller's to fix (422) when the request cannot be satisfied as stated, else 400.
    if isinstance(exc, ServiceError) and exc.status >= 500 and (full := _disk_full(request, exc)) is not None:
        return full  # a store's write that found no space (never a 4xx: those are the caller's)
    if isinstance(exc, ServiceError):
        status, title, errors, headers = exc.status, exc.title, exc.errors, exc.headers or None
    else:
        status = 422 if isinstance(exc, InvalidRequestError) else 400
        title, headers = _phrase(status), None
        errors = [FieldError(exc.field, exc.public_message)] if exc.field else []
    if status >= 500:
        logger.error("%s: %s", exc.code, exc.message)
    elif isinstance(exc, ObjectNotFound):
        # A row points at an object the store no longer holds: not the caller's doing, but a missing
        # resource rather than a crash.
        logger.warning("object missing from storage: %s", exc.message)
    return problem_response(
        request,
        status=status,
        code=exc.code,
        title=title,
        detail=exc.public_message,
        errors=errors,
        headers=headers,
    )


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _validation_problem(request, validation_errors(exc))


async def _invalid_input(request: Request, exc: InvalidInput) -> JSONResponse:
    return _validation_problem(request, exc.errors)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    detail = exc.detail if isinstance(exc.detail, str) else _phrase(exc.status_code)
    return problem_response(
        request,
        status=exc.status_code,
        code=_HTTP_CODES.get(exc.status_code, "http_error"),
        detail=detail,
        headers=dict(exc.headers) if exc.headers else None,
    )


async def _pool_exhausted(request: Request, exc: PoolTimeoutError) -> JSONResponse:
    # Every pooled connection is busy (or the database stalls): a temporary condition, not a bug.
    logger.error("database connection pool exhausted: %s", exc)
    return problem_response(
        request, status=503, code="database_unavailable", detail="the database is busy; retry later"
    )


async def _database_error(request: Request, exc: DBAPIError) -> JSONResponse:
    if (full := _disk_full(request, exc)) is not None:
        return full  # SQLite's "database or disk is full", Postgres' SQLSTATE 53100
    if isinstance(exc, IntegrityError):
        logger.warning("integrity error: %s", exc.orig)
        return problem_response(
            request, status=409, code="conflict", detail="the request conflicts with the current state"
        )
    if _is_connection_failure(exc):
        logger.error("database unavailable: %s", exc.orig)
        return problem_response(
            request, status=503, code="database_unavailable", detail="the database is unavailable; retry later"
        )
    logger.exception("database error", exc_info=exc)
    return problem_response(request, status=500, code="internal_error", detail="an internal error occurred")


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    if (full := _disk_full(request, exc)) is not None:
        return full  # a plain write (an upload spooled to the temporary folder) found no space
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(request, status=500, code="internal_error", detail="an internal error occurred")


def install_error_handlers(app: FastAPI) -> None:
    """Register one handler per error family (the project's own tree, request validation, HTTP, the
    database, anything else); together they cover every exception."""
    app.exception_handler(LorpError)(_lorp_error)
    app.exception_handler(RequestValidationError)(_validation_error)
    app.exception_handler(InvalidInput)(_invalid_input)
    app.exception_handler(StarletteHTTPException)(_http_error)
    app.exception_handler(PoolTimeoutError)(_pool_exhausted)
    app.exception_handler(DBAPIError)(_database_error)
    app.exception_handler(Exception)(_unexpected)
