"""Broker and database outages against real processes: a private Redis and a private Postgres are stopped
and started again while the API (`lorp serve --no-worker`, with its reconciler thread) and a Celery
worker run.

- Redis: jobs queued and one running when the broker stops; its messages die with it (the private
  server keeps nothing). Reads keep working, /readyz names the broker, a new submission is still 202
  (enqueue deferred), and once Redis is back the reconciler re-enqueues every queued job whose message
  it finds lost: all succeed.
- Postgres: the API answers 503 problem+json quickly during the outage and serves again afterwards
  without a restart; the job that was running finishes or is retried (attempts bounded).

Run: ``.venv/bin/python -m pytest tests/reliability/test_outages.py -m reliability``
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.service.conftest import create_test_database, drop_test_database

from .record import record
from .servers import (
    FINAL,
    QUEUE_QUIET_S,
    PostgresServer,
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

COMMAND = ".venv/bin/python -m pytest tests/reliability/test_outages.py -m reliability -k {k}"
# A request during an outage must answer within this (pool_timeout and connect_timeout are 5 s).
OUTAGE_ANSWER_S = 6.0
PROBLEM_JSON = "application/problem+json"


@pytest.fixture(scope="module")
def model_root(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> Path:
    root = tmp_path_factory.mktemp("models")
    build_tiny_model(root, tiny_tokenizer, layers=2)
    return root


@pytest.fixture()
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path / "logs")
    try:
        yield procs
    finally:
        procs.stop()


def _timed(client: httpx.Client, method: str, url: str, **kwargs: Any) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    resp = client.request(method, url, **kwargs)
    return resp, time.monotonic() - started


def _job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    resp = client.get(f"/v1/jobs/{job_id}")
    resp.raise_for_status()
    body: dict[str, Any] = resp.json()
    return body


def _wait_final(client: httpx.Client, ids: list[str], procs: Processes, timeout: float) -> dict[str, dict[str, Any]]:
    jobs: dict[str, dict[str, Any]] = {}

    def done() -> bool:
        procs.check_alive()
        for job_id in ids:
            if jobs.get(job_id, {}).get("status") not in FINAL:
                jobs[job_id] = _job(client, job_id)
        return all(j["status"] in FINAL for j in jobs.values())

    try:
        wait_until("jobs finished", done, timeout, interval=0.5)
    except TimeoutError:
        states = {k: (v["status"], v["attempts"]) for k, v in jobs.items()}
        pytest.fail(f"jobs not finished within {timeout:.0f} s: {states}\n{procs.logs()}")
    return jobs


def _artifact_sets(client: httpx.Client, ids: list[str]) -> dict[str, int]:
    return {job_id: len(client.get(f"/v1/jobs/{job_id}/artifacts").json()) for job_id in ids}


# -- Redis -------------------------------------------------------------------------------------------------


def test_redis_restart_loses_no_job(tmp_path: Path, model_root: Path, processes: Processes) -> None:
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    db_url = create_test_database("lorp_rel_redis")
    try:
        _redis_scenario(tmp_path, model_root, processes, redis, db_url)
    finally:
        processes.stop()
        redis.stop()
        drop_test_database(db_url)


def _api_and_worker(procs: Processes, env: dict[str, str], model_root: Path) -> tuple[httpx.Client, str, Path]:
    """The API and one worker on ``env``; returns a client, the uploaded corpus's id and the model."""
    base = start_api(procs, env)
    start_worker(procs, env, "w1")
    client = httpx.Client(base_url=base, timeout=30)
    return client, upload_corpus(client), model_root / "tiny"


