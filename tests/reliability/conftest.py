"""Fixtures and helpers shared by the reliability suites (real processes, all on loopback).

Fixtures:
- ``pg_url``, ``pg_engine``, ``rollback_sessionmaker``, ``s3_server``: re-exported from ``tests/service``
  (a fresh migrated Postgres database per session; sessions rolled back after each test; moto's S3
  server on loopback for the session). ``factory`` is ``rollback_sessionmaker`` under the hostile
  suites' name; ``hostile_model_root`` a model root holding one tiny, valid 4-block Llama.
- ``reliability_redis_url``: the local Redis on a database of its own (``LORP_TEST_RELIABILITY_REDIS_URL``,
  default db 13). It is never flushed: other suites may share it, so every stack uses its own queue.
- ``tiny_model_root``: a model root holding ``tiny-llama`` (6 blocks, 32 wide: jobs of seconds).
- ``corpus_bytes``: a calibration text of 8,000 words, enough for hundreds of 32-token windows.

Helpers:
- ``stack_settings(...)``: ``Settings`` for Postgres + Redis + a fresh bucket on an S3 endpoint, a
  private queue and short heartbeat/reconcile timings.
- ``save_llama(...)``: save a random Llama of any size with the tiny tokenizer under a model root;
  ``save_mid_llama`` the 8-block, 256-wide one whose stages last long enough to be caught.
- ``upload_dataset``, ``job_request``, ``create_job``, ``submit_job``, ``load_job``, ``job_rows``,
  ``stage_events``, ``wait_for``: jobs as rows, the way the API records them.
- ``Fleet``: real ``celery worker`` processes (each in its own process group, so ``kill_hard`` is a
  ``kill -9`` of the main process and its pool child) and an in-process reconciler loop.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from tiny import save_tiny_llama

from app.core.config import Settings
from app.db.models import Job, JobEvent
from app.db.session import session_factory, session_scope
from app.jobspec import JobCreate
from app.queue import enqueue_job
from tests.service.conftest import pg_engine, pg_url, rollback_sessionmaker  # noqa: F401  (re-exported fixtures)
from tests.service.helpers import create_job, upload_dataset  # noqa: F401  (re-exported for the suites)
from tests.service.helpers import job_request as _job_request
from tests.service.moto_server import ACCESS_KEY, REGION, SECRET_KEY, create_bucket, s3_server  # noqa: F401
from worker import service_cli

REPO = Path(__file__).resolve().parents[2]
RELIABILITY_REDIS_URL = os.environ.get("LORP_TEST_RELIABILITY_REDIS_URL", "redis://127.0.0.1:6379/13")
WORDS = [
    *("the", "model", "block", "layer", "state", "token", "depth", "phase", "cluster", "prune", "remove"),
    *("keep", "similar", "distant", "early", "late", "middle", "signal", "noise", "river", "mountain"),
    *("city", "history", "music", "science", "language"),
]
TINY_LAYERS = 6

# Short timings: a dead worker's job is taken back within a few seconds. The timeout leaves ten
# beats of slack: on 2 busy cores a live attempt once went 3 s without a beat landing and was taken back.
FAST_TIMINGS: dict[str, Any] = {
    "heartbeat_interval_s": 0.5,
    "heartbeat_timeout_s": 5.0,
    "reconcile_interval_s": 0.5,
    "progress_min_interval_s": 0.0,
}


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture()
def reliability_redis_url() -> str:
    import redis

    client = redis.Redis.from_url(RELIABILITY_REDIS_URL, socket_connect_timeout=5)
    try:
        client.ping()
    finally:
        client.close()
    return RELIABILITY_REDIS_URL


def save_llama(root: Path, name: str, tokenizer: Any, *, seed: int = 0, **config: Any) -> Path:
    """A random Llama saved (safetensors) with ``tokenizer`` under ``root/name``; ``config`` overrides sizes."""
    return save_tiny_llama(root, name, tokenizer, seed=seed, **{"num_hidden_layers": TINY_LAYERS, **config})


def save_mid_llama(root: Path, tokenizer: Any) -> Path:
    """``mid-llama`` (8 blocks, 256 wide, ~33 MB): loading, capture, saving and upload take a while."""
    return save_llama(
        root,
        "mid-llama",
        tokenizer,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
    )


@pytest.fixture(scope="module")
def tiny_model_root(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> Path:
    """A model root holding ``tiny-llama`` (6 blocks, hidden size 32)."""
    root = tmp_path_factory.mktemp("models")
    save_llama(root, "tiny-llama", tiny_tokenizer)
    return root


@pytest.fixture(scope="module")
def corpus_bytes() -> bytes:
    rng = random.Random(0)
    return " ".join(rng.choice(WORDS) for _ in range(8000)).encode()


@pytest.fixture()
def factory(rollback_sessionmaker: sessionmaker[Session]) -> sessionmaker[Session]:  # noqa: F811
    """Sessions whose outer transaction is rolled back after the test: nothing the API writes outlives it."""
    return rollback_sessionmaker


@pytest.fixture(scope="module")
def hostile_model_root(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> Path:
    """A model root holding one tiny, valid Llama (4 blocks) that hostile variants start from."""
    root = tmp_path_factory.mktemp("models")
    save_tiny_llama(root, "tiny-llama", tiny_tokenizer, num_hidden_layers=4, max_position_embeddings=256)
    return root


# -- settings and jobs ------------------------------------------------------------------------------


def stack_settings(
    tmp_path: Path, database_url: str, redis_url: str, s3_endpoint: str, model_root: Path, **overrides: Any
) -> Settings:
    """Postgres, Redis (a private queue), a fresh bucket on ``s3_endpoint``, short timings."""
    bucket = f"lorp-{uuid.uuid4().hex[:12]}"
    create_bucket(s3_endpoint, bucket)
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "database_url": database_url,
        "broker_url": redis_url,
        "storage_url": f"s3://{bucket}/artifacts",
        "s3_endpoint_url": s3_endpoint,
        "s3_region": REGION,
        "s3_access_key": ACCESS_KEY,
        "s3_secret_key": SECRET_KEY,
        "model_roots": [model_root],
        "queue_name": f"gpu-rel-{uuid.uuid4().hex[:8]}",
        **FAST_TIMINGS,
    }
    values.update(overrides)
    return Settings(**values)


# The fault suites default to LoRP (the service tests to auto): one capture, no candidate scoring.
job_request = functools.partial(_job_request, method="lorp")


def submit_job(settings: Settings, request: JobCreate, *, max_attempts: int = 3) -> uuid.UUID:
    """Commit the row, then send the message (the API's order)."""
    job_id = create_job(settings, request, max_attempts=max_attempts)
    enqueue_job(job_id, settings)
    return job_id


def load_job(settings: Settings, job_id: uuid.UUID) -> Job:
    with session_scope(session_factory(settings.sqlalchemy_url)) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def job_rows(settings: Settings, model: Any, job_id: uuid.UUID) -> list[Any]:
    """The rows of ``model`` (Artifact, Plan, Metric, JobEvent ...) that belong to the job."""
    with session_scope(session_factory(settings.sqlalchemy_url)) as session:
        return list(session.scalars(select(model).where(model.job_id == job_id)))


def stage_events(settings: Settings, job_id: uuid.UUID) -> list[JobEvent]:
    return sorted((e for e in job_rows(settings, JobEvent, job_id) if e.kind == "stage"), key=lambda e: e.at)


def wait_for(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# -- processes --------------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def fork_server_of(main_pid: int) -> int | None:
    """The worker's fork server (``worker.forkserver``): the main process's child running billiard's."""
    for pid in _children(main_pid):
        try:
            if "billiard.forkserver" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
                return pid
        except OSError:
            continue
    return None


def pool_processes(main_pid: int) -> list[int]:
    """A worker's pool processes: the fork server's grandchildren (server -> reaper -> pool process)."""
    server = fork_server_of(main_pid)
    if server is None:
        return []
    return [child for reaper in _children(server) for child in _children(reaper)]


@dataclass
class WorkerProc:
    """One ``celery worker`` (prefork, concurrency 1) in its own process group."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def pool_children(self) -> list[int]:
        """Pids of the prefork pool's processes: forked by the worker's fork server, each under its reaper."""
        return pool_processes(self.proc.pid)

    def wait_ready(self, timeout: float = 90) -> None:
        wait_for(lambda: " ready." in self.log() or not self.alive, timeout, f"worker {self.name} to start", 0.1)
        assert self.alive, f"worker {self.name} exited at start:\n{self.log()[-3000:]}"

    def kill_hard(self) -> None:
        """``kill -9`` of the whole process group: the Celery main process and its pool child."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        """Warm shutdown (TERM), then kill -9 if it lingers."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill_hard()
        # Pool children left behind by a hard kill of the main process only.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)


@dataclass
class Fleet:
    """Worker processes and a reconciler loop for one test; ``close`` stops them all."""

    settings: Settings
    log_dir: Path
    workers: list[WorkerProc] = field(default_factory=list)
    _reconciler_stop: threading.Event | None = None
    _reconciler: threading.Thread | None = None

    def start_worker(self, name: str | None = None, *, wait: bool = True, **env_overrides: str) -> WorkerProc:
        """Start ``lorp worker``'s Celery command with this fleet's settings (plus ``env_overrides``)."""
        name = name or f"worker-{len(self.workers) + 1}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("LORP_")}
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        env["PYTHONUNBUFFERED"] = "1"
        log_path = self.log_dir / f"{name}.log"
        settings_env = service_cli.settings_env(self.settings, env)
        settings_env.update(env_overrides)
        # A node name per worker, so the job row says which one ran an attempt.
        argv = [*service_cli.worker_command(self.settings, concurrency=1, loglevel="info"), "--hostname", f"{name}@%h"]
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                argv,
                env=settings_env,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        worker = WorkerProc(name, proc, log_path)
        self.workers.append(worker)
        if wait:
            worker.wait_ready()
        return worker

    def start_reconciler(self) -> None:
        """``run_reconciler`` in a thread of this process, with the fleet's (short) timings."""
        assert self._reconciler is None
        self._reconciler_stop = threading.Event()
        self._reconciler = threading.Thread(
            target=service_cli.run_reconciler,
            args=(self.settings,),
            kwargs={"stop": self._reconciler_stop},
            name="reconciler",
            daemon=True,
        )
        self._reconciler.start()

    def logs(self, tail: int = 4000) -> str:
        return "\n".join(f"---- {w.name} ----\n{w.log()[-tail:]}" for w in self.workers)

    def close(self) -> None:
        if self._reconciler_stop is not None and self._reconciler is not None:
            self._reconciler_stop.set()
            self._reconciler.join(timeout=30)
        for worker in self.workers:
            worker.stop()


@contextlib.contextmanager
def fleet_of(settings: Settings, log_dir: Path, *, reconciler: bool = True) -> Iterator[Fleet]:
    """A ``Fleet`` (with its reconciler running, unless told otherwise) that is closed on exit."""
    fleet = Fleet(settings, log_dir)
    try:
        if reconciler:
            fleet.start_reconciler()
        yield fleet
    finally:
        fleet.close()


def hostile_settings(tmp_path: Path, database_url: str, model_root: Path, queue_prefix: str, **overrides: Any) -> Any:
    """The hostile suites' service: keys required, one model root, a private queue on the shared Redis
    db (never flushed here), fast heartbeats; ``overrides`` set each suite's own limits."""
    from app.core.config import Settings
    from tests.service.conftest import REDIS_TEST_URL

    return Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        broker_url=REDIS_TEST_URL,
        storage_url=(tmp_path / "artifacts").as_uri(),
        model_roots=[model_root],
        auth_required=True,
        queue_name=f"{queue_prefix}-{uuid.uuid4().hex[:10]}",
        heartbeat_interval_s=0.5,
        progress_min_interval_s=0.0,
        **overrides,
    )
