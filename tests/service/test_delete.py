"""Deleting and expiring jobs, counting what is left: objects in storage and rows in the database.

On `lorp serve` (embedded: SQLite, local artifacts, a real worker and its reconciler every second):
a finished job deleted through the client leaves no object and no result row, and an analysis
another job shares stays until that job goes too; a running job deleted is stopped and purged once
its worker stopped it. On Postgres: a queued job deleted is cancelled and its Idempotency-Key freed;
LORP_ARTIFACT_TTL_DAYS makes the reconciler expire old jobs the same way; a deleted job is left out
of every read of live jobs (``jobs.live_jobs``, ``jobs.LIVE``), one by one.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.security import Principal
from app.db.models import Analysis, ApiKey, Artifact, Job, JobStatus, Metric, Plan
from app.db.session import session_factory, session_scope
from app.repositories import analyses as analyses_repo
from app.repositories import jobs as jobs_repo
from app.storage import artifact_store
from app.storage.keys import job_prefix
from lorp_client import ApiError, Client
from worker.reconciler import reconcile_once

from .api_helpers import DEMO_JOB, client_for
from .stack import embedded_stack

RESULT_TABLES = ("artifacts", "plans", "metrics", "task_metrics")


@pytest.fixture(scope="module")
def embedded(
    tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any, request: pytest.FixtureRequest
) -> Iterator[dict[str, Any]]:
    with embedded_stack(tmp_path_factory, tiny_tokenizer, request, "delete", LORP_RECONCILE_INTERVAL_S="1") as stack:
        yield stack


def _body(model: str, seed: int = 0, num_layers: int = 1, num_samples: int = 4) -> dict[str, Any]:
    return {
        "model": model,
        "num_layers": num_layers,
        "method": "lorp",
        "dataset": "builtin",
        "calibration": {"num_samples": num_samples, "seq_len": 32, "batch_size": 1, "seed": seed},
        "evaluation": {"max_windows": 1, "speed": False, "prompts": [], "curve_budgets": []},
    }


def _rows(data: Path, job_id: uuid.UUID) -> dict[str, int]:
    with sqlite3.connect(data / "lorp.db") as db:
        counts = {
            t: db.execute(f"select count(*) from {t} where job_id = ?", (job_id.hex,)).fetchone()[0]
            for t in RESULT_TABLES
        }
        counts["analyses"] = db.execute("select count(*) from analyses").fetchone()[0]
        row = db.execute("select deleted_at, purged_at from jobs where id = ?", (job_id.hex,)).fetchone()
    counts["tombstone"] = int(row is not None and row[0] is not None)
    counts["purged"] = int(row is not None and row[1] is not None)
    return counts


def _objects(data: Path, job_id: uuid.UUID) -> int:
    folder = data / "artifacts" / "jobs" / str(job_id)
    return sum(1 for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def test_deleting_finished_jobs_removes_everything_but_a_shared_analysis(embedded: dict[str, Any]) -> None:
    data = embedded["data"]
    with Client(embedded["base"]) as client:
        first = client.wait(client.submit(**_body(embedded["model"], seed=1)).id, timeout=240, poll_interval=0.2)
        # The same model and calibration: the second job reuses the first one's analysis.
        second = client.wait(
            client.submit(**{**_body(embedded["model"], seed=1), "num_layers": 2}).id, timeout=240, poll_interval=0.2
        )
        assert first.status == second.status == "succeeded", (first.error, second.error)
        assert second.summary is not None and second.summary.analysis_reused
        before = _rows(data, first.id)
        assert before["artifacts"] >= 5 and before["plans"] and before["metrics"] and _objects(data, first.id) >= 5

        gone = client.delete(first.id)
        assert gone.purged and gone.status == "succeeded"
        after = _rows(data, first.id)
        assert {t: after[t] for t in RESULT_TABLES} == dict.fromkeys(RESULT_TABLES, 0)
        assert after["tombstone"] == after["purged"] == 1 and _objects(data, first.id) == 0
        assert after["analyses"] == before["analyses"]  # the second job still uses it
        with pytest.raises(ApiError) as hidden:
            client.get(first.id)
        assert hidden.value.status == 404
        assert first.id not in {j.id for j in client.list()}
        with pytest.raises(ApiError):
            client.delete(first.id)  # already gone: 404
        assert client.get(second.id).summary is not None  # untouched

        client.delete(second.id)
        last = _rows(data, second.id)
        assert last["analyses"] == before["analyses"] - 1 and _objects(data, second.id) == 0


def test_deleting_a_running_job_stops_it_and_purges_it_afterwards(embedded: dict[str, Any]) -> None:
    data = embedded["data"]
    with Client(embedded["base"]) as client:
        job = client.submit(**_body(embedded["model"], seed=5, num_layers=2, num_samples=64))
        deadline = time.monotonic() + 120
        while client.get(job.id).status == "queued" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get(job.id).status == "running"
        gone = client.delete(job.id)
        if gone.status == "running":
            assert not gone.purged  # its worker must stop it first (202)
        deadline = time.monotonic() + 120
        while not _rows(data, job.id)["purged"] and time.monotonic() < deadline:
            time.sleep(0.2)
    rows = _rows(data, job.id)
    assert rows["purged"] == 1, embedded["procs"].logs()
    assert {t: rows[t] for t in RESULT_TABLES} == dict.fromkeys(RESULT_TABLES, 0) and _objects(data, job.id) == 0
    with sqlite3.connect(data / "lorp.db") as db:
        status = db.execute("select status from jobs where id = ?", (job.id.hex,)).fetchone()[0]
    assert status in ("cancelled", "succeeded")  # stopped at its next check, or finished first


def test_deleting_a_queued_job_cancels_it_and_frees_its_key(api_settings: Settings, rollback_sessionmaker: Any) -> None:
    client = client_for(api_settings, rollback_sessionmaker)
    key = f"delete-{uuid.uuid4()}"
    created = client.post("/v1/jobs", json=DEMO_JOB, headers={"Idempotency-Key": key}).json()
    deleted = client.delete(f"/v1/jobs/{created['id']}")
    assert deleted.status_code == 200, deleted.text
    assert deleted.json()["status"] == "cancelled" and deleted.json()["purged"] is True
    assert client.get(f"/v1/jobs/{created['id']}").status_code == 404
    again = client.post("/v1/jobs", json=DEMO_JOB, headers={"Idempotency-Key": key})
    assert again.status_code == 202 and again.json()["id"] != created["id"]  # a new job, not a replay
    with rollback_sessionmaker() as session:
        row = session.get(Job, uuid.UUID(created["id"]))
        assert row.deleted_at is not None and row.purged_at is not None and row.status == JobStatus.cancelled
    assert client.delete(f"/v1/jobs/{uuid.uuid4()}").status_code == 404


def _analysis(session: Session) -> Analysis:
    analysis = Analysis(
        fingerprint=uuid.uuid4().hex, model_source="demo", dataset_sha256="0" * 64, num_samples=1, seq_len=8,
        seed=0, num_tokens=8, num_blocks=2, similarity=[[1.0]], angular_distance=[[0.0]], rls=None, k=1,
        clusters=[0, 0], redundancy=[None, None], provenance={},
    )  # fmt: skip
    session.add(analysis)
    session.flush()
    return analysis


def _job(session: Session, **fields: Any) -> Job:
    job = Job(request={}, request_hash="0" * 64, model_source="demo", method="lorp", **fields)
    session.add(job)
    session.flush()
    return job


def test_the_reconciler_expires_jobs_past_the_ttl(api_settings: Settings, committed_jobs: list[uuid.UUID]) -> None:
    settings = api_settings.model_copy(update={"artifact_ttl_days": 7})
    factory = session_factory(settings.sqlalchemy_url)
    storage = artifact_store(settings)
    now = dt.datetime.now(dt.UTC)
    ids = {}
    for name, age_days in (("old", 8), ("recent", 1)):
        with session_scope(factory) as session:
            analysis = _analysis(session)
            finished_at = now - dt.timedelta(days=age_days)
            job = _job(
                session, queue=settings.queue_name, status=JobStatus.succeeded, finished_at=finished_at,
                analysis_id=analysis.id,
            )  # fmt: skip
            key = f"{job_prefix(job.id)}/report.json"
            storage.put_bytes(key, b"{}", content_type="application/json")
            session.add(
                Artifact(
                    job_id=job.id,
                    name="report.json",
                    storage_key=key,
                    size_bytes=2,
                    sha256="0" * 64,
                    content_type="application/json",
                )
            )
            session.add(Plan(job_id=job.id, name="lorp", pruned_layers=[1], chosen=True))
            session.add(Metric(job_id=job.id, name="perplexity", phase="dense", value=1.0))
            ids[name] = (job.id, analysis.id)
            committed_jobs.append(job.id)

    counts = reconcile_once(settings)
    assert counts["expired"] >= 1 and counts["purged"] >= 1
    with session_scope(factory) as session:
        for name, (job_id, analysis_id) in ids.items():
            job = session.get(Job, job_id)
            rows = sum(
                session.scalar(select(func.count()).select_from(m).where(m.job_id == job_id)) or 0
                for m in (Artifact, Plan, Metric)
            )
            objects = storage.list(job_prefix(job_id))
            if name == "old":
                assert job.deleted_at is not None and job.purged_at is not None
                assert rows == 0 and objects == [] and session.get(Analysis, analysis_id) is None
            else:
                assert job.deleted_at is None and rows == 3 and len(objects) == 1
                assert session.get(Analysis, analysis_id) is not None


def test_a_deleted_job_is_left_out_of_every_read_of_live_jobs(db_session: Session) -> None:
    """Each read that shows or counts jobs, one by one: the two deleted jobs (one queued, which only a
    race could leave, one finished long ago) are gone from it, the two live twins stay."""
    session, old = db_session, dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    owner = ApiKey(name="live-reads", prefix="lorp_live", key_hash=uuid.uuid4().hex * 2)
    session.add(owner)
    session.flush()
    principal, admin = Principal(key_id=owner.id), Principal(key_id=None, is_admin=True)
    shared, alone = _analysis(session), _analysis(session)
    queued = {"queue": "live-reads", "status": JobStatus.queued, "owner_id": owner.id}
    done = {**queued, "status": JobStatus.succeeded, "finished_at": old}
    live = [_job(session, **queued), _job(session, **done, analysis_id=shared.id)]
    deleted = [_job(session, **queued, analysis_id=shared.id), _job(session, **done, analysis_id=alone.id)]
    counts = jobs_repo.count_by_status(session)
    assert jobs_repo.queued_count(session, owner.id) == 2
    for job in deleted:
        assert jobs_repo.mark_deleted(session, job.id, dt.datetime.now(dt.UTC))

    for job in deleted:
        assert jobs_repo.get_visible(session, job.id, principal) is None
        assert jobs_repo.get_visible(session, job.id, admin) is None
        assert not jobs_repo.mark_deleted(session, job.id, dt.datetime.now(dt.UTC))  # once only
        assert jobs_repo.owner_of(session, job.id) == owner.id  # the worker's read still finds it
    assert all(jobs_repo.get_visible(session, job.id, principal) is not None for job in live)
    listed = jobs_repo.list_jobs(session, principal, status=None, model=None, after=None, limit=10)
    assert {j.id for j in listed} == {j.id for j in live}
    assert jobs_repo.queued_count(session, owner.id) == 1
    after = jobs_repo.count_by_status(session)
    assert (counts["queued"] - after["queued"], counts["succeeded"] - after["succeeded"]) == (1, 1)
    expired = jobs_repo.expired(session, dt.datetime.now(dt.UTC), limit=10_000)
    assert live[1].id in expired and deleted[1].id not in expired
    assert analyses_repo.remove_if_unused(session, shared.id) is False  # a live job still uses it
    assert analyses_repo.remove_if_unused(session, alone.id) is True  # only a deleted one did
    assert session.scalar(select(func.count()).select_from(Analysis).where(Analysis.id == alone.id)) == 0
