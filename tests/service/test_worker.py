"""The worker against real servers: Postgres, Redis, a Celery worker process and S3 (moto) on loopback.

A tiny Llama saved with ``save_pretrained`` under a model root and a small uploaded calibration text
keep each job to seconds on a CPU. Jobs are inserted as rows (the HTTP API is tested elsewhere) and
run either by a real ``celery worker`` subprocess or by calling the runner in this process.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import random
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
import torch
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError
from tiny import save_tiny_llama
from transformers import AutoModelForCausalLM, BloomConfig, BloomForCausalLM

from app.core.config import Settings
from app.db.models import Analysis, Artifact, Job, JobEvent, JobStatus, Metric, Plan, TaskMetric
from app.db.session import session_factory, session_scope
from app.queue import enqueue_job
from app.repositories import lifecycle
from app.storage import Storage, artifact_store, storage_from_url
from lorp.divergence import DIVERGENCE_METRICS
from lorp.result import METRICS
from worker import failures, outputs, retries, runner, service_cli

from .helpers import create_job, job_request, upload_dataset
from .moto_server import ACCESS_KEY, REGION, SECRET_KEY, create_bucket

REPO = Path(__file__).resolve().parents[2]
NUM_LAYERS = 6
WORDS = [
    *("the", "model", "block", "layer", "state", "token", "depth", "phase", "cluster", "prune", "remove"),
    *("keep", "similar", "distant", "early", "late", "middle", "signal", "noise", "river", "mountain"),
    *("city", "history", "music", "science", "language"),
]


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_root(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> Path:
    """A model root holding a tiny Llama (supported) and a tiny Bloom (an unknown architecture)."""
    root = tmp_path_factory.mktemp("models")
    save_tiny_llama(root, "tiny-llama", tiny_tokenizer, num_hidden_layers=NUM_LAYERS, max_position_embeddings=256)
    bloom = BloomConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, n_layer=4, n_head=4)
    BloomForCausalLM(bloom).save_pretrained(root / "tiny-bloom")
    tiny_tokenizer.save_pretrained(root / "tiny-bloom")
    return root


@pytest.fixture(scope="module")
def corpus_bytes() -> bytes:
    rng = random.Random(0)
    return " ".join(rng.choice(WORDS) for _ in range(8000)).encode()


def make_settings(tmp_path: Path, pg_url: str, redis_url: str, model_root: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "database_url": pg_url,
        "broker_url": redis_url,
        "storage_url": (tmp_path / "artifacts").as_uri(),
        "model_roots": [model_root],
        "heartbeat_interval_s": 0.5,
        "progress_min_interval_s": 0.0,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture()
def local_settings(tmp_path: Path, pg_url: str, redis_url: str, model_root: Path) -> Settings:
    """Postgres and Redis, artifacts in a local folder: for jobs run by the runner in this process."""
    return make_settings(tmp_path, pg_url, redis_url, model_root)


@pytest.fixture()
def s3_settings(tmp_path: Path, pg_url: str, redis_url: str, model_root: Path, s3_server: str) -> Settings:
    """The full stack: artifacts in a fresh bucket on the moto server."""
    bucket = f"lorp-{uuid.uuid4().hex[:12]}"
    create_bucket(s3_server, bucket)
    return make_settings(
        tmp_path,
        pg_url,
        redis_url,
        model_root,
        storage_url=f"s3://{bucket}/artifacts",
        model_s3_prefixes=[f"s3://{bucket}/models/"],
        # Its own queue: test runs sharing this Redis must not take each other's messages.
        queue_name=f"gpu-test-{uuid.uuid4().hex[:8]}",
        s3_endpoint_url=s3_server,
        s3_region=REGION,
        s3_access_key=ACCESS_KEY,
        s3_secret_key=SECRET_KEY,
    )


# -- helpers ----------------------------------------------------------------------------------------


def storage_of(settings: Settings) -> Storage:
    return artifact_store(settings)


def load_job(settings: Settings, job_id: uuid.UUID) -> Job:
    with session_scope(session_factory(settings.sqlalchemy_url)) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def rows(settings: Settings, model: Any, job_id: uuid.UUID) -> list[Any]:
    with session_scope(session_factory(settings.sqlalchemy_url)) as session:
        return list(session.scalars(select(model).where(model.job_id == job_id)))


def stage_events(settings: Settings, job_id: uuid.UUID) -> list[str]:
    events = rows(settings, JobEvent, job_id)
    return [e.stage for e in sorted(events, key=lambda e: e.at) if e.kind == "stage"]


def wait_for(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# -- 1. end to end with a real Celery worker --------------------------------------------------------


@dataclass
class WorkerProcess:
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture()
def celery_worker(s3_settings: Settings, tmp_path: Path) -> Iterator[WorkerProcess]:
    """``celery -A worker.tasks worker -Q gpu --pool prefork --concurrency 1`` as a subprocess."""
    log_path = tmp_path / "worker.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORP_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    with log_path.open("wb") as log:
        proc = service_cli.start_worker(
            s3_settings, concurrency=1, loglevel="info", env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT
        )
    worker = WorkerProcess(proc, log_path)
    try:
        wait_for(lambda: " ready." in worker.log() or proc.poll() is not None, 60, "the worker to start", 0.2)
        assert proc.poll() is None, "the celery worker exited at start"
        yield worker
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        print("---- worker log (tail) ----\n" + log_path.read_text(errors="replace")[-6000:])


def test_end_to_end_with_celery_worker_redis_postgres_and_s3(
    s3_settings: Settings, celery_worker: WorkerProcess, corpus_bytes: bytes, model_root: Path
) -> None:
    settings = s3_settings
    dataset_id = upload_dataset(settings, corpus_bytes)
    request = job_request(
        str(model_root / "tiny-llama"), dataset_id, num_layers=2, speed=True, tasks=[{"name": "lorp_cloze", "limit": 4}]
    )
    job_id = create_job(settings, request)
    enqueue_job(job_id, settings)

    samples: list[tuple[str, str | None, float]] = []

    def finished() -> bool:
        assert celery_worker.proc.poll() is None, "the celery worker exited"
        job = load_job(settings, job_id)
        samples.append((job.status.value, job.stage, job.progress))
        return job.status.terminal

    wait_for(finished, timeout=150, what="the job to finish", interval=0.05)
    job = load_job(settings, job_id)
    assert job.status == JobStatus.succeeded, (job.error_code, job.error_message)
    # A second delivery of the same job finds nothing to claim.
    enqueue_job(job_id, settings)
    wait_for(lambda: f"job {job_id} is not queued" in celery_worker.log(), 60, "the duplicate delivery", interval=0.2)
    job = load_job(settings, job_id)
    assert job.attempts == 1
    assert job.progress == 1.0 and job.finished_at is not None and job.worker
    assert job.stage == "done"  # not the last step it ran ("uploading")

    # Progress rose while running and stages changed.
    running = [(stage, progress) for status, stage, progress in samples if status == "running"]
    assert running, "never observed the job running"
    progresses = [p for _, p in running]
    assert progresses == sorted(progresses)
    assert len(set(progresses)) >= 2 and 0.0 < max(progresses) <= 1.0
    stages = stage_events(settings, job_id)
    for stage in ("loading", "calibration", "capture", "selection", "saving", "reporting", "uploading"):
        assert stage in stages
    assert stages.index("loading") < stages.index("capture") < stages.index("reporting")

    # Analysis, plans, metrics in Postgres.
    with session_scope(session_factory(settings.sqlalchemy_url)) as session:
        analysis = session.get(Analysis, job.analysis_id)
        assert analysis is not None
        assert len(analysis.similarity) == NUM_LAYERS + 1 and len(analysis.similarity[0]) == NUM_LAYERS + 1
        assert len(analysis.angular_distance) == NUM_LAYERS + 1
        assert analysis.num_blocks == NUM_LAYERS and analysis.seq_len == 32 and analysis.num_samples == 8
        assert abs(analysis.similarity[0][0] - 1.0) < 1e-6
    plans = rows(settings, Plan, job_id)
    assert {"lorp", "shortgpt", "angular"} <= {p.name for p in plans}
    chosen = [p for p in plans if p.chosen]
    assert len(chosen) == 1 and chosen[0].name == job.chosen_method
    assert chosen[0].pruned_layers == job.pruned_layers and len(job.pruned_layers or []) == 2
    # auto measures its finalists in full (the chosen one among them); the others were screened.
    assert chosen[0].validation_perplexity is not None
    assert chosen[0].validation_perplexity == min(p.validation_perplexity for p in plans if p.validation_perplexity)
    metrics = {(m.name, m.phase): m for m in rows(settings, Metric, job_id)}
    assert metrics[("num_layers", "dense")].value == NUM_LAYERS
    assert metrics[("num_layers", "pruned")].value == NUM_LAYERS - 2
    assert metrics[("perplexity", "pruned")].unit == ""
    assert metrics[("decode_tokens_per_s", "dense")].unit == "tok/s"
    assert metrics[("weights_bytes", "pruned")].unit == "B"
    # Every measurement lorp.result.METRICS names is stored, in its unit (peak memory: on CUDA only).
    dense = {name: m.unit for (name, phase), m in metrics.items() if phase == "dense"}
    measured = {name: kind.unit for name, kind in METRICS.items() if name != "peak_memory_bytes"}
    assert dense == {name: unit for name, unit in measured.items() if name not in DIVERGENCE_METRICS}
    pruned = {name: m.unit for (name, phase), m in metrics.items() if phase == "pruned"}
    assert pruned == measured  # the divergence from the dense predictions is the pruned model's
    assert metrics[("kl_mean", "pruned")].unit == "nats" and metrics[("kl_mean", "pruned")].value > 0
    assert 0 < metrics[("top1_agreement", "pruned")].value <= 1
    assert metrics[("speedup_bound", "ratio")].value == pytest.approx(1.5)
    assert job.summary is not None and job.summary["chosen"]["pruned_layers"] == job.pruned_layers
    # lm-eval's scores, dense and pruned, and the completions side by side
    tasks = {(t.task, t.metric, t.phase): t for t in rows(settings, TaskMetric, job_id)}
    assert set(tasks) == {("lorp_cloze", m, p) for m in ("acc", "acc_norm") for p in ("dense", "pruned")}
    assert all(t.num_samples == 4 and t.value is not None and 0 <= t.value <= 1 for t in tasks.values())
    table = {(t["task"], t["metric"]): t for t in job.summary["tasks"]}
    assert table[("lorp_cloze", "acc")]["pruned"] == tasks[("lorp_cloze", "acc", "pruned")].value
    assert len(job.summary["generations"]) == 3 and all(g["dense"] for g in job.summary["generations"])

    # Every artifact is in S3 with its recorded sha256; the pruned model loads with N-n layers.
    artifacts = rows(settings, Artifact, job_id)
    names = {a.name for a in artifacts}
    assert {"report.json", "analysis.npz", "heatmap.png", "model/config.json", "model/model.safetensors"} <= names
    bucket, _, prefix = settings.artifact_storage_url.removeprefix("s3://").partition("/")
    s3 = boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
    )
    download = Path(settings.data_dir) / "download"
    for artifact in artifacts:
        assert artifact.storage_key == f"jobs/{job_id}/{artifact.name}"
        body = s3.get_object(Bucket=bucket, Key=f"{prefix}/{artifact.storage_key}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == artifact.sha256
        assert len(body) == artifact.size_bytes
        target = download / artifact.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(body)
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/jobs/{job_id}/")
    assert listed["KeyCount"] == len(artifacts)
    pruned = AutoModelForCausalLM.from_pretrained(download / "model")
    assert pruned.config.num_hidden_layers == NUM_LAYERS - 2
    assert len(pruned.model.layers) == NUM_LAYERS - 2


# -- 2. a job runs once even when delivered twice ---------------------------------------------------


def test_claim_is_atomic_under_concurrent_deliveries(local_settings: Settings, model_root: Path) -> None:
    settings = local_settings
    job_id = create_job(settings, job_request(str(model_root / "tiny-llama"), "builtin"))
    factory = session_factory(settings.sqlalchemy_url)
    barrier = threading.Barrier(4)
    claimed: list[bool] = []

    def deliver(n: int) -> None:
        barrier.wait()
        with session_scope(factory) as session:
            claimed.append(lifecycle.claim(session, job_id, f"worker-{n}") is not None)

    threads = [threading.Thread(target=deliver, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(claimed) == [False, False, False, True]
    job = load_job(settings, job_id)
    assert job.status == JobStatus.running and job.attempts == 1
    # The runner given an already claimed job does nothing.
    assert runner.run_job(job_id, settings, worker="late-delivery") == "skipped"
    assert load_job(settings, job_id).attempts == 1


def test_runner_twice_runs_once(local_settings: Settings, model_root: Path, corpus_bytes: bytes) -> None:
    settings = local_settings
    dataset_id = upload_dataset(settings, corpus_bytes)
    job_id = create_job(settings, job_request(str(model_root / "tiny-llama"), dataset_id, method="lorp"))
    assert runner.run_job(job_id, settings) == "succeeded"
    assert runner.run_job(job_id, settings) == "skipped"
    job = load_job(settings, job_id)
    assert job.status == JobStatus.succeeded and job.attempts == 1
    assert job.chosen_method == "lorp"
    artifacts = rows(settings, Artifact, job_id)
    assert sorted(storage_of(settings).list(f"jobs/{job_id}")) == sorted(a.storage_key for a in artifacts)
    assert not (settings.work_dir / str(job_id)).exists(), "the work folder must be removed"


def test_heartbeat_after_publish_is_quiet(
    tmp_path: Path,
    pg_url: str,
    redis_url: str,
    model_root: Path,
    corpus_bytes: bytes,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A beat that lands after the job's own final write is expected, not a lost job."""
    settings = make_settings(tmp_path, pg_url, redis_url, model_root, heartbeat_interval_s=0.005)
    publish = runner._JobRun.publish

    def publish_then_linger(self: Any, *args: Any, **kwargs: Any) -> bool:
        done = publish(self, *args, **kwargs)
        time.sleep(0.3)  # the heartbeat beats many times against the finished job meanwhile
        return done

    monkeypatch.setattr(runner._JobRun, "publish", publish_then_linger)
    dataset_id = upload_dataset(settings, corpus_bytes)
    job_id = create_job(settings, job_request(str(model_root / "tiny-llama"), dataset_id, method="shortgpt"))
    with caplog.at_level(logging.WARNING, logger=runner.__name__):
        assert runner.run_job(job_id, settings) == "succeeded"
    assert not [r for r in caplog.records if "no longer attempt" in r.getMessage()]
    assert load_job(settings, job_id).status == JobStatus.succeeded


