"""Runs one job on this worker: claim, resolve references, run the engine, upload, publish or fail.

The Celery task is a thin wrapper around `run_job`. The job row in the database is the only truth:
the claim is a conditional UPDATE (a duplicate delivery finds nothing to claim), every later write
is fenced by the claimed attempt number (a worker whose job was requeued after a missed heartbeat
cannot overwrite the new attempt), and outputs go under keys derived from the job id so a retry
overwrites rather than duplicates. The engine (torch, transformers) is imported only when a job runs.
"""

from __future__ import annotations

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
from sqlalchemy.orm import Session, sessionmaker

from app import job_errors
from app.core.config import Settings
from app.db.models import UPLOADING_STAGE, EventKind, JobStatus
from app.db.session import session_factory, session_scope
from app.jobspec import JobCreate
from app.repositories import analyses as analyses_repo
from app.repositories import lifecycle
from app.repositories.events import add_event
from app.repositories.lifecycle import ArtifactRow
from app.storage import Storage, artifact_store
from lorp.errors import JobCancelled
from lorp.stages import STAGES
from worker import leftovers, outputs
from worker.failure_log import RepeatedFailure
from worker.failures import classify_failure, is_database_outage, time_limit_in
from worker.heartbeat import Heartbeat
from worker.inputs import JobInputs
from worker.retries import with_database_retries
from worker.soft_limit import SoftLimit

if TYPE_CHECKING:
    from lorp.pipeline import PruneResult
    from lorp.similarity import SimilarityStats

log = logging.getLogger(__name__)

T = TypeVar("T")

CANCEL_CHECK_INTERVAL_S = 1.0
# The engine's stages fill progress up to this fraction; the upload fills the rest.
ENGINE_SHARE = 0.95


def default_worker_name() -> str:
    return f"{socket.gethostname()}/{os.getpid()}"


