"""Runs one job on this worker: claim, resolve references, run the engine, upload, publish or fail.

The Celery task is a thin wrapper around `run_job`. The job row in the database is the only truth:
the claim is a conditional UPDATE (a duplicate delivery finds nothing to claim), every later write
is fenced by the claimed attempt number (a worker whose job was requeued after a missed heartbeat
cannot overwrite the new attempt), and outputs go under keys derived from the job id so a retry
overwrites rather than duplicates. The engine (torch, transformers) is imported only when a job runs.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from celery.exceptions import SoftTimeLimitExceeded
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings
from app.db.models import EventKind, JobStatus
from app.db.session import session_factory, session_scope
from app.jobspec import JobCreate, RequestError, check_model_reference, dataset_kind, local_model_path, to_prune_spec
from app.repositories import lifecycle
from app.repositories.events import add_event
from app.repositories.lifecycle import ArtifactRow, MetricRow, PlanRow
from app.storage import Storage, StorageError, storage_from_url
from lorp.errors import EngineError, JobCancelled, is_out_of_memory
from lorp.jsonable import finite, json_safe

if TYPE_CHECKING:
    from lorp.pipeline import PruneResult
    from lorp.similarity import SimilarityStats
    from lorp.spec import PruneSpec

log = logging.getLogger(__name__)

JOBS_PREFIX = "jobs"
CANCEL_CHECK_INTERVAL_S = 1.0
STORAGE_ATTEMPTS = 4
STORAGE_BACKOFF_S = 0.5
# The engine's stages fill progress up to this fraction; the upload fills the rest.
ENGINE_SHARE = 0.95

METRIC_UNITS: dict[str, str] = {
    "perplexity": "",
    "prefill_tokens_per_s": "tok/s",
    "decode_tokens_per_s": "tok/s",
    "weights_bytes": "B",
    "peak_memory_bytes": "B",
    "num_layers": "",
    "num_parameters": "",
}
RATIO_METRICS = ("decode_speedup", "prefill_speedup", "speedup_bound")
RATIO_UNIT = "x"

T = TypeVar("T")


class JobFailure(Exception):
    """A failure the runner itself detects, with the job error code to record."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def job_prefix(job_id: uuid.UUID) -> str:
    """Where a job's outputs live in the artifact store."""
    return f"{JOBS_PREFIX}/{job_id}"


def artifact_storage(settings: Settings) -> Storage:
    return storage_from_url(settings.artifact_storage_url, **settings.s3_options())


def default_worker_name() -> str:
    return f"{socket.gethostname()}/{os.getpid()}"


def with_storage_retries(what: str, fn: Callable[[], T]) -> T:
    """Call ``fn``, retrying retryable storage errors with exponential backoff; then storage_unavailable."""
    for attempt in range(1, STORAGE_ATTEMPTS + 1):
        try:
            return fn()
        except StorageError as exc:
            if not exc.retryable or attempt == STORAGE_ATTEMPTS:
                tries = f" after {attempt} attempts" if attempt > 1 else ""
                raise JobFailure(
                    "storage_unavailable",
                    f"{what} failed{tries}: {exc}. Check that the object store is reachable and writable, "
                    "then submit the job again.",
                ) from exc
            delay = STORAGE_BACKOFF_S * 2 ** (attempt - 1)
            log.warning("%s failed (attempt %d/%d), retrying in %.1fs: %s", what, attempt, STORAGE_ATTEMPTS, delay, exc)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _first_line(exc: BaseException, limit: int = 500) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def is_database_outage(exc: BaseException) -> bool:
    """A lost or refused database connection (a restart, a network cut, an exhausted pool)."""
    if isinstance(exc, OperationalError | PoolTimeoutError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def classify_failure(exc: BaseException, settings: Settings) -> tuple[str, str]:
    """The job error code and a message a person can act on, for an exception that ended a run."""
    if isinstance(exc, JobFailure):
        return exc.code, exc.message
    if isinstance(exc, EngineError):
        where = f" (field {exc.field})" if exc.field else ""
        return exc.code, f"{exc.message}{where}"
    if isinstance(exc, RequestError):
        return "invalid_request", f"{exc.message} (field {exc.field})"
    if isinstance(exc, ValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'request'}: {err['msg']}" for err in exc.errors()[:5]
        )
        return "invalid_request", f"the stored request is not valid for this worker: {problems}"
    if is_out_of_memory(exc):
        return (
            "out_of_memory",
            f"the job ran out of memory ({_first_line(exc, 300)}); lower calibration.batch_size or "
            "calibration.seq_len, use a smaller dtype (options.dtype), or run it on a GPU with more memory",
        )
    if isinstance(exc, StorageError):
        return "storage_unavailable", f"object storage failed: {exc}"
    if isinstance(exc, SoftTimeLimitExceeded):
        return (
            "time_limit_exceeded",
            f"the job ran longer than the worker's limit of {settings.job_time_limit_s} s "
            "(LORP_JOB_TIME_LIMIT_S); lower calibration.num_samples or evaluation.max_windows, or raise the limit",
        )
    return "internal_error", f"unexpected {type(exc).__name__}: {_first_line(exc)}"