def test_database_outage_mid_job_leaves_it_for_the_reconciler(
    local_settings: Settings, model_root: Path, corpus_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database away for longer than the job waits (``LORP_OUTAGE_WAIT_S``) is no reason to fail the job
    for good: it stays running, unrecorded, for the reconciler to take back."""
    settings = local_settings.model_copy(update={"outage_wait_s": 1.0})
    monkeypatch.setattr(retries, "BACKOFF_S", 0.1)
    dataset_id = upload_dataset(settings, corpus_bytes)
    job_id = create_job(settings, job_request(str(model_root / "tiny-llama"), dataset_id, method="lorp"))
    tries: list[float] = []

    def database_down(*_args: Any, **_kwargs: Any) -> None:
        tries.append(time.monotonic())
        raise OperationalError("SELECT 1", {}, Exception("connection refused"))

    monkeypatch.setattr(runner.analyses_repo, "by_fingerprint", database_down)
    assert runner.run_job(job_id, settings) == "lost"
    assert len(tries) >= 3 and tries[-1] - tries[0] >= 1.0 - 0.05, tries  # waited for it, then gave up
    job = load_job(settings, job_id)
    assert job.status == JobStatus.running and job.attempts == 1
    assert job.error_code is None and job.error_message is None
    assert rows(settings, Artifact, job_id) == []
    assert not (settings.work_dir / str(job_id)).exists()


def test_queued_job_cancelled_before_start_never_runs(local_settings: Settings, model_root: Path) -> None:
    settings = local_settings
    job_id = create_job(settings, job_request(str(model_root / "tiny-llama"), "builtin"))
    with session_scope(session_factory(settings.sqlalchemy_url)) as session:
        session.execute(update(Job).where(Job.id == job_id).values(cancel_requested_at=dt.datetime.now(dt.UTC)))
    assert runner.run_job(job_id, settings) == "cancelled"
    job = load_job(settings, job_id)
    assert job.status == JobStatus.cancelled and job.attempts == 0 and job.started_at is None


# -- 3. cancelling a running job --------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["capture", "distilling"])
def test_cancel_running_job_leaves_no_artifacts(
    local_settings: Settings, model_root: Path, corpus_bytes: bytes, stage: str
) -> None:
    settings = local_settings
    dataset_id = upload_dataset(settings, corpus_bytes)
    if stage == "capture":  # many samples one at a time: the capture takes far longer than the cancel check interval
        request = job_request(str(model_root / "tiny-llama"), dataset_id, num_samples=256, batch_size=1, seed=3)
    else:  # a distillation of far more steps than the cancel check interval lets run
        options = {"heal": "distill", "heal_steps": 10_000}
        request = job_request(str(model_root / "tiny-llama"), dataset_id, num_samples=16, seed=3, options=options)
    job_id = create_job(settings, request)
    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(runner.run_job(job_id, settings)))
    thread.start()
    try:
        wait_for(lambda: load_job(settings, job_id).stage == stage, timeout=60, what=f"the {stage} stage")
        with session_scope(session_factory(settings.sqlalchemy_url)) as session:
            session.execute(update(Job).where(Job.id == job_id).values(cancel_requested_at=dt.datetime.now(dt.UTC)))
        cancelled_at = time.monotonic()
    finally:
        thread.join(timeout=120)
    assert not thread.is_alive()
    assert time.monotonic() - cancelled_at < 30, "the cancel took effect too late"
    assert outcome == ["cancelled"]
    job = load_job(settings, job_id)
    assert job.status == JobStatus.cancelled and job.finished_at is not None
    # Cancel checks are throttled to one read a second, so the job may enter the next stage, not finish it.
    assert "saving" not in stage_events(settings, job_id), "the job went on after the cancel"
    assert rows(settings, Artifact, job_id) == [] and rows(settings, Plan, job_id) == []
    assert storage_of(settings).list(f"jobs/{job_id}") == []
    assert not (settings.work_dir / str(job_id)).exists()


def test_attempt_that_lost_its_job_stops_without_touching_it(
    local_settings: Settings, model_root: Path, corpus_bytes: bytes
) -> None:
    settings = local_settings
    dataset_id = upload_dataset(settings, corpus_bytes)
    request = job_request(str(model_root / "tiny-llama"), dataset_id, num_samples=128, batch_size=1, seed=4)
    job_id = create_job(settings, request)
    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(runner.run_job(job_id, settings)))
    thread.start()
    try:
        wait_for(lambda: load_job(settings, job_id).stage == "capture", timeout=60, what="the capture stage")
        # What the reconciler does when it believes the worker is dead: the job goes back to the queue.
        with session_scope(session_factory(settings.sqlalchemy_url)) as session:
            session.execute(
                update(Job).where(Job.id == job_id).values(status=JobStatus.queued, stage=None, worker=None)
            )
    finally:
        thread.join(timeout=120)
    assert outcome == ["lost"]
    job = load_job(settings, job_id)
    assert job.status == JobStatus.queued and job.stage is None and job.error_code is None
    assert rows(settings, Artifact, job_id) == []


# -- 4. failures with a code and a message a person can act on --------------------------------------


def test_unknown_architecture_fails_with_its_name(local_settings: Settings, model_root: Path) -> None:
    settings = local_settings
    job_id = create_job(settings, job_request(str(model_root / "tiny-bloom"), "builtin", num_layers=1))
    assert runner.run_job(job_id, settings) == "failed"
    job = load_job(settings, job_id)
    assert job.status == JobStatus.failed
    assert job.error_code == "unsupported_architecture"
    assert "bloom" in (job.error_message or "").lower()
    assert rows(settings, Artifact, job_id) == []
    assert storage_of(settings).list(f"jobs/{job_id}") == []


def test_budget_too_large_fails_before_capture(
    local_settings: Settings, model_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The API refuses this at submission when it can read the model's depth; a row inserted directly
    # stands for a model it could not (the worker is the last line).
    settings = local_settings
    job_id = create_job(settings, job_request(str(model_root / "tiny-llama"), "builtin", num_layers=NUM_LAYERS))
    with caplog.at_level(logging.WARNING, logger="worker.runner"):
        assert runner.run_job(job_id, settings) == "failed"
    job = load_job(settings, job_id)
    assert job.error_code == "invalid_budget", job.error_message
    assert job.error_message
    assert "capture" not in stage_events(settings, job_id)
    # An expected failure is one log line with the code and message, not a traceback.
    failed = [r for r in caplog.records if r.name == "worker.runner" and str(job_id) in r.getMessage()]
    assert len(failed) == 1 and "invalid_budget" in failed[0].getMessage()
    assert failed[0].exc_info is None and "Traceback" not in caplog.text


def test_model_outside_the_roots_is_an_invalid_request(local_settings: Settings, tmp_path: Path) -> None:
    settings = local_settings
    job_id = create_job(settings, job_request(str(tmp_path / "elsewhere"), "builtin"))
    assert runner.run_job(job_id, settings) == "failed"
    job = load_job(settings, job_id)
    assert job.error_code == "invalid_request"
    assert "model roots" in (job.error_message or "")


def test_missing_uploaded_dataset_is_an_invalid_request(local_settings: Settings, model_root: Path) -> None:
    settings = local_settings
    job_id = create_job(settings, job_request(str(model_root / "tiny-llama"), uuid.uuid4()))
    assert runner.run_job(job_id, settings) == "failed"
    job = load_job(settings, job_id)
    assert job.error_code == "invalid_request"
    assert "does not exist" in (job.error_message or "")


def _database_away() -> OperationalError:
    return OperationalError("UPDATE jobs SET ...", None, Exception("server closed the connection unexpectedly"))


@pytest.mark.parametrize("ending", ["succeeded", "failed"])
def test_a_database_away_at_the_job_s_last_write_is_waited_for(
    local_settings: Settings, model_root: Path, monkeypatch: pytest.MonkeyPatch, ending: str
) -> None:
    """The write that ends the job (its publication, or the record of its failure) meets the database
    away, twice, then back: the attempt waits for it (``LORP_OUTAGE_WAIT_S``) and ends as it would have,
    in its first attempt. It used to leave the job running for the reconciler to run it all again."""
    settings = local_settings
    monkeypatch.setattr(retries, "BACKOFF_S", 0.05)
    model = "tiny-llama" if ending == "succeeded" else "tiny-bloom"  # no block layout known: it fails
    job_id = create_job(settings, job_request(str(model_root / model), "builtin", num_layers=1, method="shortgpt"))
    write = "finish_succeeded" if ending == "succeeded" else "finish_failed"
    real = getattr(lifecycle, write)
    refused: list[str] = []

    def away_twice(*args: Any, **kwargs: Any) -> bool:
        if len(refused) < 2:
            refused.append(write)
            raise _database_away()
        return bool(real(*args, **kwargs))

    monkeypatch.setattr(lifecycle, write, away_twice)
    outcome = runner.run_job(job_id, settings)
    job = load_job(settings, job_id)
    assert refused == [write, write] and outcome == ending, (outcome, job.status, job.error_code)
    assert job.status == JobStatus(ending) and job.attempts == 1
    if ending == "succeeded":
        assert rows(settings, Artifact, job_id), "published without its artifacts"
    else:
        assert job.error_code == "unsupported_architecture"


def test_a_publication_that_committed_as_the_database_went_away_is_not_lost(
    local_settings: Settings, model_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The publication commits, then its answer is lost with the connection: the try that waits the
    outage out finds the job already succeeded under this attempt, and says so (it used to report the
    attempt lost, "its result is discarded", about a job it had published)."""
    settings = local_settings
    monkeypatch.setattr(retries, "BACKOFF_S", 0.05)
    job_id = create_job(
        settings, job_request(str(model_root / "tiny-llama"), "builtin", num_layers=1, method="shortgpt")
    )
    real = outputs.publish
    tries: list[bool] = []

    def committed_then_away(*args: Any, **kwargs: Any) -> bool:
        tries.append(bool(real(*args, **kwargs)))
        if len(tries) == 1:
            raise _database_away()
        return tries[-1]

    monkeypatch.setattr(outputs, "publish", committed_then_away)
    assert runner.run_job(job_id, settings) == "succeeded"
    job = load_job(settings, job_id)
    assert tries == [True, False] and job.status == JobStatus.succeeded and job.attempts == 1
    assert rows(settings, Artifact, job_id), "its artifacts were removed"


def test_failure_classification() -> None:
    settings = Settings()
    code, message = failures.classify_failure(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried 2 GiB"), settings)
    assert code == "out_of_memory" and "batch_size" in message and "GPU" in message
    assert failures.classify_failure(MemoryError(), settings)[0] == "out_of_memory"
    code, message = failures.classify_failure(KeyError("boom"), settings)
    assert code == "internal_error" and "KeyError" in message


# -- 5. analysis reuse ------------------------------------------------------------------------------


def test_second_job_reuses_the_stored_analysis(local_settings: Settings, model_root: Path, corpus_bytes: bytes) -> None:
    settings = local_settings
    dataset_id = upload_dataset(settings, corpus_bytes)
    # A seed no other test uses: the first job's fingerprint is new to this database.
    first = create_job(settings, job_request(str(model_root / "tiny-llama"), dataset_id, seed=7, method="shortgpt"))
    assert runner.run_job(first, settings) == "succeeded"
    # Ranked by KL, which the stored analysis does not depend on.
    by_kl = {"selection_metric": "kl"}
    second = create_job(
        settings, job_request(str(model_root / "tiny-llama"), dataset_id, seed=7, num_layers=1, options=by_kl)
    )
    assert runner.run_job(second, settings) == "succeeded"
    job1, job2 = load_job(settings, first), load_job(settings, second)
    assert job1.analysis_reused is False and job2.analysis_reused is True
    assert job1.analysis_id is not None and job2.analysis_id == job1.analysis_id
    assert "capture" in stage_events(settings, first)
    assert "capture" not in stage_events(settings, second)
    assert job2.summary is not None and job2.summary["analysis_reused"] is True
    assert len(job2.pruned_layers or []) == 1
    # The summary keeps each measured plan's validation KL (the first job, ranked by perplexity, has none).
    assert job1.summary is not None and all(p["validation_kl"] is None for p in job1.summary["plans"].values())
    kl = {name: p["validation_kl"] for name, p in job2.summary["plans"].items() if p["validation_kl"] is not None}
    assert kl and kl[job2.chosen_method] == min(kl.values()) > 0


# -- s3:// model references -------------------------------------------------------------------------


def test_model_from_an_allowed_s3_folder(s3_settings: Settings, model_root: Path, corpus_bytes: bytes) -> None:
    settings = s3_settings
    bucket = settings.artifact_storage_url.removeprefix("s3://").split("/", 1)[0]
    models = storage_from_url(f"s3://{bucket}/models/tiny-llama", **settings.s3_options())
    for path in sorted((model_root / "tiny-llama").iterdir()):
        models.put_file(path.name, path)
    dataset_id = upload_dataset(settings, corpus_bytes)
    job_id = create_job(settings, job_request(f"s3://{bucket}/models/tiny-llama/", dataset_id, method="lorp"))
    assert runner.run_job(job_id, settings) == "succeeded", load_job(settings, job_id).error_message
    assert len(load_job(settings, job_id).pruned_layers or []) == 2
    assert storage_of(settings).exists(f"jobs/{job_id}/model/model.safetensors")

    empty = create_job(settings, job_request(f"s3://{bucket}/models/nothing-here", dataset_id, method="lorp"))
    assert runner.run_job(empty, settings) == "failed"
    assert load_job(settings, empty).error_code == "model_load_failed"