class _JobRun:
    """The state of one claimed attempt: callbacks for the engine, upload, publish and failure paths."""

    def __init__(
        self,
        job_id: uuid.UUID,
        attempt: int,
        request: dict[str, Any],
        settings: Settings,
        factory: sessionmaker[Session],
        soft_limit: SoftLimit,
    ) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self.request_json = request
        self.settings = settings
        self.factory = factory
        self.soft_limit = soft_limit
        self.work_dir = leftovers.work_folder(settings, job_id)
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
        self._progress_failures = RepeatedFailure(log, f"recording the progress of job {job_id}")
        self._cancel_check_failures = RepeatedFailure(log, f"reading the cancel flag of job {job_id}")
        self.inputs = JobInputs(
            settings, factory, lambda: self.storage, self.work_dir, job_id=job_id, should_cancel=self.should_cancel
        )

    @property
    def storage(self) -> Storage:
        if self._storage is None:
            self._storage = artifact_store(self.settings)
        return self._storage

    # -- engine callbacks --------------------------------------------------------------------------

    def progress(self, stage: str, fraction: float) -> None:
        """Engine progress: overall fraction from the stage order; stage changes always written."""
        self.soft_limit.check()
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
        except Exception as exc:
            # Progress is advisory; a failed write must not fail the job (the next one may succeed).
            self._raise_if_time_limit(exc)
            self._progress_failures.failed(exc)
            return
        self._progress_failures.succeeded()
        self._stage = stage
        self._last_write = now
        if not owned:
            self.lost.set()

    def should_cancel(self) -> bool:
        """Engine checkpoint: cancelled by a person, or the job was taken from this attempt."""
        self.soft_limit.check()
        if self.lost.is_set():
            return True
        now = time.monotonic()
        if now - self._last_cancel_check < CANCEL_CHECK_INTERVAL_S:
            return self._cancel_seen
        self._last_cancel_check = now
        try:
            with session_scope(self.factory) as session:
                state = lifecycle.run_state(session, self.job_id, self.attempt)
        except Exception as exc:
            self._raise_if_time_limit(exc)
            self._cancel_check_failures.failed(exc)
            return self._cancel_seen
        self._cancel_check_failures.succeeded()
        if not state.owned:
            self.lost.set()
            return True
        self._cancel_seen = state.cancel_requested
        return self._cancel_seen

    def _raise_if_time_limit(self, exc: Exception) -> None:
        """Celery's time limit lands wherever the job happens to be, a progress write or a cancel check
        included, where it may come out as the database driver's own error with the limit as its
        context: it must end the job, not be taken for a failed write or read."""
        if isinstance(exc, SoftTimeLimitExceeded):
            raise exc
        if time_limit_in(exc) or self.soft_limit.fired:
            raise SoftTimeLimitExceeded() from exc

    def lookup_analysis(self, fingerprint: str) -> tuple[SimilarityStats, dict[str, Any]] | None:
        """The stored S and D for this calibration fingerprint, when an earlier job computed them."""
        import numpy as np

        from lorp.similarity import SimilarityStats

        self._fingerprint = fingerprint

        def read() -> tuple[uuid.UUID, SimilarityStats, dict[str, Any]] | None:
            with session_scope(self.factory) as session:
                analysis = analyses_repo.by_fingerprint(session, fingerprint)
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
                return analysis.id, stats, provenance

        found = self._in_database("looking up a stored analysis", read, until_time_limit=True)
        if found is None:
            return None
        self._reused_analysis_id, stats, provenance = found
        log.info("job %s reuses analysis %s (fingerprint %s)", self.job_id, found[0], fingerprint[:12])
        return stats, provenance

    def _in_database(self, what: str, fn: Callable[[], T], *, until_time_limit: bool = False) -> T:
        """A read or write the job cannot do without, waited for through a database outage for up to
        ``LORP_OUTAGE_WAIT_S`` (``worker.retries``): the work done so far is not thrown away on a
        restart of the database. ``until_time_limit``: the time limit ends the wait (not for the
        writes that record how the job ended)."""
        return with_database_retries(
            what,
            fn,
            patience_s=self.settings.outage_wait_s,
            should_cancel=self._time_limit_reached if until_time_limit else None,
        )

    def _time_limit_reached(self) -> bool:
        self.soft_limit.check()  # raises the limit once it fired
        return False

    # -- resolving references -----------------------------------------------------------------------

    def _prepare_work_dir(self) -> None:
        # A retry starts from nothing: whatever an earlier attempt left is discarded.
        if self.work_dir.exists():
            shutil.rmtree(self.work_dir)
        self.work_dir.mkdir(parents=True)

    def remove_scratch(self) -> None:
        """The job's scratch (a sequential run's states, kept so that a retry resumes): removed once the
        job has ended, kept when the attempt leaves it to a retry."""
        leftovers.remove_folder(leftovers.scratch_folder(self.settings, self.job_id))

    def remove_work_dir(self) -> None:
        leftovers.remove_folder(self.work_dir)

    # -- outputs -----------------------------------------------------------------------------------

    def upload(self, out_dir: Path) -> list[ArtifactRow]:
        """Every output file under ``jobs/{job_id}/``; progress runs from ENGINE_SHARE to (almost) 1."""

        def on_progress(fraction: float) -> None:
            self._overall = max(self._overall, ENGINE_SHARE + (1 - ENGINE_SHARE) * fraction * 0.99)
            self._write_progress(UPLOADING_STAGE)

        return outputs.upload(
            self.storage,
            self.job_id,
            out_dir,
            should_cancel=self.should_cancel,
            on_progress=on_progress,
            patience_s=self.settings.outage_wait_s,
        )

    def delete_outputs(self) -> None:
        leftovers.delete_outputs(self.storage, self.job_id)

    def publish(self, request: JobCreate, result: PruneResult, artifacts: list[ArtifactRow]) -> bool:
        """Plans, metrics, the analysis, the artifacts and the status, in one transaction."""
        return self._in_database(
            "publishing the job",
            lambda: outputs.publish(
                self.factory,
                self.job_id,
                self.attempt,
                request,
                result,
                artifacts,
                fingerprint=self._fingerprint,
                reused_analysis_id=self._reused_analysis_id,
            ),
            until_time_limit=True,
        )

    # -- the run -----------------------------------------------------------------------------------

    def execute(self) -> str:
        """Run the claimed attempt to a final state; returns the outcome."""
        try:
            self._prepare_work_dir()
            request = JobCreate.model_validate(self.request_json)
            spec = self.inputs.resolve(request)
            from lorp.pipeline import run_prune

            result = run_prune(
                spec,
                self.work_dir / "out",
                progress=self.progress,
                should_cancel=self.should_cancel,
                lookup_analysis=self.lookup_analysis,
                sources=self.inputs.sources,
            )
            artifacts = self.upload(result.out_dir)
            self.finishing.set()
            if self.publish(request, result, artifacts):
                log.info("job %s succeeded: removed blocks %s", self.job_id, result.report.chosen.pruned_layers)
                return "succeeded"
            return self._after_refused_finish()
        except JobCancelled:
            return self._cancelled()
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                # The worker is shutting down hard: leave the job running; the reconciler retries it.
                log.warning("job %s interrupted by worker shutdown; the reconciler will retry it", self.job_id)
                raise
            if is_database_outage(exc) and not (self.soft_limit.fired or time_limit_in(exc)):
                # A database outage is nobody's mistake and no reason to fail the job for good: leave
                # it running without heartbeats, and the reconciler requeues it (attempts are bounded).
                log.warning("job %s lost its database (%s); the reconciler will retry it", self.job_id, exc)
                return "lost"
            return self._failed(exc)

    def _cancelled(self) -> str:
        self.finishing.set()
        if self.lost.is_set():
            return self._after_refused_finish()
        done = self._in_database("recording the cancel", self._finish(lifecycle.finish_cancelled))
        if not done:
            return self._after_refused_finish()
        self.delete_outputs()
        log.info("job %s cancelled", self.job_id)
        return "cancelled"

    def _failed(self, exc: BaseException) -> str:
        self.finishing.set()
        code, message = classify_failure(exc, self.settings, stage=self._stage, time_limit=self.soft_limit.fired)
        message = self.inputs.public_message(message)
        if code == job_errors.DISK_FULL.code:
            # Free the space this attempt took before writing the failure: in the embedded mode the
            # database lives on the same disk, and recording the failure would fail too.
            self.remove_work_dir()
        if code == job_errors.INTERNAL_ERROR.code:
            log.error("job %s failed unexpectedly", self.job_id, exc_info=exc)
        else:
            # An expected failure (a bad budget, an unknown architecture, storage down): the message
            # says what to do, and a traceback would only bury it.
            log.warning("job %s failed: %s: %s", self.job_id, code, message)
        done = self._in_database("recording the failure", self._finish(lifecycle.finish_failed, code, message))
        if not done:
            return self._after_refused_finish()
        self.delete_outputs()
        return "failed"

    def _finish(self, write: Callable[..., bool], *args: Any) -> Callable[[], bool]:
        """``write(session, job, attempt, *args)`` in a transaction of its own (a callable to retry)."""

        def run() -> bool:
            with session_scope(self.factory) as session:
                return write(session, self.job_id, self.attempt, *args)

        return run

    def _after_refused_finish(self) -> str:
        """Our final write matched nothing: a cancel arrived, or another attempt owns the job now."""

        def settle() -> lifecycle.RunState:
            with session_scope(self.factory) as session:
                state = lifecycle.run_state(session, self.job_id, self.attempt)
                if state.owned and state.cancel_requested:
                    lifecycle.finish_cancelled(session, self.job_id, self.attempt)
                return state

        state = self._in_database("reading the job's state", settle)
        if state.status == JobStatus.succeeded and state.same_attempt:
            # Only this attempt publishes under its number: a try of its publication had committed,
            # its answer lost with the connection, and the try that waited the outage out found it done.
            log.info("job %s succeeded (its publication had committed before the database went away)", self.job_id)
            return "succeeded"
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


