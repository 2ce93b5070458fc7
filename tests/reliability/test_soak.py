"""Soak: batches of cheap jobs through `lorp serve` (embedded) and through the full stack, one batch after
another on the same running service: every job reaches a final state, none is lost, stuck or run twice.

- Embedded: `lorp serve` (API, its worker with one job slot, the reconciler; SQLite, the SQLAlchemy
  broker, local artifacts). This is where a worker once hung for good after ~116 jobs: a pool child
  forked while another thread of the worker held SQLite's lock (now every child comes from a
  single-threaded fork server, worker/forkserver.py).
- Full stack: `lorp serve --no-worker` on Postgres (a database of its own), a private Redis, moto's S3
  server, and two `celery` worker processes.

Each batch submits every job first (all 202), then waits for all of them. Per batch: wall time, jobs
per minute, statuses, attempts, jobs claimed more than once (the claim lines in the worker logs and
the running events), artifact rows and stored objects per job, and /readyz at the end.

``LORP_SOAK_JOBS`` (default 12) jobs per batch, ``LORP_SOAK_BATCHES`` (default 1) batches; the
recorded figure is ``LORP_SOAK_JOBS=1000 LORP_SOAK_BATCHES=3`` (``make soak``). Marked ``long``:
``make reliability`` runs them at the default size, ``make test`` (CI) leaves them out.

A backlog that outlasts ``LORP_QUEUED_TIMEOUT_S`` (one slot, jobs waiting their turn) is run in CI:
each job's message is delivered once. Resending by age alone once filled the queue with duplicates,
and the second batch of 1,000 ran at half the first's rate.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import sqlite3
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from ports import free_port
from sqlalchemy import create_engine, text

from tests.service.conftest import create_test_database, drop_test_database
from tests.service.moto_server import ACCESS_KEY, REGION, SECRET_KEY, create_bucket

from .record import full_size, record
from .servers import (
    FINAL,
    LORP,
    QUEUE_QUIET_S,
    Processes,
    RedisServer,
    build_tiny_model,
    cheap_job,
    service_env,
    start_api,
    start_worker,
    upload_corpus,
    wait_until,
)

pytestmark = pytest.mark.reliability

N_JOBS = int(os.environ.get("LORP_SOAK_JOBS", "12"))
BATCHES = int(os.environ.get("LORP_SOAK_BATCHES", "1"))
COMMAND = (
    f"LORP_SOAK_JOBS={N_JOBS} LORP_SOAK_BATCHES={BATCHES} "
    ".venv/bin/python -m pytest tests/reliability/test_soak.py -m reliability -k {k}"
)
CLAIM_LINE = re.compile(r"job ([0-9a-f-]{36}): attempt (\d+) on (\S+)")
LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): ")
SIZE_NOTE = (
    " make reliability runs this size; make soak runs 1,000 x 3."
    if N_JOBS < 1000
    else " make soak runs this soak and the other side by side on the same 2 cores."
)
# Per job on 2 busy cores: a few seconds; the bound only has to catch a stuck service.
SECONDS_PER_JOB = 20


@dataclass
class Batch:
    """One batch's outcome."""

    wall_s: float
    accept_s: float
    statuses: Counter[str]
    attempts: Counter[int]
    run_twice: int
    stuck: int
    without_artifacts: int
    readyz: int
    run_s: list[float]  # each job's claim to its final write
    messages: int  # "run job X" messages the broker carried during the batch (the reconciler's resends too)

    @property
    def per_minute(self) -> float:
        return round(N_JOBS / self.wall_s * 60, 1)


def _submit(client: httpx.Client, model: Path, dataset: str, batch: int) -> tuple[list[str], float]:
    started = time.monotonic()
    ids = []
    for i in range(N_JOBS):
        resp = client.post("/v1/jobs", json=cheap_job(model, dataset, seed=batch * 100_000 + i))
        assert resp.status_code == 202, resp.text
        ids.append(resp.json()["id"])
    return ids, time.monotonic() - started