class _Heartbeat(threading.Thread):
    """Updates heartbeat_at every interval while the job runs, with its own database sessions."""

    def __init__(self, run: _JobRun) -> None:
        super().__init__(name=f"heartbeat-{run.job_id}", daemon=True)
        self._run = run
        self._stop_event = threading.Event()

    def run(self) -> None:
        interval = self._run.settings.heartbeat_interval_s
        while not self._stop_event.wait(interval):
            try:
                with session_scope(self._run.factory) as session:
                    owned = lifecycle.heartbeat(session, self._run.job_id, self._run.attempt)
            except Exception:
                # A missed beat is survivable (the reconciler allows heartbeat_timeout_s); keep trying.
                log.warning("heartbeat of job %s failed", self._run.job_id, exc_info=True)
                continue
            if not owned:
                if self._run.finishing.is_set():
                    return  # our own final write got there first
                log.warning("job %s is no longer attempt %d's to run; stopping it", self._run.job_id, self._run.attempt)
                self._run.lost.set()
                return

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)


class _JobRun:
    """The state of one claimed attempt: callbacks for the engine, upload, publish and failure paths."""

    def __init__(
        self,
        job_id: uuid.UUID,
        attempt: int,
        request: dict[str, Any],
        settings: Settings,
        factory: sessionmaker[Session],
    ) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self.request_json = request
        self.settings = settings
        self.factory = factory
        self.work_dir = settings.work_dir / str(job_id)
        self.lost = threading.Event()
        # Set before the final write: from then on the job leaving this attempt is expected.
        self.finishing = threading.Event()
        self._storage: Storage | None = None
        self._stage: str | None = None
        self._overall = 0.0
        self._last_write = 0.0
        self._last_cancel_check = 0.0
        self._cancel_seen = False
        self._fingerprint: str | None = None
        self._reused_analysis_id: uuid.UUID | None = None
        # Local copies of the job's inputs, by the name the client knows them by (for error messages).
        self._public_names: dict[str, str] = {}

    @property
    def storage(self) -> Storage:
        if self._storage is None:
            self._storage = artifact_storage(self.settings)
        return self._storage

    # -- engine callbacks --------------------------------------------------------------------------

    def progress(self, stage: str, fraction: float) -> None:
        """Engine progress: overall fraction from the stage order; stage changes always written."""
        from lorp.pipeline import STAGES

        if stage in STAGES:
            done = (STAGES.index(stage) + min(max(fraction, 0.0), 1.0)) / len(STAGES)
            self._overall = max(self._overall, done * ENGINE_SHARE)
        self._write_progress(stage)

    def _write_progress(self, stage: str) -> None:
        now = time.monotonic()
        changed = stage != self._stage
        if not changed and now - self._last_write < self.settings.progress_min_interval_s:
            return
        try:
            with session_scope(self.factory) as session:
                owned = lifecycle.set_progress(session, self.job_id, self.attempt, stage, self._overall)
                if owned and changed:
                    add_event(session, self.job_id, EventKind.stage, status=JobStatus.running.value, stage=stage)
        except SoftTimeLimitExceeded:
            # Celery's time limit lands wherever the job happens to be, this write included: it must
            # end the job, not be taken for a failed write.
            raise
        except Exception:
            # Progress is advisory; a failed write must not fail the job (the next one may succeed).
            log.warning("could not record progress of job %s", self.job_id, exc_info=True)
            return
        self._stage = stage
        self._last_write = now
        if not owned:
            self.lost.set()

    def should_cancel(self) -> bool:
        """Engine checkpoint: cancelled by a person, or the job was taken from this attempt."""
        if self.lost.is_set():
            return True
        now = time.monotonic()
        if now - self._last_cancel_check < CANCEL_CHECK_INTERVAL_S:
            return self._cancel_seen
        self._last_cancel_check = now
        try:
            with session_scope(self.factory) as session:
                state = lifecycle.run_state(session, self.job_id, self.attempt)
        except SoftTimeLimitExceeded:
            raise  # the time limit, arriving during this read: not a failed read (see _write_progress)
        except Exception:
            log.warning("could not read the cancel flag of job %s", self.job_id, exc_info=True)
            return self._cancel_seen
        if not state.owned:
            self.lost.set()
            return True
        self._cancel_seen = state.cancel_requested
        return self._cancel_seen

    def lookup_analysis(self, fingerprint: str) -> tuple[SimilarityStats, dict[str, Any]] | None:
        """The stored S and D for this calibration fingerprint, when an earlier job computed them."""
        import numpy as np

        from lorp.similarity import SimilarityStats

        self._fingerprint = fingerprint
        with session_scope(self.factory) as session:
            analysis = lifecycle.find_analysis(session, fingerprint)
            if analysis is None:
                return None
            provenance = dict(analysis.provenance or {})
            angular = (provenance.get("calibration") or {}).get("angular", "all_tokens")
            stats = SimilarityStats(
                S=np.asarray(analysis.similarity, dtype=np.float64),
                D=np.asarray(analysis.angular_distance, dtype=np.float64),
                num_tokens=int(analysis.num_tokens),
                num_sequences=int(analysis.num_samples),
                angular_mode=str(angular),
            )
            self._reused_analysis_id = analysis.id
        log.info("job %s reuses analysis %s (fingerprint %s)", self.job_id, analysis.id, fingerprint[:12])
        return stats, provenance

    # -- resolving references -----------------------------------------------------------------------

    def _prepare_work_dir(self) -> None:
        # A retry starts from nothing: whatever an earlier attempt left is discarded.
        if self.work_dir.exists():
            shutil.rmtree(self.work_dir)
        self.work_dir.mkdir(parents=True)

    def remove_work_dir(self) -> None:
        try:
            shutil.rmtree(self.work_dir)
        except FileNotFoundError:
            pass
        except OSError:
            log.warning("could not remove the work folder %s", self.work_dir, exc_info=True)

    def resolve(self, request: JobCreate) -> PruneSpec:
        """The engine's spec, with uploaded datasets and s3:// models fetched into the work folder."""
        kind = check_model_reference(request.model, self.settings)
        model_source = request.model.id
        if kind == "s3":
            model_source = str(self._download_model(request.model.id))
        elif kind == "local":
            model_source = str(local_model_path(model_source))
        calibration = self._resolve_dataset(request.calibration.dataset, "calibration.dataset")
        evaluation = (
            None
            if request.evaluation.dataset is None
            else self._resolve_dataset(request.evaluation.dataset, "evaluation.dataset")
        )
        return to_prune_spec(
            request, model_source=model_source, calibration_source=calibration, evaluation_source=evaluation
        )

    def _resolve_dataset(self, reference: str, field: str) -> str:
        kind = dataset_kind(reference)
        if kind != "uploaded":
            return reference  # "builtin" and "hf:..." are the engine's own grammar
        dataset_id = uuid.UUID(reference)
        with session_scope(self.factory) as session:
            dataset = lifecycle.find_dataset(session, dataset_id)
            if dataset is None:
                raise RequestError(f"dataset {reference} does not exist; upload it with POST /v1/datasets", field)
            fmt, text_field, key = dataset.format, dataset.text_field, dataset.storage_key
        suffix = ".jsonl" if fmt == "jsonl" else ".txt"
        local = self.work_dir / "data" / f"{dataset_id}{suffix}"
        self._public_names[str(local)] = f"dataset {reference}"
        if not local.exists():
            with_storage_retries(f"downloading dataset {reference}", lambda: self.storage.download_to(key, local))
        return f"{local}#{text_field or 'text'}" if fmt == "jsonl" else str(local)

    def _download_model(self, reference: str) -> Path:
        bucket, _, path = reference.removeprefix("s3://").partition("/")
        path = path.strip("/")
        if not path:
            raise RequestError("an s3:// model must name a folder inside the bucket, not the bucket", "model.id")
        # A store rooted at the model's folder: its keys are the files' paths inside the model directory.
        store = storage_from_url(f"s3://{bucket}/{path}", **self.settings.s3_options())
        keys = with_storage_retries(f"listing model {reference}", lambda: store.list(""))
        if not keys:
            raise JobFailure(
                "model_load_failed", f"no objects under {reference}; upload the model directory there first"
            )
        dest = self.work_dir / "model-source"
        self._public_names[str(dest)] = reference
        for key in keys:
            target = dest.joinpath(*key.split("/"))
            with_storage_retries(f"downloading {reference}/{key}", functools.partial(store.download_to, key, target))
        ggufs = [k for k in keys if k.endswith(".gguf")]
        if "config.json" not in keys and len(ggufs) == 1:
            return dest.joinpath(*ggufs[0].split("/"))
        return dest

    # -- outputs -----------------------------------------------------------------------------------

    def upload(self, out_dir: Path) -> list[ArtifactRow]:
        """Every output file under ``jobs/{job_id}/{relative name}``, replacing what an earlier attempt left."""
        prefix = job_prefix(self.job_id)
        with_storage_retries(f"clearing {prefix}", lambda: self.storage.delete_prefix(prefix))
        files = sorted(p for p in out_dir.rglob("*") if p.is_file())
        total = sum(p.stat().st_size for p in files) or 1
        sent = 0
        rows: list[ArtifactRow] = []
        for path in files:
            if self.should_cancel():
                raise JobCancelled("the job was cancelled during upload")
            name = path.relative_to(out_dir).as_posix()
            key = f"{prefix}/{name}"
            stored = with_storage_retries(f"uploading {name}", functools.partial(self.storage.put_file, key, path))
            rows.append(
                ArtifactRow(
                    name=name,
                    storage_key=key,
                    size_bytes=stored.size,
                    sha256=stored.sha256,
                    content_type=stored.content_type,
                )
            )
            sent += stored.size
            self._overall = max(self._overall, ENGINE_SHARE + (1 - ENGINE_SHARE) * sent / total * 0.99)
            self._write_progress("uploading")
        return rows

    def delete_outputs(self) -> None:
        prefix = job_prefix(self.job_id)
        try:
            removed = with_storage_retries(f"deleting {prefix}", lambda: self.storage.delete_prefix(prefix))
        except JobFailure:
            log.error("job %s: uploaded objects under %s could not be removed", self.job_id, prefix, exc_info=True)
            return
        if removed:
            log.info("job %s: removed %d uploaded object(s) under %s", self.job_id, removed, prefix)

    def publish(self, request: JobCreate, result: PruneResult, artifacts: list[ArtifactRow]) -> bool:
        """Store (or link) the analysis and publish plans, metrics, artifacts and status together."""
        report = result.report
        analysis = report["analysis"]
        provenance = json_safe(report.get("provenance") or {})
        chosen = report["chosen"]
        fingerprint = self._fingerprint or str(provenance.get("fingerprint"))
        with session_scope(self.factory) as session:
            if self._reused_analysis_id is not None:
                analysis_id = self._reused_analysis_id
            else:
                stored = lifecycle.store_analysis(
                    session,
                    fingerprint=fingerprint,
                    model_source=request.model.id,
                    model_revision=(provenance.get("model") or {}).get("commit") or request.model.revision,
                    dataset_sha256=str((provenance.get("calibration") or {}).get("text_sha256", "")),
                    num_samples=request.calibration.num_samples,
                    seq_len=request.calibration.seq_len,
                    seed=request.calibration.seed,
                    num_tokens=int(result.stats.num_tokens),
                    num_blocks=int(result.stats.num_blocks),
                    similarity=json_safe(result.stats.S),
                    angular_distance=json_safe(result.stats.D),
                    rls=finite(analysis.get("rls")),
                    k=int(analysis["k"]),
                    clusters=json_safe(analysis.get("clusters") or []),
                    redundancy=json_safe(analysis.get("redundancy") or []),
                    provenance=provenance,
                )
                analysis_id = stored.id
            return lifecycle.finish_succeeded(
                session,
                self.job_id,
                self.attempt,
                analysis_id=analysis_id,
                analysis_reused=self._reused_analysis_id is not None,
                chosen_method=str(chosen["candidate"]),
                pruned_layers=[int(i) for i in chosen["pruned_layers"]],
                plans=plan_rows(report),
                metrics=metric_rows(report),
                artifacts=artifacts,
                summary=summary_of(report, artifacts, analysis_id, self._reused_analysis_id is not None, self.job_id),
            )

    # -- the run -----------------------------------------------------------------------------------

    def execute(self) -> str:
        """Run the claimed attempt to a final state; returns the outcome."""
        try:
            self._prepare_work_dir()
            request = JobCreate.model_validate(self.request_json)
            spec = self.resolve(request)
            from lorp.pipeline import run_prune

            result = run_prune(
                spec,
                self.work_dir / "out",
                progress=self.progress,
                should_cancel=self.should_cancel,
                lookup_analysis=self.lookup_analysis,
            )
            artifacts = self.upload(result.out_dir)
            self.finishing.set()
            if self.publish(request, result, artifacts):
                log.info("job %s succeeded: removed blocks %s", self.job_id, result.report["chosen"]["pruned_layers"])
                return "succeeded"
            return self._after_refused_finish()
        except JobCancelled:
            return self._cancelled()
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                # The worker is shutting down hard: leave the job running; the reconciler retries it.
                log.warning("job %s interrupted by worker shutdown; the reconciler will retry it", self.job_id)
                raise
            if is_database_outage(exc):
                # A database outage is nobody's mistake and no reason to fail the job for good: leave
                # it running without heartbeats, and the reconciler requeues it (attempts are bounded).
                log.warning("job %s lost its database (%s); the reconciler will retry it", self.job_id, exc)
                return "lost"
            return self._failed(exc)

    def _cancelled(self) -> str:
        self.finishing.set()
        if self.lost.is_set():
            return self._after_refused_finish()
        with session_scope(self.factory) as session:
            done = lifecycle.finish_cancelled(session, self.job_id, self.attempt)
        if not done:
            return self._after_refused_finish()
        self.delete_outputs()
        log.info("job %s cancelled", self.job_id)
        return "cancelled"

    def _failed(self, exc: BaseException) -> str:
        self.finishing.set()
        code, message = classify_failure(exc, self.settings)
        message = self.public_message(message)
        if code == "internal_error":
            log.error("job %s failed unexpectedly", self.job_id, exc_info=exc)
        else:
            # An expected failure (a bad budget, an unknown architecture, storage down): the message
            # says what to do, and a traceback would only bury it.
            log.warning("job %s failed: %s: %s", self.job_id, code, message)
        with session_scope(self.factory) as session:
            done = lifecycle.finish_failed(session, self.job_id, self.attempt, code, message)
        if not done:
            return self._after_refused_finish()
        self.delete_outputs()
        return "failed"

    def public_message(self, message: str) -> str:
        """``message`` with the worker's own paths replaced by the names the client gave the inputs."""
        for local in sorted(self._public_names, key=len, reverse=True):
            message = message.replace(local, self._public_names[local])
        return message.replace(str(self.work_dir), "<job folder>")

    def _after_refused_finish(self) -> str:
        """Our final write matched nothing: a cancel arrived, or another attempt owns the job now."""
        with session_scope(self.factory) as session:
            state = lifecycle.run_state(session, self.job_id, self.attempt)
            if state.owned and state.cancel_requested:
                lifecycle.finish_cancelled(session, self.job_id, self.attempt)
        if state.owned and state.cancel_requested:
            self.delete_outputs()
            log.info("job %s cancelled just before it was published", self.job_id)
            return "cancelled"
        if state.status in (JobStatus.failed, JobStatus.cancelled, None):
            # Ended by someone else (the reconciler, a person) with no artifact rows: nothing will list
            # what this attempt uploaded.
            self.delete_outputs()
            log.warning(
                "job %s ended as %s while attempt %d ran; its result is discarded",
                self.job_id,
                state.status,
                self.attempt,
            )
            return "lost"
        # Another attempt may be writing the same keys now, or has published them; leave them alone.
        log.warning(
            "job %s: attempt %d lost ownership before finishing; its result is discarded", self.job_id, self.attempt
        )
        return "lost"