def _redis_scenario(tmp_path: Path, model_root: Path, procs: Processes, redis: RedisServer, db_url: str) -> None:
    env = service_env(
        tmp_path / "data",
        model_root,
        database_url=db_url,
        broker_url=redis.url,
        queued_timeout_s=5,
        queue_quiet_s=QUEUE_QUIET_S,
        reconcile_interval_s=1,
        heartbeat_timeout_s=60,
    )
    client, dataset, model = _api_and_worker(procs, env, model_root)

    # One job running (more windows so it lasts), three queued behind it (one worker, prefetch 1).
    running = client.post("/v1/jobs", json=cheap_job(model, dataset, seed=100, num_samples=64)).json()["id"]
    wait_until("first job running", lambda: _job(client, running)["status"] == "running", 90)
    queued = [client.post("/v1/jobs", json=cheap_job(model, dataset, seed=i)).json()["id"] for i in range(3)]
    assert all(_job(client, j)["status"] == "queued" for j in queued)

    redis.stop()
    outage_started = time.monotonic()
    running_at_stop = _job(client, running)["status"]

    # Reads keep answering; readiness names the broker; a submission is recorded with enqueue deferred.
    reads: list[tuple[int, float]] = []
    for _ in range(5):
        for url in ("/v1/jobs", f"/v1/jobs/{running}", f"/v1/jobs/{queued[0]}"):
            resp, took = _timed(client, "GET", url)
            reads.append((resp.status_code, took))
    assert {s for s, _ in reads} == {200}, reads
    ready, ready_s = _timed(client, "GET", "/readyz")
    assert ready.status_code == 503 and ready.headers["content-type"].startswith(PROBLEM_JSON), ready.text
    problem = ready.json()
    assert [e["field"] for e in problem["errors"]] == ["broker"], problem
    assert problem["checks"]["database"]["ok"] and not problem["checks"]["broker"]["ok"]
    posted, post_s = _timed(client, "POST", "/v1/jobs", json=cheap_job(model, dataset, seed=50))
    assert posted.status_code == 202, posted.text
    during = posted.json()["id"]
    assert _job(client, during)["status"] == "queued"
    engine = create_engine(db_url)
    with engine.connect() as conn:
        enqueued_at = conn.execute(text("select enqueued_at from jobs where id = :id"), {"id": during}).scalar()
    assert enqueued_at is None, "a job submitted while the broker is down must wait for the reconciler"
    # Keep the broker down a while longer: the worker's reconnect loop and the reconciler both see it.
    time.sleep(max(0.0, 6 - (time.monotonic() - outage_started)))
    outage_s = time.monotonic() - outage_started

    redis.start()  # empty: every queued message and the running job's unacknowledged one are gone
    ids = [running, *queued, during]
    jobs = _wait_final(client, ids, procs, timeout=240)
    recovered_s = time.monotonic() - outage_started
    statuses = {j: jobs[j]["status"] for j in ids}
    attempts = {j: jobs[j]["attempts"] for j in ids}
    artifacts = _artifact_sets(client, ids)
    ready_after = client.get("/readyz")
    with engine.connect() as conn:
        claims: dict[str, int] = dict(
            conn.execute(
                text(
                    "select job_id::text, count(*) from job_events where kind = 'status' and status = 'running' "
                    "and job_id = any(:ids) group by job_id"
                ),
                {"ids": [uuid.UUID(j) for j in ids]},
            ).all()
        )
    engine.dispose()
    lost = sum(1 for s in statuses.values() if s != "succeeded")
    running_outcome = "finished on attempt 1" if attempts[running] == 1 else f"retried: attempts={attempts[running]}"
    record(
        "faults",
        "Redis stopped and restarted (jobs queued, one running)",
        runs=1,
        outcomes={
            "jobs": len(ids),
            "succeeded": sum(1 for s in statuses.values() if s == "succeeded"),
            "attempts": sorted(attempts.values()),
            "running job": running_outcome,
            "running job status when Redis stopped": running_at_stop,
            "reads during outage": f"{len(reads)} x 200",
            "/readyz during outage": f"{ready.status_code}, failing check: broker",
            "POST during outage": f"{posted.status_code}, enqueued_at NULL until the reconciler re-sent it",
            "/readyz after": ready_after.status_code,
        },
        data_lost=lost,
        command=COMMAND.format(k="redis"),
        notes=(
            "The private Redis keeps nothing, so the restart drops the three queued messages, the running job's "
            "unacknowledged one and the deferred submission; the reconciler (LORP_QUEUED_TIMEOUT_S=5) sends the "
            "never-sent submission, then each queued job once a job sent after it was claimed (its message was "
            f"passed over) or its queue's slot sat free for LORP_QUEUE_QUIET_S={QUEUE_QUIET_S}; the claim refuses "
            "duplicates."
        ),
        figures={
            "outage_s": round(outage_s, 1),
            "read_latency_max_s": round(max(t for _, t in reads), 3),
            "readyz_during_outage_s": round(ready_s, 3),
            "post_during_outage_s": round(post_s, 3),
            "all_succeeded_after_s": round(recovered_s, 1),
        },
    )
    assert lost == 0, f"{statuses}\n{procs.logs()}"
    assert ready_after.status_code == 200, ready_after.text
    assert all(a <= 2 for a in attempts.values()), attempts
    assert all(n >= 1 for n in artifacts.values()) and len(set(artifacts.values())) == 1, artifacts
    # Each claim is one 'running' status event; only a retried job may have two.
    assert all(claims.get(j) == attempts[j] for j in ids), (claims, attempts)
    assert read_latency_ok(reads), reads


