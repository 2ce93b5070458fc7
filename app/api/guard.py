"""Input no database can store, refused where every request enters a route: 422 naming the field.

Postgres text and JSONB cannot hold NUL (U+0000), nor can any UTF-8 text hold an unpaired surrogate
(the JSON escape ``"\\ud800"``). Such a character passes the parser and pydantic and fails only when
written, as a server error, wherever a route happens to store or query that value. So it is checked
once, for every route, where the request is read (``CheckedRequest``: the JSON body, the form
fields; ``parameter_errors``: the path, the query and the headers) rather than field by field. A JSON
body is also parsed with a bound on its nesting (``app.core.client_json``).
"""

from __future__ import annotations

from typing import Any

from starlette.datastructures import FormData
from starlette.requests import Request

from app.api.problems import InvalidInput, field_from_loc
from app.core import client_json
from app.core.errors import FieldError


class CheckedRequest(Request):
    """A request whose JSON body and form fields are checked as FastAPI reads them."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                # NaN and Infinity are not JSON; Python's parser takes them and no database column holds them.
                value = client_json.loads(body, constants=False)
            except client_json.JsonRefused as exc:
                raise InvalidInput([FieldError("body", str(exc))]) from None
            errors = [
                FieldError(field_from_loc(("body", *path)), problem) for path, problem in client_json.unstorable(value)
            ]
            if errors:
                raise InvalidInput(errors)
            self._json = value
        return self._json

    async def _get_form(self, **limits: Any) -> FormData:
        # Starlette's form parser, then the same check on every text field (files are not text fields).
        form = await super()._get_form(**limits)
        errors = [
            FieldError(client_json.escape_unstorable(name), problem)
            for name, value in form.multi_items()
            if isinstance(value, str) and (problem := client_json.text_problem(value)) is not None
        ]
        if errors:
            raise InvalidInput(errors)
        return form


def _header_name(name: str) -> str:
    return "-".join(part.capitalize() for part in name.split("-"))


def parameter_errors(request: Request) -> list[FieldError]:
    """Each path parameter, query parameter and header that no database could store.

    Headers are checked whole: HTTP allows no NUL in a field value (RFC 9110, 5.5), and a header may
    reach the database (``Idempotency-Key``).
    """
    errors: list[FieldError] = []
    places: list[tuple[str, str]] = [
        *((name, value) for name, value in request.path_params.items() if isinstance(value, str)),
        *request.query_params.multi_items(),
        *((_header_name(name), value) for name, value in request.headers.items()),
    ]
    for name, value in places:
        problem = client_json.text_problem(value) or client_json.text_problem(name)
        if problem is not None:
            errors.append(FieldError(client_json.escape_unstorable(name), problem))
    return errors


def checked_request(request: Request) -> CheckedRequest:
    """The same request (scope and body stream) as a ``CheckedRequest``; raises ``InvalidInput`` for a
    path, query or header value no database can store."""
    checked = CheckedRequest(request.scope, request.receive)
    errors = parameter_errors(checked)
    if errors:
        raise InvalidInput(errors)
    return checked
