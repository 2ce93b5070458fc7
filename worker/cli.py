"""The ``lorp`` command: the engine's commands (``lorp.cli``) plus the service's.

lorp serve [--host H --port P] [--no-worker]   the API, a worker and the reconciler (embedded by default)
lorp worker [--concurrency N]                  a Celery worker on the job queue
lorp reconciler [--once]                       re-enqueue lost jobs, retry or fail dead ones
lorp migrate                                   alembic upgrade head
lorp keys create|list|revoke                   API keys
lorp jobs submit|list|status|wait|cancel|download   a running service's jobs (lorp_client.cli)
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from lorp.cli import Handler
from lorp.cli import build_parser as _build_parser
from lorp.cli import main as _main
from lorp.errors import InvalidRequestError


def add_service_commands(sub: Any) -> dict[str, Handler]:
    """``serve``, ``worker``, ``reconciler``, ``migrate`` and ``keys`` on ``sub``."""
    serve = sub.add_parser("serve", help="run the API and a worker together (embedded mode by default)")
    serve.add_argument("--host", help="bind address (default LORP_HOST, 127.0.0.1; API keys are required off loopback)")
    serve.add_argument("--port", type=int, help="default LORP_PORT, 8000")
    serve.add_argument("--no-worker", action="store_true", help="API only (workers run elsewhere)")

    worker = sub.add_parser("worker", help="run a Celery worker on the job queue")
    worker.add_argument("--concurrency", type=int, default=1, help="jobs at once (one per GPU)")
    worker.add_argument("--loglevel", default="info")

    recon = sub.add_parser("reconciler", help="periodically re-enqueue lost jobs and retry or fail dead ones")
    recon.add_argument("--once", action="store_true", help="one pass, then exit")

    sub.add_parser("migrate", help="create or upgrade the database schema (alembic upgrade head)")

    keys = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key and print it once")
    create.add_argument("--name", required=True)
    create.add_argument("--admin", action="store_true", help="the key sees every job and dataset")
    keys_sub.add_parser("list", help="list keys (never their secrets)")
    revoke = keys_sub.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("key_id")
    from lorp_client.cli import add_jobs_command

    return {
        **add_jobs_command(sub),
        "serve": _cmd_serve,
        "worker": _cmd_worker,
        "reconciler": _cmd_reconciler,
        "migrate": _cmd_migrate,
        "keys": _cmd_keys,
    }


def build_parser() -> argparse.ArgumentParser:
    """The whole ``lorp`` parser (the engine's commands and the service's)."""
    return _build_parser(add_service_commands)[0]


def _service_settings(**overrides: Any) -> Any:
    from app.core.config import Settings

    return Settings(**overrides)


def _announce(server: Any, host: str, port: int) -> None:
    """Print the address once uvicorn has bound it (its own start-up lines are below the log level)."""
    import time

    while not server.started and not server.should_exit:
        time.sleep(0.05)
    if server.started:
        shown = f"[{host}]" if ":" in host else host
        print(f"lorp serve: listening on http://{shown}:{port} (API docs at /docs)", flush=True)


class _Terminated(Exception):
    """SIGTERM as an exception, so that ``lorp serve`` unwinds through the code that stops its worker."""


def _raise_terminated(signum: int, _frame: Any) -> None:
    raise _Terminated(signum)


def _cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import subprocess
    import threading

    import uvicorn

    from app.db.migrate import upgrade_head
    from app.main import create_app
    from worker.service_cli import run_reconciler, start_worker, stop_worker
    from worker.supervisor import WorkerSupervisor

    # The flags win over LORP_HOST and LORP_PORT, which win over the defaults.
    given = {"host": args.host, "port": args.port}
    settings = _service_settings(**{name: value for name, value in given.items() if value is not None})
    settings.resolved_data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_head(settings.sqlalchemy_url)
    mode = "embedded" if settings.embedded else "full stack"
    auth = "API keys required" if settings.auth_enabled() else "open on loopback, no keys"
    print(
        f"lorp serve: {mode}, database {settings.sqlalchemy_url}, artifacts {settings.artifact_storage_url}, {auth}",
        flush=True,
    )

    def launch_worker() -> subprocess.Popen[bytes]:
        return start_worker(settings, loglevel="warning", banner=False, owned=True)

    # From the main thread, which lives as long as serve: the worker's parent-death signal follows
    # the thread that forked it (see start_worker).
    supervisor = None
    if not args.no_worker:
        supervisor = WorkerSupervisor(launch_worker, stop_worker, max_quick_failures=settings.worker_restart_limit)
        supervisor.launch(launch_worker())
    stop = threading.Event()
    reconciler = threading.Thread(target=run_reconciler, args=(settings,), kwargs={"stop": stop}, daemon=True)
    reconciler.start()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings, supervised_worker=supervisor),
            host=settings.host,
            port=settings.port,
            log_level="warning",
        )
    )
    threading.Thread(target=_announce, args=(server, settings.host, settings.port), daemon=True).start()
    # uvicorn shuts down on SIGINT/SIGTERM, puts back the handlers it found and raises the signal
    # again. Python's SIGINT handler turns that into KeyboardInterrupt; this one does the same for
    # SIGTERM, whose default action would end the process before the worker is stopped.
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        server.run()
    except (_Terminated, KeyboardInterrupt):
        pass
    finally:
        stop.set()
        if supervisor is not None:
            supervisor.stop()
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    from worker.service_cli import run_worker

    run_worker(_service_settings(), concurrency=args.concurrency, loglevel=args.loglevel)


def _cmd_reconciler(args: argparse.Namespace) -> int:
    from worker.service_cli import run_reconciler

    logging.getLogger("worker").setLevel(logging.INFO)
    run_reconciler(_service_settings(), once=args.once)
    return 0


def _cmd_migrate(_args: argparse.Namespace) -> int:
    from app.db.migrate import upgrade_head

    settings = _service_settings()
    settings.resolved_data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_head(settings.sqlalchemy_url)
    print(f"database at head: {settings.sqlalchemy_url}")
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    import uuid

    from app.db.session import session_factory, session_scope
    from app.repositories.keys import list_keys
    from app.services.keys import create_api_key, revoke_api_key

    settings = _service_settings()
    factory = session_factory(settings.sqlalchemy_url)
    with session_scope(factory) as session:
        if args.keys_command == "create":
            plaintext, key = create_api_key(session, args.name, admin=args.admin)
            session.flush()
            print(f"id     {key.id}\nname   {key.name}\nadmin  {key.is_admin}")
            print(f"key    {plaintext}\n(shown once: store it now)")
        elif args.keys_command == "list":
            for key in list_keys(session):
                state = "revoked" if key.revoked_at else "active"
                print(f"{key.id}  {key.prefix}...  {key.name:<24} admin={key.is_admin!s:<5} {state}")
        else:
            try:
                key_id = uuid.UUID(args.key_id)
            except ValueError:
                raise InvalidRequestError(f"not a key id: {args.key_id!r}", field="key_id") from None
            if not revoke_api_key(session, key_id):
                raise InvalidRequestError(f"no active key with id {key_id}", field="key_id")
            print(f"revoked {key_id}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return _main(argv, extend=add_service_commands)


if __name__ == "__main__":
    sys.exit(main())