def read_latency_ok(reads: list[tuple[int, float]]) -> bool:
    return max(t for _, t in reads) < OUTAGE_ANSWER_S


# -- Postgres ----------------------------------------------------------------------------------------------


def test_postgres_restart_503_then_recovers(tmp_path: Path, model_root: Path, processes: Processes) -> None:
    pg = PostgresServer()
    redis = RedisServer(tmp_path / "redis")
    try:
        pg.init()
        pg.start()
        redis.start()
        db_url = pg.create_database("lorp")
        _postgres_scenario(tmp_path, model_root, processes, pg, redis, db_url)
    finally:
        processes.stop()
        redis.stop()
        pg.remove()


def _postgres_scenario(
    tmp_path: Path, model_root: Path, procs: Processes, pg: PostgresServer, redis: RedisServer, db_url: str
) -> None:
    env = service_env(
        tmp_path / "data",
        model_root,
        database_url=db_url,
        broker_url=redis.url,
        queued_timeout_s=10,
        reconcile_interval_s=1,
        heartbeat_timeout_s=20,
        max_attempts=3,
    )
    client, dataset, model = _api_and_worker(procs, env, model_root)
    job_id = client.post("/v1/jobs", json=cheap_job(model, dataset, seed=7, num_samples=64)).json()["id"]
    wait_until("job running", lambda: _job(client, job_id)["status"] == "running", 90)
    warm = client.get(f"/v1/jobs/{job_id}")  # the pool holds live connections that the restart will kill
    assert warm.status_code == 200

    pg.stop("fast")
    outage_started = time.monotonic()
    answers: list[tuple[str, int, float, str, str | None]] = []
    probes = (
        ("GET", f"/v1/jobs/{job_id}", None),
        ("GET", "/v1/jobs", None),
        ("POST", "/v1/jobs", cheap_job(model, dataset, seed=8)),
    )
    for _ in range(3):
        for method, url, body in probes:
            resp, took = _timed(client, method, url, json=body)
            code = resp.json().get("code") if resp.headers.get("content-type", "").startswith(PROBLEM_JSON) else None
            answers.append((f"{method} {url}", resp.status_code, took, resp.headers.get("content-type", ""), code))
    ready, _ = _timed(client, "GET", "/readyz")
    health = client.get("/healthz")
    time.sleep(max(0.0, 5 - (time.monotonic() - outage_started)))
    outage_s = time.monotonic() - outage_started

    pg.start()
    restarted = time.monotonic()
    wait_until("API serves again", lambda: client.get(f"/v1/jobs/{job_id}").status_code == 200, 30, interval=0.2)
    recovery_s = time.monotonic() - restarted
    after = [client.get(f"/v1/jobs/{job_id}").status_code for _ in range(10)]
    after_post = client.post("/v1/jobs", json=cheap_job(model, dataset, seed=9))
    ids = [job_id] + ([after_post.json()["id"]] if after_post.status_code == 202 else [])
    jobs = _wait_final(client, ids, procs, timeout=240)
    ready_after = client.get("/readyz")
    job = jobs[job_id]
    outcome = "finished on attempt 1" if job["attempts"] == 1 else f"retried: attempts={job['attempts']}"
    statuses = sorted({s for _, s, _, _, _ in answers})
    failing = [e["field"] for e in ready.json().get("errors", [])]
    record(
        "faults",
        "Postgres restarted while the API serves and a worker runs",
        runs=1,
        outcomes={
            "requests during outage": len(answers),
            "statuses during outage": statuses,
            "problem codes": sorted({str(c) for *_, c in answers}),
            "/readyz during outage": f"{ready.status_code}, failing: {failing}",
            "/healthz during outage": health.status_code,
            "after restart": f"{after.count(200)}/10 x 200 without restarting the API",
            "running job": f"{job['status']}, {outcome}",
            "job submitted after restart": jobs[ids[-1]]["status"] if len(ids) > 1 else after_post.status_code,
        },
        data_lost=sum(1 for j in jobs.values() if j["status"] != "succeeded"),
        command=COMMAND.format(k="postgres"),
        notes=_postgres_notes(job["attempts"], procs.log("w1")),
        figures={
            "outage_s": round(outage_s, 1),
            "answer_during_outage_max_s": round(max(a[2] for a in answers), 3),
            "serving_again_after_restart_s": round(recovery_s, 2),
            "job_attempts": job["attempts"],
        },
    )
    bad = [a for a in answers if a[1] != 503 or not a[3].startswith(PROBLEM_JSON) or a[4] != "database_unavailable"]
    assert not bad, f"during the outage: {bad}\n{procs.logs()}"
    slow = [a for a in answers if a[2] >= OUTAGE_ANSWER_S]
    assert not slow, f"requests hung during the outage: {slow}"
    assert ready.status_code == 503 and "database" in [e["field"] for e in ready.json()["errors"]]
    assert health.status_code == 200
    assert after == [200] * 10
    assert after_post.status_code == 202, after_post.text
    assert ready_after.status_code == 200, ready_after.text
    assert all(j["status"] == "succeeded" for j in jobs.values()), f"{jobs}\n{procs.logs()}"
    # Waited out, not run again: the outage cost the running job no attempt.
    assert job["attempts"] == 1, f"{job}\n{procs.log('w1')[-3000:]}"


def _postgres_notes(attempts: int, worker_log: str) -> str:
    base = (
        "pg_ctl stop -m fast kills the pooled connections; pool_pre_ping replaces them after the restart, so "
        "the API serves again without a restart. The worker's heartbeats and progress writes only log the outage. "
    )
    if attempts == 1:
        return base + (
            "The running job's reads and writes it cannot do without (its dataset, a stored analysis, its "
            "publication, the record of how it ended) wait for the database with backoff (LORP_OUTAGE_WAIT_S), "
            "so it finished on attempt 1."
        )
    aborted = "failed unexpectedly" in worker_log and "OperationalError" in worker_log
    cause = (
        "a required database read of the running attempt (e.g. the analysis lookup) raised OperationalError, "
        "the runner could not record the failure either, "
        if aborted
        else "the running attempt ended during the outage, "
    )
    return base + (
        f"Retried: {cause}so the job stayed running until its heartbeat went stale "
        f"(LORP_HEARTBEAT_TIMEOUT_S=20) and the reconciler requeued it; attempt {attempts} succeeded."
    )
