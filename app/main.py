"""The FastAPI application: routes under /v1, health and metrics at the root, OpenAPI at /docs.

``create_app`` does no I/O: the database engine, the storage client and the broker connection are
made on first use, so importing this module (``app.main:app`` for uvicorn) never touches them.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.deps import ServiceState
from app.api.problems import BodyTooLarge, install_error_handlers, problem_response
from app.api.routes import datasets, health, jobs, methods, plans, tasks, web
from app.core.config import Settings, get_settings
from app.observability import Metrics, MetricsMiddleware
from app.schemas import Problem
from app.services.workers import SupervisedWorker

API_PREFIX = "/v1"
UPLOAD_PATHS = (f"{API_PREFIX}/datasets",)
# Multipart framing around the file (boundaries, part headers, the small form fields).
MULTIPART_OVERHEAD = 64 * 1024
_NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})
_PROBLEMS: dict[int | str, dict[str, object]] = {
    status: {"model": Problem, "description": f"{phrase} (application/problem+json)"}
    for status, phrase in (
        (400, "unparseable body or headers"),
        (401, "missing, unknown or revoked API key"),
        (404, "unknown, or another owner's"),
        (413, "body too large"),
        (422, "invalid input; errors[].field names it"),
        (503, "database, broker or storage unavailable"),
    )
}


class BodySizeLimitMiddleware:
    """413 for bodies over the limit, by Content-Length up front or by counting while the body streams.

    JSON bodies get ``max_body_bytes``; uploads get ``max_upload_bytes`` plus multipart overhead (the
    upload service enforces the exact file limit while it streams the file).
    """

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.body_limit = settings.max_body_bytes
        self.upload_limit = settings.max_upload_bytes + MULTIPART_OVERHEAD

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in _NO_BODY_METHODS:
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        limit = self.upload_limit if path.rstrip("/") in UPLOAD_PATHS else self.body_limit
        declared = None
        for key, value in scope.get("headers", ()):
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _reply(scope, send, 400, "bad_request", "Content-Length is not a number")
                    return
        if declared is not None and declared > limit:
            await _reply(scope, send, 413, "payload_too_large", f"the request body exceeds the limit of {limit} bytes")
            return

        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as exc:
            # Normally the app's handlers render it; this covers a body read outside a route.
            if started:
                raise
            await _reply(scope, send, 413, "payload_too_large", str(exc.detail))


async def _reply(scope: Scope, send: Send, status: int, code: str, detail: str) -> None:
    response = problem_response(None, status=status, code=code, detail=detail, instance=scope.get("path"))
    # The rest of the body is not read: close the connection rather than leave it unread.
    response.headers["connection"] = "close"
    await response(scope, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def operation_id(route: APIRoute) -> str:
    """A route's OpenAPI operation id is its function's name (``create_job``, ``get_job``): generated
    clients name their functions after it, and FastAPI's default (``create_job_v1_jobs_post``) reads badly."""
    return route.name


def _check_operation_ids(app: FastAPI) -> None:
    seen: dict[str, str] = {}
    for route in app.routes:
        if isinstance(route, APIRoute):
            if route.name in seen:
                raise RuntimeError(f"operation id {route.name!r} used by {seen[route.name]} and {route.path}")
            seen[route.name] = route.path


def _problem_media_type(schema: dict[str, Any]) -> dict[str, Any]:
    """Error responses are served as application/problem+json (RFC 9457): document them so."""
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            for status, response in operation.get("responses", {}).items():
                content = response.get("content", {})
                if status[:1] in ("4", "5") and "application/json" in content:
                    content["application/problem+json"] = content.pop("application/json")
    return schema


def create_app(
    settings: Settings | None = None,
    *,
    sessionmaker: sessionmaker[Session] | None = None,
    supervised_worker: SupervisedWorker | None = None,
) -> FastAPI:
    """Build the API; ``sessionmaker`` overrides the one made from ``settings`` (tests pass a rollback one).

    ``supervised_worker`` is ``lorp serve``'s watch over its embedded worker: /readyz fails once it
    gave up restarting it, and /metrics counts its restarts.
    """
    settings = settings or get_settings()
    state = ServiceState(settings, sessionmaker, supervised_worker)
    app = FastAPI(
        title="LoRP compression service",
        version="0.1.0",
        summary="Depth-pruning of causal language models: LoRP and its baselines, as a job API.",
        docs_url="/docs",
        openapi_url="/openapi.json",
        generate_unique_id_function=operation_id,
    )
    app.state.service = state
    app.state.metrics = Metrics(settings, lambda: state.sessionmaker, supervised_worker)
    install_error_handlers(app)
    routers = (
        ("", health.router),
        (API_PREFIX, jobs.router),
        (API_PREFIX, plans.router),
        (API_PREFIX, datasets.router),
        (API_PREFIX, tasks.router),
        (API_PREFIX, methods.router),
        ("", web.router),
    )
    for prefix, router in routers:
        app.include_router(router, prefix=prefix, responses=_PROBLEMS if prefix else None)
        app.state.metrics.add_route_templates(prefix, router.routes)
    _check_operation_ids(app)
    # The middleware added last is outermost: latency is measured around everything, 413s included.
    app.add_middleware(BodySizeLimitMiddleware, settings=settings)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _problem_media_type(FastAPI.openapi(app))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


app = create_app()
