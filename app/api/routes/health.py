"""/healthz (process up), /readyz (database, broker, storage reachable; workers serving the queue), /metrics."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import create_engine, text

from app.api.deps import SettingsDep, UnitOfWorkRoute, service_state
from app.api.problems import problem_response
from app.core.errors import FieldError
from app.db.session import session_scope
from app.services import workers as workers_service

logger = logging.getLogger(__name__)

router = APIRouter(tags=["health"], route_class=UnitOfWorkRoute)

PROBE_TIMEOUT_S = 2


def _reason(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"[:300]


def check_broker(url: str) -> None:
    """Raise unless the broker answers within a couple of seconds."""
    if url.startswith(("redis://", "rediss://")):
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=PROBE_TIMEOUT_S, socket_timeout=PROBE_TIMEOUT_S)
        try:
            client.ping()
        finally:
            client.close()
        return
    if url.startswith("sqla+"):
        engine = create_engine(url.removeprefix("sqla+"))
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        finally:
            engine.dispose()
        return
    from kombu import Connection

    with Connection(url, connect_timeout=PROBE_TIMEOUT_S) as conn:
        conn.ensure_connection(max_retries=1, timeout=PROBE_TIMEOUT_S)


@router.get("/healthz")
def get_health() -> dict[str, str]:
    """The process is up (no I/O)."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "a dependency is unreachable, or queued jobs have no worker"}})
def get_readiness(request: Request, settings: SettingsDep) -> JSONResponse:
    """Database, broker and storage are reachable, and a live worker serves the queue when jobs wait in it.

    ``checks.workers`` has the live workers per queue (their liveness beats in the database) and the
    queued jobs; it fails when jobs are queued with no live worker on their queue, or when ``lorp
    serve`` gave up restarting its worker. It is left out while the database is unreachable.
    """
    state = service_state(request)
    checks: dict[str, dict[str, Any]] = {}

    def run(name: str, probe: Any) -> None:
        try:
            probe()
        except Exception as exc:
            logger.warning("readiness: %s failed: %s", name, _reason(exc))
            checks[name] = {"ok": False, "error": _reason(exc)}
        else:
            checks[name] = {"ok": True}

    def database() -> None:
        with session_scope(state.sessionmaker) as session:
            session.execute(text("SELECT 1"))

    run("database", database)
    run("broker", lambda: check_broker(settings.celery_broker_url))
    run("storage", lambda: state.storage.check())
    if checks["database"]["ok"]:
        try:
            with session_scope(state.sessionmaker) as session:
                checks["workers"] = workers_service.readiness(session, settings, state.supervised_worker)
        except Exception as exc:
            logger.warning("readiness: workers check failed: %s", _reason(exc))
            checks["workers"] = {"ok": False, "error": _reason(exc)}
    failed = [name for name, result in checks.items() if not result["ok"]]
    if not failed:
        return JSONResponse({"status": "ok", "checks": checks})
    unreachable = [name for name in failed if name != "workers"]
    reasons = [f"{', '.join(unreachable)} unreachable"] if unreachable else []
    if "workers" in failed:
        reasons.append(checks["workers"]["error"])
    return problem_response(
        request,
        status=503,
        code="not_ready",
        detail=f"not ready: {'; '.join(reasons)}",
        errors=[FieldError(name, checks[name]["error"]) for name in failed],
        extra={"checks": checks},
    )


@router.get("/metrics", response_class=Response)
def get_metrics(request: Request) -> Response:
    """Prometheus metrics in the text exposition format."""
    body = request.app.state.metrics.render()
    return Response(body, media_type=CONTENT_TYPE_LATEST)