def _wait_final(statuses: Callable[[], Counter[str]], procs: Processes) -> None:
    timeout = 120 + N_JOBS * SECONDS_PER_JOB
    try:
        wait_until("every job final", lambda: sum(statuses()[s] for s in FINAL) == N_JOBS, timeout, interval=1)
    except TimeoutError:
        pytest.fail(f"not all {N_JOBS} jobs reached a final state within {timeout} s: {statuses()}\n{procs.logs()}")


def _dispatch_s(procs: Processes, names: list[str]) -> list[float]:
    """Seconds from a worker receiving a message to a pool child claiming its job (the exited child's
    replacement included), from the time stamps of the worker logs."""
    waits = []
    for name in names:
        received: float | None = None
        for line in procs.log(name).splitlines():
            stamp = LOG_TIME.match(line)
            if stamp is None:
                continue
            at = dt.datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if "] received" in line:
                received = at
            elif CLAIM_LINE.search(line) and received is not None:
                waits.append(at - received)
                received = None
    return waits


def _received(procs: Processes, names: list[str]) -> int:
    """Messages the workers have received so far (Celery logs each one it takes from the broker)."""
    return sum(procs.log(name).count("] received") for name in names)


def _claims(procs: Processes, names: list[str], ids: set[str]) -> Counter[str]:
    """How often each job was claimed, from the claim lines of the worker logs."""
    return Counter(
        match.group(1) for name in names for match in CLAIM_LINE.finditer(procs.log(name)) if match.group(1) in ids
    )


def _record(mode: str, batches: list[Batch], notes: str, k: str, *, check: bool = True, **figures: Any) -> None:
    """Record the batches done so far (after each one: a soak of hours leaves its figures as it goes);
    with ``check``, assert that every batch came out whole."""
    total = N_JOBS * len(batches)
    statuses = sum((b.statuses for b in batches), Counter())
    record(
        "load",
        f"soak: {N_JOBS:,} jobs x {BATCHES} through {mode}",
        runs=total,
        outcomes={
            "batches done": f"{len(batches)} of {BATCHES}",
            "jobs": total,
            "statuses": dict(statuses),
            "attempts": dict(sum((b.attempts for b in batches), Counter())),
            "lost": total - sum(statuses[s] for s in FINAL),
            "stuck (queued or running at the end)": sum(b.stuck for b in batches),
            "run twice": sum(b.run_twice for b in batches),
            "succeeded without a full artifact set": sum(b.without_artifacts for b in batches),
            "/readyz after each batch": [b.readyz for b in batches],
            "messages per job, each batch": [round(b.messages / N_JOBS, 3) for b in batches],
        },
        data_lost=total - statuses["succeeded"],
        command=COMMAND.format(k=k),
        notes=notes,
        figures={
            "wall_s per batch": [round(b.wall_s, 1) for b in batches],
            "jobs_per_min per batch": [b.per_minute for b in batches],
            "submit_all_s per batch": [round(b.accept_s, 1) for b in batches],
            "job_run_s_median": round(statistics.median(r for b in batches for r in b.run_s), 2),
            **figures,
        },
    )
    for batch in batches if check else []:
        assert batch.statuses == Counter({"succeeded": N_JOBS}), batch.statuses
        assert batch.attempts == Counter({1: N_JOBS}), batch.attempts
        assert batch.run_twice == 0 and batch.stuck == 0 and batch.without_artifacts == 0, batch
        assert batch.readyz == 200
        assert batch.messages == N_JOBS, f"{batch.messages} messages for {N_JOBS} jobs: the reconciler sent duplicates"


# -- embedded ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _serve(tmp: Path, model_root: Path, **settings: str) -> Iterator[tuple[str, Processes]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORP_")}
    env.update(
        LORP_DATA_DIR=str(tmp / "data"),
        LORP_MODEL_ROOTS=json.dumps([str(model_root)]),
        LORP_HEARTBEAT_INTERVAL_S="1",
        LORP_PROGRESS_MIN_INTERVAL_S="0.5",
        PYTHONUNBUFFERED="1",
        TQDM_DISABLE="1",
    )
    env.update({f"LORP_{name.upper()}": value for name, value in settings.items()})
    procs = Processes(tmp / "logs")
    port = free_port()
    # The worker logs at info so that its claim lines can be counted.
    procs.start("serve", [LORP, "serve", "--port", str(port)], env)
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        procs.check_alive()
        return httpx.get(f"{base}/readyz", timeout=5).status_code == 200

    try:
        wait_until("lorp serve ready", ready, 180, interval=0.5)
        yield base, procs
    finally:
        procs.stop()