def run_job(
    job_id: uuid.UUID | str,
    settings: Settings,
    *,
    worker: str | None = None,
    abandon: Callable[[], None] | None = None,
    soft_limit: SoftLimit | None = None,
) -> str:
    """Claim and run one job; returns the outcome (succeeded, failed, cancelled, skipped, deferred or lost).

    Job failures are recorded on the job, not raised; an exception escapes only when the database
    cannot record the outcome (the reconciler then retries the job once its heartbeat is stale).
    ``abandon`` is called (from the heartbeat thread) when the job was taken from this attempt and
    the run did not stop (see ``worker.heartbeat.Heartbeat``); a process that runs nothing else
    passes one that exits. ``soft_limit`` says whether Celery's soft time limit reached the attempt
    (``worker.soft_limit``); without one, only a limit that reaches the runner as itself is seen.
    """
    job_id = uuid.UUID(str(job_id))
    worker = worker or default_worker_name()
    factory = session_factory(settings.sqlalchemy_url)
    with session_scope(factory) as session:
        job = lifecycle.claim(session, job_id, worker, max_running_per_owner=settings.key_max_running_jobs)
        if job is None:
            cancelled = lifecycle.cancel_if_requested_while_queued(session, job_id)
            # Still queued after a refused claim: its key runs LORP_KEY_MAX_RUNNING_JOBS jobs already.
            deferred = not cancelled and lifecycle.defer(session, job_id)
        else:
            attempt, request = job.attempts, dict(job.request)
    if job is None:
        if cancelled:
            log.info("job %s was cancelled before it started", job_id)
            return "cancelled"
        if deferred:
            log.info("job %s waits: its key runs its limit of jobs; the reconciler sends it again", job_id)
            return "deferred"
        log.info("job %s is not queued (a duplicate delivery or already finished); nothing to do", job_id)
        return "skipped"

    log.info("job %s: attempt %d on %s", job_id, attempt, worker)
    run = _JobRun(job_id, attempt, request, settings, factory, soft_limit or SoftLimit())
    heartbeat = Heartbeat(settings, factory, job_id, attempt, lost=run.lost, finishing=run.finishing, abandon=abandon)
    heartbeat.start()
    outcome = "lost"
    try:
        outcome = run.execute()
    finally:
        heartbeat.stop()
        run.remove_work_dir()
        if outcome in ("succeeded", "failed", "cancelled"):
            run.remove_scratch()
    # The job's webhook, if it has one, goes out from the dispatcher (worker/webhooks.py), not this slot.
    return outcome
