"""Worker faults with real processes: Postgres, Redis, ``celery worker`` processes and moto's S3 server.

1. ``kill -9`` of a worker (its whole process group) while a job is in loading, capture, saving or
   uploading: the reconciler takes the job back and another worker finishes it, attempts = 2, one
   artifact set.
4. Object storage gone during the upload: bounded retries, then ``storage_unavailable``, no artifacts.
5. A job past its time limit fails with ``time_limit_exceeded``; a job whose capture cannot allocate
   its memory (an address-space limit on the pool child) fails with ``out_of_memory``; either way the
   worker then runs the next job to success.
6. Cancel racing completion: always either cancelled with nothing stored, or succeeded with its set.

Every loop is bounded; ``LORP_RELIABILITY_RUNS`` scales the repeated scenarios up.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import random
import re
import resource
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from billiard.pool import soft_timeout_sighandler
from celery.exceptions import SoftTimeLimitExceeded
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.exc import ProgrammingError

from app.core.config import Settings
from app.db.models import Analysis, Artifact, Job, JobEvent, JobStatus, Metric, Plan
from app.db.session import session_factory, session_scope
from app.main import create_app
from app.repositories import lifecycle
from app.storage import artifact_store
from app.storage.keys import job_prefix
from lorp import loading
from lorp.stages import STAGES
from tests.reliability.record import full_size, record
from tests.reliability.servers import TcpGate
from tests.service.moto_server import MotoServer
from worker import retries, runner, soft_limit

from .conftest import (
    FAST_TIMINGS,
    WORDS,
    Fleet,
    WorkerProc,
    fleet_of,
    job_request,
    job_rows,
    load_job,
    save_llama,
    save_mid_llama,
    stack_settings,
    submit_job,
    upload_dataset,
    wait_for,
)

pytestmark = pytest.mark.reliability

RUNS = max(1, int(os.environ.get("LORP_RELIABILITY_RUNS", "1")))
COMMAND = "LORP_RELIABILITY_SIZE=full .venv/bin/python -m pytest tests/reliability/test_faults_worker.py -q -k {}"
ORDER = (*STAGES, "uploading")


# -- fixtures and checks ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fault_model_root(tiny_model_root: Path, tiny_tokenizer: Any) -> Path:
    """``tiny-llama`` plus ``mid-llama`` (8 blocks, 256 wide, ~33 MB: loading, saving and upload take a while)."""
    save_mid_llama(tiny_model_root, tiny_tokenizer)
    return tiny_model_root


@pytest.fixture()
def settings(
    tmp_path: Path, pg_url: str, reliability_redis_url: str, s3_server: str, fault_model_root: Path
) -> Settings:
    return stack_settings(tmp_path, pg_url, reliability_redis_url, s3_server, fault_model_root)


def _secs(a: dt.datetime | None, b: dt.datetime | None) -> float | None:
    return None if a is None or b is None else round((b - a).total_seconds(), 2)


def events_of(settings: Settings, job_id: uuid.UUID) -> list[JobEvent]:
    return sorted(job_rows(settings, JobEvent, job_id), key=lambda e: e.at)


def claim_to_first_stage(settings: Settings, job_id: uuid.UUID) -> list[float]:
    """For each attempt: seconds from its claim to its first stage write (child start-up + imports)."""
    out: list[float] = []
    claimed_at: dt.datetime | None = None
    for event in events_of(settings, job_id):
        if event.kind == "status" and event.status == "running":
            claimed_at = event.at
        elif event.kind == "stage" and claimed_at is not None:
            out.append(round((event.at - claimed_at).total_seconds(), 2))
            claimed_at = None
    return out


def stored_keys(settings: Settings, job_id: uuid.UUID) -> list[str]:
    return sorted(artifact_store(settings).list(job_prefix(job_id)))


def check_one_artifact_set(settings: Settings, job_id: uuid.UUID) -> dict[str, int]:
    """Succeeded with exactly one set: unique rows, the objects under jobs/{id}/ are exactly those rows."""
    job = load_job(settings, job_id)
    assert job.status == JobStatus.succeeded, (job.error_code, job.error_message)
    artifacts = job_rows(settings, Artifact, job_id)
    names = [a.name for a in artifacts]
    assert len(names) == len(set(names)), f"duplicate artifact rows: {names}"
    assert {"report.json", "analysis.npz", "heatmap.png", "model/config.json", "model/model.safetensors"} <= set(names)
    keys = [a.storage_key for a in artifacts]
    assert all(k == f"jobs/{job_id}/{a.name}" for k, a in zip(keys, artifacts, strict=True))
    assert stored_keys(settings, job_id) == sorted(keys), "objects under the job's prefix differ from its rows"
    storage = artifact_store(settings)
    for artifact in artifacts:
        digest = hashlib.sha256()
        for chunk in storage.iter_chunks(artifact.storage_key):
            digest.update(chunk)
        assert digest.hexdigest() == artifact.sha256, artifact.name
    plans = job_rows(settings, Plan, job_id)
    assert plans and len({p.name for p in plans}) == len(plans) and sum(p.chosen for p in plans) == 1
    metrics = job_rows(settings, Metric, job_id)
    assert metrics and len({(m.name, m.phase) for m in metrics}) == len(metrics)
    assert job.analysis_id is not None and job.summary is not None
    with session_scope(session_factory(settings.sqlalchemy_url)) as session:
        analysis = session.get(Analysis, job.analysis_id)
        assert analysis is not None and analysis.similarity
        same = session.scalars(select(Analysis.id).where(Analysis.fingerprint == analysis.fingerprint)).all()
        assert len(same) == 1
    assert not (settings.work_dir / str(job_id)).exists(), "the work folder was left behind"
    return {"artifacts": len(artifacts), "plans": len(plans), "metrics": len(metrics)}


def check_nothing_published(settings: Settings, job_id: uuid.UUID) -> None:
    assert job_rows(settings, Artifact, job_id) == []
    assert job_rows(settings, Plan, job_id) == [] and job_rows(settings, Metric, job_id) == []
    assert stored_keys(settings, job_id) == []


def stage_reached(settings: Settings, job_id: uuid.UUID, stage: str) -> tuple[bool, Job]:
    """(True, job) once the job is in ``stage``; (False, job) while before it; raises past it."""
    job = load_job(settings, job_id)
    if job.stage == stage and job.status == JobStatus.running:
        return True, job
    past = job.status.terminal or (job.stage in ORDER and ORDER.index(job.stage) > ORDER.index(stage))
    if past:
        raise _Missed(job.stage or job.status.value)
    return False, job


class _Missed(Exception):
    pass


# -- 1. kill -9 of a worker mid-job -----------------------------------------------------------------

# Every stage at the recorded size; a plain run kills in the longest stage and in the last one.
KILL_STAGES = ("loading", "capture", "saving", "uploading") if full_size() else ("capture",)
KILL_TRIES = 3  # a stage that went by between two polls is tried again with a new job, at most this often


def _kill_during(
    settings: Settings, fleet: Fleet, current: WorkerProc, stage: str, request_for: Any, spare_name: str
) -> tuple[uuid.UUID | None, WorkerProc, dict[str, Any]]:
    """Run a job on ``current``, kill -9 it in ``stage``; returns (job, the worker that finished it, figures)."""
    job_id = submit_job(settings, request_for())
    wait_for(lambda: load_job(settings, job_id).status != JobStatus.queued, 120, "the claim", 0.02)
    first = load_job(settings, job_id)
    assert first.worker and first.worker.startswith(current.name + "@"), first.worker
    spare = fleet.start_worker(spare_name, wait=False)
    try:
        wait_for(lambda: stage_reached(settings, job_id, stage)[0], 180, f"stage {stage}", 0.02)
    except _Missed as missed:
        # Too fast to catch this time: let it finish on ``current`` and try again with a new job.
        wait_for(lambda: load_job(settings, job_id).status.terminal, 180, "the missed job to finish")
        spare.wait_ready()
        current.stop()
        return None, spare, {"missed_at": str(missed)}
    killed_at = dt.datetime.now(dt.UTC)
    current.kill_hard()
    dead = load_job(settings, job_id)  # nobody writes attempt 1's row any more
    spare.wait_ready()
    wait_for(lambda: load_job(settings, job_id).status.terminal, 240, "the job to finish on the other worker", 0.1)
    job = load_job(settings, job_id)
    assert job.status == JobStatus.succeeded, (job.error_code, job.error_message, fleet.logs())
    requeued = [e for e in events_of(settings, job_id) if e.kind == "attempt"]
    assert job.attempts == 2, ([(e.at, e.message) for e in requeued], fleet.logs())
    assert job.worker and job.worker.startswith(spare_name + "@"), job.worker
    assert len(requeued) == 1, [e.message for e in requeued]
    figures = {
        "killed_in": dead.stage,
        "progress_at_kill": round(dead.progress, 3),
        "kill_to_requeue_s": _secs(killed_at, requeued[0].at),
        "kill_to_succeeded_s": _secs(killed_at, job.finished_at),
        "claim_to_first_stage_s": claim_to_first_stage(settings, job_id),
        **check_one_artifact_set(settings, job_id),
    }
    return job_id, spare, figures


def test_kill9_worker_mid_job_finishes_on_another_worker(
    settings: Settings, fault_model_root: Path, corpus_bytes: bytes, tmp_path: Path
) -> None:
    dataset_id = upload_dataset(settings, corpus_bytes)
    model = str(fault_model_root / "mid-llama")
    seeds = iter(range(1000, 2000))

    def request_for() -> Any:
        # A new seed each time: no job reuses another's stored capture, so every attempt captures.
        return job_request(
            model, dataset_id, num_samples=8, batch_size=1, seed=next(seeds), eval_windows=1, perplexity=False
        )

    started = time.monotonic()
    per_stage: dict[str, dict[str, Any]] = {}
    with fleet_of(settings, tmp_path) as fleet:
        current = fleet.start_worker("w1")
        n = 1
        for stage in KILL_STAGES:
            tries: list[dict[str, Any]] = []
            for _ in range(RUNS):
                for _ in range(KILL_TRIES):
                    n += 1
                    job_id, current, figures = _kill_during(settings, fleet, current, stage, request_for, f"w{n}")
                    tries.append(figures)
                    if job_id is not None:
                        break
            done = [t for t in tries if "killed_in" in t]
            assert len(done) == RUNS, f"could not catch stage {stage}: {tries}"
            assert all(t["killed_in"] == stage for t in done), tries
            per_stage[stage] = {"tries": tries, "done": done}
    elapsed = round(time.monotonic() - started, 1)

    for stage, result in per_stage.items():
        done = result["done"]
        record(
            suite="faults",
            scenario=f"kill -9 worker during {stage}",
            runs=len(done),
            outcomes={
                "succeeded_on_other_worker": len(done),
                "attempts": [2] * len(done),
                "artifact_sets": len(done),
                "duplicate_rows": 0,
                "leftover_objects": 0,
                "missed_stage_retries": len(result["tries"]) - len(done),
            },
            data_lost=0,
            command=COMMAND.format("kill9"),
            notes=(
                "kill -9 of the worker's process group (Celery main process and pool child) while the job's "
                f"row said stage={stage}; a second worker and the reconciler (heartbeat "
                f"{FAST_TIMINGS['heartbeat_interval_s']:g} s, timeout {FAST_TIMINGS['heartbeat_timeout_s']:g} s) ran; "
                "the job was requeued and finished on the second worker with one artifact set (rows unique, "
                "objects under jobs/{id}/ exactly the rows, sha256 checked)."
            ),
            figures={
                "kill_to_requeue_s": [t["kill_to_requeue_s"] for t in done],
                "kill_to_succeeded_s": [t["kill_to_succeeded_s"] for t in done],
                "claim_to_first_stage_s (attempt 1, attempt 2)": [t["claim_to_first_stage_s"] for t in done],
                "progress_at_kill": [t["progress_at_kill"] for t in done],
                "artifacts_per_set": [t["artifacts"] for t in done],
                "whole_scenario_s (4 stages)": elapsed,
            },
        )


# -- 4. object storage unavailable during the upload ------------------------------------------------

UPLOAD_TRIES = 3
# How long the job waits for a store that does not come back (LORP_OUTAGE_WAIT_S; 300 s by default).
GIVE_UP_S = 3.0
# A store away for this long, while the job waits up to OUTAGE_PATIENCE_S for it, costs the job nothing.
OUTAGE_S = 5.0
OUTAGE_PATIENCE_S = 60.0


def _catch_uploading(
    settings: Settings, model_root: Path, dataset_id: uuid.UUID, seed: int, tries: list[str]
) -> uuid.UUID:
    """A job on mid-llama (33 MB to upload) caught in its upload; a stage that went by between two polls
    is tried again with a new job (the next seed), at most UPLOAD_TRIES times."""
    model = str(model_root / "mid-llama")
    for n in range(UPLOAD_TRIES):
        request = job_request(model, dataset_id, seed=seed + n, batch_size=8, eval_windows=1)
        job_id = submit_job(settings, request)
        try:
            wait_for(lambda j=job_id: stage_reached(settings, j, "uploading")[0], 180, "the upload", 0.01)
        except _Missed as missed:
            tries.append(f"missed ({missed})")
            continue
        return job_id
    pytest.fail(f"never caught a job uploading: {tries}")


def test_storage_unavailable_during_upload_fails_cleanly(
    tmp_path: Path, pg_url: str, reliability_redis_url: str, fault_model_root: Path, corpus_bytes: bytes
) -> None:
    tries: list[str] = []
    with MotoServer() as moto:
        settings = stack_settings(
            tmp_path, pg_url, reliability_redis_url, moto.endpoint_url, fault_model_root, outage_wait_s=GIVE_UP_S
        )
        dataset_id = upload_dataset(settings, corpus_bytes)
        with fleet_of(settings, tmp_path) as fleet:
            worker = fleet.start_worker("w1")
            job_id = _catch_uploading(settings, fault_model_root, dataset_id, 3000, tries)
            stopped = time.monotonic()
            moto.stop()  # the object store is gone in the middle of the upload, for good
            at_stop = load_job(settings, job_id)
            tries.append(f"storage stopped at progress {at_stop.progress:.3f}")

            wait_for(lambda: load_job(settings, job_id).status.terminal, 120, "the job to fail", 0.1)
            to_failure = round(time.monotonic() - stopped, 1)
            job = load_job(settings, job_id)
            assert job.status == JobStatus.failed, (job.status, job.error_message, fleet.logs())
            assert job.error_code == "storage_unavailable"
            message = job.error_message or ""
            assert re.search(r"after \d+ attempts over \d+ s", message) and "object store is reachable" in message
            assert to_failure >= GIVE_UP_S - 1, to_failure
            assert job.attempts == 1
            assert job_rows(settings, Artifact, job_id) == []
            assert job_rows(settings, Plan, job_id) == [] and job_rows(settings, Metric, job_id) == []
            with TestClient(create_app(settings)) as client:
                listed = client.get(f"/v1/jobs/{job_id}/artifacts")
                assert listed.status_code == 200 and listed.json() == []
                shown = client.get(f"/v1/jobs/{job_id}").json()
                assert shown["status"] == "failed" and shown["error"]["code"] == "storage_unavailable"
            log = worker.log()
            retry_warnings = log.count("retrying in")
            assert retry_warnings >= 2, log[-3000:]
            assert worker.alive, "the worker process died with the object store"
            wait_for(lambda: len(worker.pool_children()) == 1, 30, "a fresh pool child")

    record(
        suite="faults",
        scenario="object storage unavailable during upload",
        runs=1,
        outcomes={
            "failed_storage_unavailable": 1,
            "artifact_rows": 0,
            "listed_by_api": 0,
            "worker_survived": True,
            "tries_to_catch_upload": tries,
        },
        data_lost=0,
        command=COMMAND.format("storage_unavailable"),
        notes=(
            "moto's S3 server stopped for good while the worker uploaded a 33 MB model; the upload call is "
            f"retried with exponential backoff from {retries.BACKOFF_S} s for LORP_OUTAGE_WAIT_S={GIVE_UP_S:g} "
            "(each try also has botocore's own retries), then the job fails with storage_unavailable and a "
            "message saying what to check; no artifact row is written, GET /v1/jobs/{id}/artifacts lists nothing."
        ),
        figures={
            "storage_stop_to_failed_s": to_failure,
            "retry_warnings_in_worker_log": retry_warnings,
            "error_message": message,
        },
    )


def test_a_store_away_for_seconds_during_the_upload_costs_the_job_nothing(
    tmp_path: Path,
    pg_url: str,
    reliability_redis_url: str,
    s3_server: str,
    fault_model_root: Path,
    corpus_bytes: bytes,
) -> None:
    """The network to the store is cut in the middle of the upload, for OUTAGE_S, then restored (the
    store keeps what it held, as a real one does across an outage): the job waits for it, within
    LORP_OUTAGE_WAIT_S, and succeeds in its first attempt with one whole artifact set."""
    tries: list[str] = []
    gate = TcpGate(s3_server)
    try:
        settings = stack_settings(
            tmp_path, pg_url, reliability_redis_url, gate.url, fault_model_root, outage_wait_s=OUTAGE_PATIENCE_S
        )
        dataset_id = upload_dataset(settings, corpus_bytes)
        with fleet_of(settings, tmp_path) as fleet:
            worker = fleet.start_worker("w1")
            job_id = _catch_uploading(settings, fault_model_root, dataset_id, 3100, tries)
            gate.cut()
            cut_at = time.monotonic()
            at_cut = load_job(settings, job_id)
            time.sleep(OUTAGE_S)
            during = load_job(settings, job_id)
            assert during.status == JobStatus.running and during.stage == "uploading", (during.status, during.stage)
            gate.reopen()
            wait_for(lambda: load_job(settings, job_id).status.terminal, 120, "the job to finish", 0.1)
            back_to_done = round(time.monotonic() - cut_at - OUTAGE_S, 1)
            sizes = check_one_artifact_set(settings, job_id)
            job = load_job(settings, job_id)
            assert job.attempts == 1, job.attempts
            retry_warnings = worker.log().count("retrying in")
            assert retry_warnings >= 1, worker.log()[-3000:]
    finally:
        gate.close()
    record(
        suite="faults",
        scenario="object storage away for seconds during upload",
        runs=1,
        outcomes={"succeeded": 1, "attempts": job.attempts, "artifact_sets": 1, "tries_to_catch_upload": tries},
        data_lost=0,
        command=COMMAND.format("away_for_seconds"),
        notes=(
            f"the network to moto's S3 server cut for {OUTAGE_S:g} s while the worker uploaded a 33 MB model "
            f"(at progress {at_cut.progress:.3f}), then restored; the upload waits for the store with backoff "
            f"(LORP_OUTAGE_WAIT_S={OUTAGE_PATIENCE_S:g}) and the job succeeds in its first attempt, its "
            "artifact rows exactly the objects stored."
        ),
        figures={
            "outage_s": OUTAGE_S,
            "restored_to_succeeded_s": back_to_done,
            "retry_warnings_in_worker_log": retry_warnings,
            "artifacts": sizes["artifacts"],
        },
    )


# -- 5. time limit and out of memory -----------------------------------------------------------------


def test_time_limit_fails_the_job_and_the_worker_runs_the_next(
    tmp_path: Path,
    pg_url: str,
    reliability_redis_url: str,
    s3_server: str,
    fault_model_root: Path,
    corpus_bytes: bytes,
) -> None:
    # 10 s is the smallest LORP_JOB_TIME_LIMIT_S allowed; 20 s leaves the next (short) job room on a busy machine.
    limit = 20
    settings = stack_settings(
        tmp_path, pg_url, reliability_redis_url, s3_server, fault_model_root, job_time_limit_s=limit
    )
    dataset_id = upload_dataset(settings, corpus_bytes)
    with fleet_of(settings, tmp_path) as fleet:
        worker = fleet.start_worker("w1")
        main_pid = worker.proc.pid
        # 4,096 windows of 128 tokens, one at a time, on the 8-block model: minutes of capture on any
        # CPU, far past the limit, however idle the machine (a job of seconds made this test flaky).
        big_corpus = " ".join(random.Random(4000).choice(WORDS) for _ in range(400_000)).encode()
        big_dataset = upload_dataset(settings, big_corpus)
        slow = submit_job(
            settings,
            job_request(
                str(fault_model_root / "mid-llama"),
                big_dataset,
                num_samples=4096,
                seq_len=128,
                batch_size=1,
                seed=4000,
            ),
        )
        # The limit counts from the job's start: a worker slow to boot on a busy machine delays that, and
        # is not what this test is about.
        wait_for(lambda: load_job(settings, slow).started_at is not None, 120, "the slow job to start", 0.1)
        try:
            wait_for(lambda: load_job(settings, slow).status.terminal, limit + 60, "the time limit", 0.1)
        except AssertionError:
            late = load_job(settings, slow)
            raise AssertionError((late.status, late.stage, late.attempts, fleet.logs(20000))) from None
        job = load_job(settings, slow)
        assert job.status == JobStatus.failed, (job.status, job.error_code, fleet.logs())
        assert job.error_code == "time_limit_exceeded", job.error_message
        assert "LORP_JOB_TIME_LIMIT_S" in (job.error_message or "")
        assert job.attempts == 1
        check_nothing_published(settings, slow)
        ran_s = _secs(job.started_at, job.finished_at)
        killed_in = job.stage

        short = job_request(
            str(fault_model_root / "tiny-llama"), dataset_id, seed=4001, num_samples=4, perplexity=False
        )
        nxt = submit_job(settings, short)
        wait_for(lambda: load_job(settings, nxt).status.terminal, 120, "the next job", 0.1)
        check_one_artifact_set(settings, nxt)
        after = load_job(settings, nxt)
        assert after.worker == job.worker and worker.alive and worker.proc.pid == main_pid
    record(
        suite="faults",
        scenario="job exceeds its time limit",
        runs=1,
        outcomes={"failed_time_limit_exceeded": 1, "next_job_succeeded_on_same_worker": 1, "artifact_rows": 0},
        data_lost=0,
        command=COMMAND.format("time_limit"),
        notes=(
            f"LORP_JOB_TIME_LIMIT_S={limit} on a job of minutes: Celery's soft limit raises in "
            "the pool child, the runner records time_limit_exceeded and removes partial outputs; the same "
            "worker process then ran the next job to success."
        ),
        figures={"started_to_failed_s": ran_s, "stage_when_stopped": killed_in, "limit_s": limit},
    )


def test_a_job_that_does_not_stop_at_its_time_limit_is_killed_and_fails_at_once(
    tmp_path: Path, pg_url: str, reliability_redis_url: str, s3_server: str, fault_model_root: Path
) -> None:
    """The soft limit is a signal the job handles in Python; a pool process that runs no Python (inside
    a long native call; here stopped with SIGSTOP) never sees it. Celery kills it at the hard limit,
    LORP_JOB_HARD_LIMIT_GRACE_S later, and the worker's main process fails the job with
    time_limit_exceeded at once, and removes its work folder. It used to be left running with a silent
    heartbeat, for the reconciler to run it again past its limit (this test runs no reconciler)."""
    limit, grace = 10, 2
    settings = stack_settings(
        tmp_path,
        pg_url,
        reliability_redis_url,
        s3_server,
        fault_model_root,
        job_time_limit_s=limit,
        job_hard_limit_grace_s=grace,
    )
    big_corpus = " ".join(random.Random(4100).choice(WORDS) for _ in range(400_000)).encode()
    with fleet_of(settings, tmp_path, reconciler=False) as fleet:
        worker = fleet.start_worker("w1")
        main_pid = worker.proc.pid
        big_dataset = upload_dataset(settings, big_corpus)
        request = job_request(
            str(fault_model_root / "mid-llama"), big_dataset, num_samples=4096, seq_len=128, batch_size=1, seed=4100
        )
        slow = submit_job(settings, request)
        wait_for(lambda: load_job(settings, slow).stage == "capture", 120, "the slow job's capture", 0.1)
        (child,) = worker.pool_children()
        os.kill(child, signal.SIGSTOP)  # runs no Python from now on: the soft limit's signal waits
        wait_for(lambda: load_job(settings, slow).status.terminal, limit + grace + 30, "the hard limit", 0.1)
        job = load_job(settings, slow)
        assert job.status == JobStatus.failed and job.error_code == "time_limit_exceeded", (job.status, job.error_code)
        assert "LORP_JOB_HARD_LIMIT_GRACE_S" in (job.error_message or "") and job.attempts == 1
        ran_s = _secs(job.started_at, job.finished_at)
        assert limit + grace - 1 <= ran_s < limit + grace + 20, ran_s
        check_nothing_published(settings, slow)
        assert not (settings.work_dir / str(slow)).exists(), "the killed attempt's work folder was left"
        assert "Hard time limit" in worker.log(), worker.log()[-3000:]
        # The worker lives on with a fresh pool process (a next job on it: the soft-limit test above; a
        # job of seconds could itself pass a 10 s limit on a busy machine).
        wait_for(lambda: worker.pool_children() not in ([], [child]), 30, "a fresh pool process")
        assert worker.alive and worker.proc.pid == main_pid
    record(
        suite="faults",
        scenario="job does not stop at its time limit",
        runs=1,
        outcomes={"failed_time_limit_exceeded": 1, "attempts": job.attempts, "worker_survived": True},
        data_lost=0,
        command=COMMAND.format("does_not_stop"),
        notes=(
            f"LORP_JOB_TIME_LIMIT_S={limit}, LORP_JOB_HARD_LIMIT_GRACE_S={grace}; the job's pool process stopped "
            "with SIGSTOP during its capture, so the soft limit's signal is never handled. Celery killed it at "
            "the hard limit; the worker's main process failed the job with time_limit_exceeded and removed its "
            "work folder, with no reconciler running; the worker lived on with a fresh pool process."
        ),
        figures={"started_to_failed_s": ran_s, "limit_s": limit, "grace_s": grace},
    )


def _time_limit(shape: str) -> None:
    """Celery's soft limit as it reaches the runner: itself, or (as once seen in CI) inside SQLAlchemy's
    connection ping, whose cleanup then fails on the interrupted connection and raises its own error."""
    if shape == "itself":
        raise SoftTimeLimitExceeded()
    try:
        raise SoftTimeLimitExceeded()
    except SoftTimeLimitExceeded:  # the driver's error, raised while handling it: the limit is its context
        cause = Exception("can't change 'autocommit' now: connection in transaction status ACTIVE")
        raise ProgrammingError("SELECT 1", None, cause)  # noqa: B904


@pytest.mark.parametrize("where", ["progress write", "cancel check"])
@pytest.mark.parametrize("shape", ["itself", "inside the driver's error"])
def test_time_limit_arriving_during_a_progress_write_still_ends_the_job(
    settings: Settings,
    fault_model_root: Path,
    corpus_bytes: bytes,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
    shape: str,
) -> None:
    """Celery's soft limit is a signal: it can land inside the runner's progress write or cancel check.

    Those two swallow their own failures (progress is advisory), so the limit used to be logged as a
    failed write and the job ran on to the hard limit, which kills the child and leaves the job to the
    reconciler. Here the signal is made to land in the first progress write during the capture (or
    the first cancel check), in this process: as itself, or turned into the database driver's error
    with the limit as its context (which CI once caught slipping through as a failed write).
    """
    dataset_id = upload_dataset(settings, corpus_bytes)
    job_id = submit_job(settings, job_request(str(fault_model_root / "tiny-llama"), dataset_id, seed=4500))
    fired: list[str] = []
    if where == "progress write":
        real = lifecycle.set_progress

        def set_progress(session: Any, job: uuid.UUID, attempt: int, stage: str, progress: float) -> bool:
            if stage == "capture" and not fired:
                fired.append(stage)
                _time_limit(shape)
            return real(session, job, attempt, stage, progress)

        monkeypatch.setattr(lifecycle, "set_progress", set_progress)
    else:
        real_state = lifecycle.run_state
        monkeypatch.setattr(runner, "CANCEL_CHECK_INTERVAL_S", 0.0)

        def run_state(session: Any, job: uuid.UUID, attempt: int) -> Any:
            if not fired:  # the first check, once the job runs
                fired.append("cancel check")
                _time_limit(shape)
            return real_state(session, job, attempt)

        monkeypatch.setattr(lifecycle, "run_state", run_state)
    assert runner.run_job(job_id, settings, worker="in-process") == "failed"
    job = load_job(settings, job_id)
    assert fired and job.error_code == "time_limit_exceeded", (job.status, job.error_code)
    check_nothing_published(settings, job_id)


def test_a_time_limit_the_model_load_wraps_is_still_the_time_limit(
    settings: Settings, fault_model_root: Path, corpus_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine reports any failure to read a checkpoint as the model's (``model_load_failed``, on the
    field ``model.id``). The limit landing while the model loads must not read as "your model cannot
    be loaded": the runner looks through the engine's error to the limit it wraps."""
    dataset_id = upload_dataset(settings, corpus_bytes)
    job_id = submit_job(settings, job_request(str(fault_model_root / "tiny-llama"), dataset_id, seed=4510))

    def tokenizer(*_: Any) -> Any:
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(loading, "_tokenizer", tokenizer)
    assert runner.run_job(job_id, settings, worker="in-process") == "failed"
    job = load_job(settings, job_id)
    assert job.error_code == "time_limit_exceeded", (job.error_code, job.error_message)
    assert "LORP_JOB_TIME_LIMIT_S" in (job.error_message or "")