def _sqlite_rows(db: Path, query: str, ids: list[str]) -> list[tuple[Any, ...]]:
    marks = ",".join("?" * len(ids))
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
        return conn.execute(query.format(ids=marks), ids).fetchall()


def _broker_messages(tmp: Path) -> int:
    """Messages the embedded broker has carried: the SQLAlchemy transport keeps each one it delivered
    (its table appears with the first message)."""
    with contextlib.closing(sqlite3.connect(tmp / "data" / "broker.db", timeout=30)) as conn:
        try:
            return int(conn.execute("select count(*) from kombu_message").fetchone()[0])
        except sqlite3.OperationalError as exc:
            if "no such table" not in str(exc):
                raise
            return 0


@pytest.mark.long
def test_soak_embedded(tmp_path: Path, tiny_tokenizer: Any) -> None:
    model_root = tmp_path / "models"
    model = build_tiny_model(model_root, tiny_tokenizer, layers=2)
    db = tmp_path / "data" / "lorp.db"
    batches: list[Batch] = []
    notes = (
        "Cheapest real job (reverse, 1 of 2 blocks, 2 windows of 16 tokens, no evaluation); one job slot; "
        "all of a batch submitted first, batches one after another on the same serve. Before the fork "
        "server, a run of 1,000 hung for good after ~116 jobs (a pool child forked while another thread "
        "held SQLite's lock)." + SIZE_NOTE
    )
    with _serve(tmp_path, model_root) as (base, procs), httpx.Client(base_url=base, timeout=60) as client:
        dataset = upload_corpus(client)
        for number in range(BATCHES):
            sent_before = _broker_messages(tmp_path)
            ids, accept_s = _submit(client, model, dataset, number)
            started = time.monotonic() - accept_s
            hex_ids = [uuid.UUID(j).hex for j in ids]  # SQLite keeps uuids as 32 hex digits

            def statuses(hex_ids: list[str] = hex_ids) -> Counter[str]:
                procs.check_alive()
                query = "select lower(status), count(*) from jobs where id in ({ids}) group by 1"
                return Counter({str(s): int(n) for s, n in _sqlite_rows(db, query, hex_ids)})

            _wait_final(statuses, procs)
            wall_s = time.monotonic() - started
            jobs = _sqlite_rows(db, "select lower(status), attempts from jobs where id in ({ids})", hex_ids)
            spans = _sqlite_rows(db, "select started_at, finished_at from jobs where id in ({ids})", hex_ids)
            run_s = [
                (dt.datetime.fromisoformat(end) - dt.datetime.fromisoformat(start)).total_seconds()
                for start, end in spans
                if start and end
            ]
            running = Counter(
                job_id
                for (job_id,) in _sqlite_rows(
                    db,
                    "select job_id from job_events where kind = 'status' and status = 'running' and job_id in ({ids})",
                    hex_ids,
                )
            )
            artifacts = dict(
                _sqlite_rows(db, "select job_id, count(*) from artifacts where job_id in ({ids}) group by 1", hex_ids)
            )
            stored = tmp_path / "data" / "artifacts" / "jobs"
            sets = [artifacts.get(h, 0) for h in hex_ids]
            empty = sum(
                1
                for j, n in zip(ids, sets, strict=True)
                if n == 0 or not (stored / j / "model" / "config.json").is_file()
            )
            batches.append(
                Batch(
                    wall_s=wall_s,
                    accept_s=accept_s,
                    statuses=Counter(s for s, _ in jobs),
                    attempts=Counter(int(a) for _, a in jobs),
                    run_twice=sum(1 for h in hex_ids if running.get(h, 0) != 1),
                    stuck=sum(1 for s, _ in jobs if s in ("queued", "running")),
                    without_artifacts=empty,
                    readyz=client.get("/readyz").status_code,
                    run_s=run_s,
                    messages=_broker_messages(tmp_path) - sent_before,
                )
            )
            _record("lorp serve (embedded)", batches, notes, "embedded", check=False)
        log = procs.log("serve")
    assert "the fork server runs" not in log, log[-3000:]
    _record("lorp serve (embedded)", batches, notes, "embedded")