def plan_rows(report: dict[str, Any]) -> list[PlanRow]:
    chosen = report["chosen"]["candidate"]
    return [
        PlanRow(
            name=str(name),
            k=None if plan.get("k") is None else int(plan["k"]),
            pruned_layers=[int(i) for i in plan["pruned_layers"]],
            validation_perplexity=finite(plan.get("validation_perplexity")),
            chosen=name == chosen,
        )
        for name, plan in report["plans"].items()
    ]


def metric_rows(report: dict[str, Any]) -> list[MetricRow]:
    metrics = report.get("metrics") or {}
    rows: list[MetricRow] = []
    for phase in ("dense", "pruned"):
        values = metrics.get(phase) or {}
        for name, unit in METRIC_UNITS.items():
            value = finite(values.get(name))
            if value is not None:
                rows.append(MetricRow(name=name, phase=phase, value=value, unit=unit))
    for name in RATIO_METRICS:
        value = finite(metrics.get(name))
        if value is not None:
            rows.append(MetricRow(name=name, phase="ratio", value=value, unit=RATIO_UNIT))
    return rows


def summary_of(
    report: dict[str, Any], artifacts: list[ArtifactRow], analysis_id: uuid.UUID, reused: bool, job_id: uuid.UUID
) -> dict[str, Any]:
    """The small JSON a job shows once finished; the full detail lives in the tables and report.json."""
    analysis = report["analysis"]
    metrics = report.get("metrics") or {}
    return json_safe(
        {
            "num_blocks": analysis["num_blocks"],
            "num_layers_removed": report.get("num_layers_removed"),
            "rls": analysis.get("rls"),
            "k": analysis.get("k"),
            "clusters": analysis.get("clusters"),
            "method": report.get("method"),
            "chosen": report["chosen"],
            "plans": {
                name: {"pruned_layers": p["pruned_layers"], "validation_perplexity": p.get("validation_perplexity")}
                for name, p in report["plans"].items()
            },
            "metrics": {
                "dense": {k: (metrics.get("dense") or {}).get(k) for k in METRIC_UNITS},
                "pruned": {k: (metrics.get("pruned") or {}).get(k) for k in METRIC_UNITS},
                "ratio": {k: metrics.get(k) for k in RATIO_METRICS},
            },
            "analysis_id": str(analysis_id),
            "analysis_reused": reused,
            "fingerprint": (report.get("provenance") or {}).get("fingerprint"),
            "artifacts": {
                "prefix": job_prefix(job_id),
                "count": len(artifacts),
                "total_bytes": sum(a.size_bytes for a in artifacts),
                "model_dir": "model",
            },
            "timings_s": report.get("timings_s"),
        }
    )