def test_a_time_limit_something_swallowed_ends_the_job_at_its_next_checkpoint(
    settings: Settings, fault_model_root: Path, corpus_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Code that catches ``Exception`` can swallow the limit outright (here: where the model's tokenizer
    is read, as a library's fallback would). The signal is real, delivered to this process with the
    handler a pool child has (billiard's, which raises the limit) and watched as the Celery task
    watches it: the job fails with ``time_limit_exceeded`` at the engine's next checkpoint, instead of
    running on (to the hard limit, in a worker)."""
    dataset_id = upload_dataset(settings, corpus_bytes)
    job_id = submit_job(settings, job_request(str(fault_model_root / "tiny-llama"), dataset_id, seed=4520))
    real = loading._tokenizer
    swallowed: list[BaseException] = []

    def tokenizer(*args: Any) -> Any:
        try:
            signal.raise_signal(soft_limit.SIGNAL)
        except Exception as exc:  # the swallowing this test is about
            swallowed.append(exc)
        return real(*args)

    monkeypatch.setattr(loading, "_tokenizer", tokenizer)
    previous = signal.signal(soft_limit.SIGNAL, soft_timeout_sighandler)
    try:
        with soft_limit.watching() as limit:
            outcome = runner.run_job(job_id, settings, worker="in-process", soft_limit=limit)
    finally:
        signal.signal(soft_limit.SIGNAL, previous)
    assert [type(e) for e in swallowed] == [SoftTimeLimitExceeded] and limit.fired
    job = load_job(settings, job_id)
    assert outcome == "failed" and job.error_code == "time_limit_exceeded", (outcome, job.error_code)
    assert job.stage != "reporting", job.stage
    check_nothing_published(settings, job_id)


def _vm_size(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmSize for {pid}")


OOM_HEADROOM = 1536 << 20


def test_out_of_memory_fails_the_job_and_the_worker_runs_the_next(
    tmp_path: Path,
    pg_url: str,
    reliability_redis_url: str,
    s3_server: str,
    fault_model_root: Path,
    tiny_tokenizer: Any,
    corpus_bytes: bytes,
) -> None:
    # 4 blocks with a 131,072-wide MLP: 200 MB of weights, but 16 windows of 256 tokens need 2 GiB for
    # each MLP activation, more than the address space left to the pool child.
    save_llama(fault_model_root, "wide-llama", tiny_tokenizer, num_hidden_layers=4, intermediate_size=131072)
    settings = stack_settings(tmp_path, pg_url, reliability_redis_url, s3_server, fault_model_root)
    dataset_id = upload_dataset(settings, corpus_bytes)
    with fleet_of(settings, tmp_path) as fleet:
        worker = fleet.start_worker("w1")
        wait_for(lambda: len(worker.pool_children()) == 1, 30, "the pool child")
        (child,) = worker.pool_children()
        base = _vm_size(child)
        # A real allocation failure: the child that will run the job gets an address-space limit (what a
        # container memory limit or an exhausted GPU does to an allocation); its parent keeps none.
        _, hard = resource.prlimit(child, resource.RLIMIT_AS)
        resource.prlimit(child, resource.RLIMIT_AS, (base + OOM_HEADROOM, hard))
        big = submit_job(
            settings,
            job_request(
                str(fault_model_root / "wide-llama"),
                dataset_id,
                num_layers=1,
                num_samples=16,
                seq_len=256,
                batch_size=16,
                seed=5000,
            ),
        )
        wait_for(lambda: load_job(settings, big).status.terminal, 120, "the out-of-memory job", 0.1)
        job = load_job(settings, big)
        assert job.status == JobStatus.failed, (job.status, fleet.logs())
        assert job.error_code == "out_of_memory", (job.error_code, job.error_message)
        assert "batch_size" in (job.error_message or "")
        check_nothing_published(settings, big)
        oom_stage = job.stage

        wait_for(lambda: worker.pool_children() not in ([], [child]), 30, "a fresh pool child")
        nxt = submit_job(settings, job_request(str(fault_model_root / "tiny-llama"), dataset_id, seed=5001))
        wait_for(lambda: load_job(settings, nxt).status.terminal, 120, "the next job", 0.1)
        check_one_artifact_set(settings, nxt)
        assert load_job(settings, nxt).worker == job.worker and worker.alive
    record(
        suite="faults",
        scenario="job runs out of memory",
        runs=1,
        outcomes={"failed_out_of_memory": 1, "next_job_succeeded_on_same_worker": 1, "artifact_rows": 0},
        data_lost=0,
        command=COMMAND.format("out_of_memory"),
        notes=(
            "The pool child about to run the job got RLIMIT_AS = its size + 1.5 GiB (prlimit); the job's capture "
            "then needed 2 GiB per activation and torch's allocator failed for real; the runner recorded "
            "out_of_memory with advice (batch_size, seq_len, dtype), the child was replaced and the same worker "
            "ran the next job to success."
        ),
        figures={
            "child_address_space_mib": round(base / 2**20),
            "limit_mib": round((base + OOM_HEADROOM) / 2**20),
            "stage_when_failed": oom_stage,
            "error_message": job.error_message,
        },
    )


# -- 6. cancel racing completion ---------------------------------------------------------------------

CANCEL_RUNS = (8 if full_size() else 2) * RUNS


def test_cancel_racing_completion_is_consistent(
    settings: Settings, fault_model_root: Path, corpus_bytes: bytes, tmp_path: Path
) -> None:
    dataset_id = upload_dataset(settings, corpus_bytes)
    model = str(fault_model_root / "tiny-llama")
    rng = random.Random(6)
    outcomes: dict[str, int] = {"cancelled": 0, "succeeded": 0}
    cancel_stages: list[str] = []
    cleanup_lag: list[float] = []
    api_answers: dict[int, int] = {}
    with fleet_of(settings, tmp_path) as fleet, TestClient(create_app(settings)) as client:
        fleet.start_worker("w1")
        # One undisturbed run measures how long such a job takes from its claim.
        probe = submit_job(settings, job_request(model, dataset_id, seed=6000, perplexity=False))
        wait_for(lambda: load_job(settings, probe).status.terminal, 120, "the probe job", 0.05)
        probe_job = load_job(settings, probe)
        check_one_artifact_set(settings, probe)
        duration = (probe_job.finished_at - probe_job.started_at).total_seconds()  # type: ignore[operator]

        for n in range(CANCEL_RUNS):
            job_id = submit_job(settings, job_request(model, dataset_id, seed=6001 + n, perplexity=False))
            wait_for(lambda j=job_id: load_job(settings, j).status != JobStatus.queued, 60, "the claim", 0.01)
            # Somewhere in the last third of the job, or just after it ended.
            time.sleep(rng.uniform(0.65, 1.05) * duration)
            before = load_job(settings, job_id)
            answer = client.post(f"/v1/jobs/{job_id}/cancel")
            api_answers[answer.status_code] = api_answers.get(answer.status_code, 0) + 1
            cancel_stages.append(before.stage if before.status == JobStatus.running else before.status.value)
            wait_for(lambda j=job_id: load_job(settings, j).status.terminal, 60, "the job to end", 0.05)
            job = load_job(settings, job_id)
            listed = client.get(f"/v1/jobs/{job_id}/artifacts").json()
            if job.status == JobStatus.succeeded:
                sizes = check_one_artifact_set(settings, job_id)
                assert len(listed) == sizes["artifacts"]
                assert answer.status_code == 409, answer.text  # too late: the job had finished
            else:
                assert job.status == JobStatus.cancelled, (job.status, job.error_code, job.error_message)
                assert answer.status_code in (200, 202), answer.text
                assert listed == []
                assert job_rows(settings, Artifact, job_id) == [] and job_rows(settings, Plan, job_id) == []
                assert job_rows(settings, Metric, job_id) == []
                # The row turns cancelled first; the worker then removes what it uploaded.
                ended = time.monotonic()
                wait_for(lambda j=job_id: stored_keys(settings, j) == [], 30, "the uploads to be removed", 0.05)
                cleanup_lag.append(round(time.monotonic() - ended, 2))
            outcomes[job.status.value] += 1
    record(
        suite="faults",
        scenario="cancel racing completion",
        runs=CANCEL_RUNS,
        outcomes={**outcomes, "inconsistent": 0},
        data_lost=0,
        command=COMMAND.format("cancel_racing"),
        notes=(
            "POST /v1/jobs/{id}/cancel at a random moment between 65% and 105% of a short job's duration "
            "(measured by an undisturbed run); every job ended either cancelled with no artifact rows, plans "
            "or metrics and no objects under jobs/{id}/, or succeeded with its full artifact set and a 409 "
            "for the late cancel. Never both."
        ),
        figures={
            "job_duration_s": round(duration, 2),
            "state_when_cancel_sent": cancel_stages,
            "api_status_codes": api_answers,
            "cancelled_objects_removed_within_s": cleanup_lag,
        },
    )