def test_a_backlog_older_than_queued_timeout_gets_no_duplicate_messages(tmp_path: Path, tiny_tokenizer: Any) -> None:
    """One slot, jobs queued behind each other far longer than LORP_QUEUED_TIMEOUT_S: the reconciler
    sends none of them again (each message is delivered once, no claim refused), and all succeed.

    The jobs go in once the worker has been registered for LORP_QUEUE_QUIET_S (8 s here, 30 s by default):
    from then on its slot counts, so it is the slot's activity (a job started or ended within that
    window) that must hold the resends back: a slot freed between two jobs is taken again in about a
    second."""
    model_root = tmp_path / "models"
    model = build_tiny_model(model_root, tiny_tokenizer, layers=2)
    jobs = 6 if full_size() else 3  # three already wait behind each other well past the timeout
    with (
        _serve(
            tmp_path, model_root, queued_timeout_s="1", queue_quiet_s=str(QUEUE_QUIET_S), reconcile_interval_s="0.5"
        ) as (
            base,
            procs,
        ),
        httpx.Client(base_url=base, timeout=60) as client,
    ):
        dataset = upload_corpus(client)

        def counted() -> bool:
            with contextlib.closing(sqlite3.connect(tmp_path / "data" / "lorp.db", timeout=30)) as conn:
                found = conn.execute("select min(started_at) from workers where stopped_at is null").fetchone()[0]
            age = time.time() - dt.datetime.fromisoformat(found).replace(tzinfo=dt.UTC).timestamp() if found else 0
            return age > QUEUE_QUIET_S + 1

        wait_until("the worker's slot to count", counted, 120, interval=1)
        ids = [client.post("/v1/jobs", json=cheap_job(model, dataset, seed=i)).json()["id"] for i in range(jobs)]
        wait_until(
            "every job final",
            lambda: all(client.get(f"/v1/jobs/{j}").json()["status"] in FINAL for j in ids),
            120 + jobs * SECONDS_PER_JOB,
            interval=0.5,
        )
        views = [client.get(f"/v1/jobs/{j}").json() for j in ids]
        sent = _broker_messages(tmp_path)
        log = procs.log("serve")
    assert [v["status"] for v in views] == ["succeeded"] * jobs, views
    waited = max(
        (dt.datetime.fromisoformat(v["started_at"]) - dt.datetime.fromisoformat(v["created_at"])).total_seconds()
        for v in views
    )
    assert waited > 3, f"the backlog must outlast LORP_QUEUED_TIMEOUT_S (1 s) several times: waited {waited:.1f} s"
    assert sent == jobs, f"{sent} messages sent for {jobs} jobs\n{log[-4000:]}"


# -- full stack ----------------------------------------------------------------------------------------

FULL_STACK_NOTES = (
    "Postgres, a private Redis, moto's S3 server, `lorp serve --no-worker` and two celery worker processes "
    "(one job slot each); the cheapest real job; all of a batch submitted first, batches one after another. "
    "Artifacts checked as rows and as objects under jobs/{id}/. dispatch_s runs from a worker receiving a "
    "message to a pool child claiming its job, the exited child's replacement by the fork server included "
    "(worker/pool.py)." + SIZE_NOTE
)


