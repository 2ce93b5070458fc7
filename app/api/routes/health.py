"""/healthz (process up), /readyz (database, broker, storage reachable; disk space left; workers serving the
queue), /metrics."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import create_engine, text

from app.api.deps import SettingsDep, UnitOfWorkRoute, service_state
from app.api.problems import problem_response
from app.core import disk
from app.core.config import Settings
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


def check_disk(settings: Settings) -> dict[str, Any]:
    """The ``disk`` check: free space (MiB) of each folder the service writes, by label, and whether each
    has at least ``LORP_MIN_FREE_DISK_MB``.

    In the embedded mode ``data`` holds the SQLite database: SQLite on a full disk still answers
    ``SELECT 1`` but fails every write, so this check is what says the database cannot work.
    """
    floor = settings.min_free_disk_mb
    free_mb: dict[str, int] = {}
    low: list[str] = []
    for label, folder in disk.write_dirs(settings).items():
        try:
            free = disk.free_bytes(folder) // disk.MIB
        except OSError as exc:
            low.append(f"{label} (cannot measure: {exc.strerror or type(exc).__name__})")
            continue
        free_mb[label] = free
        if free < floor:
            low.append(f"{label} ({free} MiB free)")
    result: dict[str, Any] = {"ok": not low, "free_mb": free_mb, "min_free_mb": floor}
    if low:
        result["error"] = (
            f"disk nearly full: {', '.join(low)}, below LORP_MIN_FREE_DISK_MB={floor}; "
            "writes there (jobs, uploads, the embedded database) fail once it is full"
        )
    return result


@router.get("/healthz")
def get_health() -> dict[str, str]:
    """The process is up (no I/O)."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    responses={
        503: {"description": "a dependency is unreachable, a disk is nearly full, or queued jobs have no worker"}
    },
)
def get_readiness(request: Request, settings: SettingsDep) -> JSONResponse:
    """Database, broker and storage are reachable, the folders the service writes have room, and a live
    worker serves the queue when jobs wait in it.

    ``checks.disk`` has the free MiB of each folder the service writes (``data``, ``work``, and the
    database, broker, artifacts and upload spool folders where they lie elsewhere); it fails when one
    has less than ``LORP_MIN_FREE_DISK_MB``.

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
    checks["disk"] = check_disk(settings)
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
    unreachable = [name for name in failed if name not in ("workers", "disk")]
    reasons = [f"{', '.join(unreachable)} unreachable"] if unreachable else []
    reasons.extend(checks[name]["error"] for name in ("disk", "workers") if name in failed)
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