def run_job(job_id: uuid.UUID | str, settings: Settings, *, worker: str | None = None) -> str:
    """Claim and run one job; returns the outcome (succeeded, failed, cancelled, skipped or lost).

    Job failures are recorded on the job, not raised; an exception escapes only when the database
    cannot record the outcome (the reconciler then retries the job once its heartbeat is stale).
    """
    job_id = uuid.UUID(str(job_id))
    worker = worker or default_worker_name()
    factory = session_factory(settings.sqlalchemy_url)
    with session_scope(factory) as session:
        job = lifecycle.claim(session, job_id, worker)
        if job is None:
            cancelled = lifecycle.cancel_if_requested_while_queued(session, job_id)
        else:
            attempt, request = job.attempts, dict(job.request)
    if job is None:
        if cancelled:
            log.info("job %s was cancelled before it started", job_id)
            return "cancelled"
        log.info("job %s is not queued (a duplicate delivery or already finished); nothing to do", job_id)
        return "skipped"

    log.info("job %s: attempt %d on %s", job_id, attempt, worker)
    run = _JobRun(job_id, attempt, request, settings, factory)
    heartbeat = _Heartbeat(run)
    heartbeat.start()
    try:
        return run.execute()
    finally:
        heartbeat.stop()
        run.remove_work_dir()