@pytest.mark.long
def test_soak_full_stack(tmp_path: Path, tiny_tokenizer: Any, s3_server: str) -> None:
    model_root = tmp_path / "models"
    model = build_tiny_model(model_root, tiny_tokenizer, layers=2)
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    db_url = create_test_database("lorp_rel_soak")
    bucket = f"soak-{uuid.uuid4().hex[:12]}"
    create_bucket(s3_server, bucket)
    procs = Processes(tmp_path / "logs")
    engine = create_engine(db_url)
    workers = ["sw1", "sw2"]
    batches: list[Batch] = []
    try:
        env = service_env(tmp_path / "data", model_root, database_url=db_url, broker_url=redis.url)
        env.update(
            LORP_STORAGE_URL=f"s3://{bucket}/artifacts",
            LORP_S3_ENDPOINT_URL=s3_server,
            LORP_S3_REGION=REGION,
            LORP_S3_ACCESS_KEY=ACCESS_KEY,
            LORP_S3_SECRET_KEY=SECRET_KEY,
        )
        base = start_api(procs, env)
        for name in workers:
            start_worker(procs, env, name)
        s3 = boto3.client(
            "s3",
            endpoint_url=s3_server,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )
        with httpx.Client(base_url=base, timeout=60, trust_env=False) as client:
            wait_until("a live worker", lambda: client.get("/readyz").json()["checks"]["workers"]["live"], 180)
            dataset = upload_corpus(client)
            for number in range(BATCHES):
                received_before = _received(procs, workers)
                ids, accept_s = _submit(client, model, dataset, number)
                started = time.monotonic() - accept_s
                uuids = [uuid.UUID(j) for j in ids]

                def statuses(uuids: list[uuid.UUID] = uuids) -> Counter[str]:
                    procs.check_alive()
                    with engine.connect() as conn:
                        rows = conn.execute(
                            text("select status::text, count(*) from jobs where id = any(:ids) group by 1"),
                            {"ids": uuids},
                        ).all()
                    return Counter({str(s): int(n) for s, n in rows})

                _wait_final(statuses, procs)
                wall_s = time.monotonic() - started
                with engine.connect() as conn:
                    jobs = conn.execute(
                        text("select status::text, attempts from jobs where id = any(:ids)"), {"ids": uuids}
                    ).all()
                    run_s = [
                        float(seconds)
                        for (seconds,) in conn.execute(
                            text("select extract(epoch from finished_at - started_at) from jobs where id = any(:ids)"),
                            {"ids": uuids},
                        )
                        if seconds is not None
                    ]
                    running = dict(
                        conn.execute(
                            text(
                                "select job_id::text, count(*) from job_events where kind = 'status' and "
                                "status = 'running' and job_id = any(:ids) group by 1"
                            ),
                            {"ids": uuids},
                        ).all()
                    )
                    artifacts = dict(
                        conn.execute(
                            text("select job_id::text, count(*) from artifacts where job_id = any(:ids) group by 1"),
                            {"ids": uuids},
                        ).all()
                    )
                objects: Counter[str] = Counter()
                for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="artifacts/jobs/"):
                    for item in page.get("Contents", []):
                        objects[item["Key"].split("/")[2]] += 1
                claimed = _claims(procs, workers, set(ids))
                batches.append(
                    Batch(
                        wall_s=wall_s,
                        accept_s=accept_s,
                        statuses=Counter(s for s, _ in jobs),
                        attempts=Counter(int(a) for _, a in jobs),
                        run_twice=sum(1 for j in ids if claimed[j] != 1 or running.get(j) != 1),
                        stuck=sum(1 for s, _ in jobs if s in ("queued", "running")),
                        without_artifacts=sum(1 for j in ids if not artifacts.get(j) or objects[j] != artifacts.get(j)),
                        readyz=client.get("/readyz").status_code,
                        run_s=run_s,
                        messages=_received(procs, workers) - received_before,
                    )
                )
                _record("the full stack, 2 workers", batches, FULL_STACK_NOTES, "full_stack", check=False)
            per_worker = Counter(
                name for name in workers for m in CLAIM_LINE.finditer(procs.log(name)) if m.group(3).startswith(name)
            )
            dispatch = sorted(_dispatch_s(procs, workers))
    finally:
        procs.stop()
        engine.dispose()
        redis.stop()
        drop_test_database(db_url)
    _record(
        "the full stack, 2 workers",
        batches,
        f"{FULL_STACK_NOTES} Claims per worker: {dict(sorted(per_worker.items()))}.",
        "full_stack",
        dispatch_s_p50=round(statistics.median(dispatch), 2) if dispatch else None,
        dispatch_s_p90=round(statistics.quantiles(dispatch, n=10)[-1], 2) if len(dispatch) > 1 else None,
    )
    assert set(per_worker) == set(workers), per_worker
