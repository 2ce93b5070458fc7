"""Jobs: submission with idempotency, listing, state, cancellation, analysis and artifacts.

Services only flush; the route's unit of work commits. Submitting is two steps on purpose:
``submit_job`` records the job, the route commits, and only then ``enqueue_submitted`` sends the
message, so a worker never receives the id of a row it cannot read.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import numpy as np
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.errors import Conflict, NotFound, Unprocessable
from app.core.security import Principal
from app.db.base import utcnow
from app.db.models import Artifact, EventKind, Job, JobStatus
from app.jobspec import JobCreate, check_model_reference, dataset_kind
from app.queue import enqueue_job
from app.repositories import analyses as analyses_repo
from app.repositories import datasets as datasets_repo
from app.repositories import events as events_repo
from app.repositories import jobs as jobs_repo
from app.repositories import lifecycle
from app.schemas import (
    DEFAULT_PLAN_METHODS,
    AnalysisOut,
    ArtifactOut,
    JobError,
    JobLinks,
    JobListItem,
    JobOut,
    JobSummary,
    Page,
    PlanOut,
)
from app.services import preflight
from lorp.errors import EngineError
from lorp.jsonable import finite
from lorp.selection import METHODS, SelectionOptions, Structure, analyze_structure

logger = logging.getLogger(__name__)

MAX_IDEMPOTENCY_KEY_LEN = 255
HEATMAP = "heatmap.png"


@dataclass(frozen=True)
class Submission:
    """A recorded job; ``created`` is False when an Idempotency-Key replay returned an existing one."""

    job: Job
    created: bool


# -- submission ----------------------------------------------------------------------------------------


def _check_dataset_reference(session: Session, reference: str | None, principal: Principal, field: str) -> None:
    if reference is None or dataset_kind(reference) != "uploaded":
        return
    if datasets_repo.get_visible(session, uuid.UUID(reference), principal) is None:
        raise Unprocessable(f"no uploaded dataset {reference} (upload one with POST /v1/datasets)", field=field)


def _replay(existing: Job, fingerprint: str) -> Submission:
    if existing.request_hash != fingerprint:
        raise Conflict(
            "this Idempotency-Key was already used with a different request body; use a new key",
            field="Idempotency-Key",
            code="idempotency_key_reused",
        )
    return Submission(existing, created=False)


def _record(session: Session, job: Job, at: dt.datetime) -> None:
    jobs_repo.add_job(session, job)
    events_repo.add_event(session, job.id, EventKind.status, status=JobStatus.queued.value, at=at)


def submit_job(
    session: Session,
    spec: JobCreate,
    principal: Principal,
    settings: Settings,
    idempotency_key: str | None = None,
) -> Submission:
    """Validate a job request and record it as queued (flushed, not committed)."""
    if idempotency_key is not None:
        idempotency_key = idempotency_key.strip()
        if not idempotency_key or len(idempotency_key) > MAX_IDEMPOTENCY_KEY_LEN:
            raise Unprocessable(
                f"Idempotency-Key must hold 1 to {MAX_IDEMPOTENCY_KEY_LEN} characters", field="Idempotency-Key"
            )
    kind = check_model_reference(spec.model, settings)
    preflight.check_against_model(spec, kind, settings)
    _check_dataset_reference(session, spec.calibration.dataset, principal, "calibration.dataset")
    _check_dataset_reference(session, spec.evaluation.dataset, principal, "evaluation.dataset")

    fingerprint = spec.fingerprint()
    owner_id = principal.owner_id
    if idempotency_key is not None:
        jobs_repo.lock_idempotency_key(session, owner_id, idempotency_key)
        existing = jobs_repo.get_by_idempotency_key(session, owner_id, idempotency_key)
        if existing is not None:
            return _replay(existing, fingerprint)

    now = utcnow()
    job = Job(
        owner_id=owner_id,
        status=JobStatus.queued,
        progress=0.0,
        request=spec.model_dump(mode="json"),
        request_hash=fingerprint,
        model_source=spec.model.id,
        method=spec.method,
        idempotency_key=idempotency_key,
        attempts=0,
        max_attempts=settings.max_attempts,
        queued_at=now,
        created_at=now,
        updated_at=now,
    )
    if idempotency_key is None:
        _record(session, job, now)
        return Submission(job, created=True)
    try:
        # A savepoint: when a concurrent submission with the same key won the unique constraint,
        # only this insert is undone and the winner's job is returned.
        with session.begin_nested():
            _record(session, job, now)
    except IntegrityError:
        existing = jobs_repo.get_by_idempotency_key(session, owner_id, idempotency_key)
        if existing is None:
            raise
        return _replay(existing, fingerprint)
    return Submission(job, created=True)


def enqueue_submitted(session: Session, job_id: uuid.UUID, settings: Settings) -> bool:
    """Send the committed job to the workers and note when; a broker outage leaves it to the reconciler."""
    try:
        enqueue_job(job_id, settings)
    except Exception as exc:
        # The job row is committed and queued with enqueued_at NULL: the reconciler re-sends it.
        logger.warning("could not enqueue job %s (the reconciler will retry): %s", job_id, exc)
        return False
    lifecycle.mark_enqueued(session, job_id)
    return True


# -- reading -------------------------------------------------------------------------------------------


def job_path(job_id: uuid.UUID) -> str:
    return f"/v1/jobs/{job_id}"


def artifact_url(job_id: uuid.UUID, name: str) -> str:
    return f"{job_path(job_id)}/artifacts/{quote(name, safe='/')}"


def get_job(session: Session, job_id: uuid.UUID, principal: Principal, *, field: str = "job_id") -> Job:
    """The job if the principal may see it; 404 for unknown ids and other owners' jobs alike."""
    job = jobs_repo.get_visible(session, job_id, principal)
    if job is None:
        raise NotFound(f"no job {job_id}", field=field)
    return job


def _links(job: Job) -> JobLinks:
    base = job_path(job.id)
    succeeded = job.status == JobStatus.succeeded
    return JobLinks(
        self=base,
        cancel=f"{base}/cancel",
        analysis=f"{base}/analysis" if job.analysis_id is not None else None,
        heatmap=f"{base}/{HEATMAP}" if succeeded else None,
        artifacts=f"{base}/artifacts" if succeeded else None,
    )


def _error(job: Job) -> JobError | None:
    if job.error_code is None and job.error_message is None:
        return None
    return JobError(code=job.error_code or "error", message=job.error_message or "")


# Metrics that count things (blocks, parameters, bytes): stored as floats like every metric, shown as integers.
COUNT_METRICS = frozenset({"num_layers", "num_parameters", "weights_bytes", "peak_memory_bytes"})


def _metric_value(name: str, value: float | None) -> int | float | None:
    number = finite(value)
    if number is not None and name in COUNT_METRICS and number.is_integer():
        return int(number)
    return number


def _job_structure(session: Session, job: Job) -> dict[str, Any] | None:
    """RLS, K, clusters and N as this job's worker computed them (its summary), else the analysis row's.

    The analysis row is shared by every job with the same calibration, and holds the structure for the
    options of the job that captured it; a job with its own K override has its own in its summary.
    """
    own = job.summary or {}
    if all(own.get(key) is not None for key in ("k", "clusters", "num_blocks")):
        clusters = list(own["clusters"])
        return {"rls": own.get("rls"), "k": own["k"], "clusters": clusters, "num_blocks": own["num_blocks"]}
    return analyses_repo.structure_of(session, job.analysis_id) if job.analysis_id is not None else None


def _summary(session: Session, job: Job, links: JobLinks) -> JobSummary | None:
    # Plans, metrics and the analysis are written with the success, in one transaction: a job that
    # has not succeeded has none, and polling it costs one query, not four.
    if job.status != JobStatus.succeeded and job.analysis_id is None and job.summary is None:
        return None
    plans = jobs_repo.plans_for(session, job.id)
    metrics = jobs_repo.metrics_for(session, job.id)
    structure = _job_structure(session, job)
    if structure is None and not plans and not metrics and job.chosen_method is None and job.summary is None:
        return None
    grouped: dict[str, dict[str, int | float | None]] = {}
    units: dict[str, str | None] = {}
    for metric in metrics:
        grouped.setdefault(metric.phase, {})[metric.name] = _metric_value(metric.name, metric.value)
        if metric.unit is not None or metric.name not in units:
            units[metric.name] = metric.unit
    return JobSummary(
        rls=finite(structure["rls"]) if structure else None,
        k=structure["k"] if structure else None,
        clusters=structure["clusters"] if structure else None,
        num_blocks=structure["num_blocks"] if structure else None,
        analysis_reused=job.analysis_reused,
        plans=[
            PlanOut(
                name=p.name,
                k=p.k,
                pruned_layers=list(p.pruned_layers),
                validation_perplexity=finite(p.validation_perplexity),
                chosen=p.chosen,
            )
            for p in plans
        ],
        chosen_method=job.chosen_method,
        pruned_layers=list(job.pruned_layers) if job.pruned_layers is not None else None,
        metrics=grouped,
        metric_units=units,
        report=job.summary,
        links=links,
    )


def _listed_fields(job: Job, links: JobLinks) -> dict[str, Any]:
    """The fields a job shows in a list; the full view adds to them."""
    return {
        "id": job.id,
        "status": job.status,
        "stage": job.stage,
        "progress": min(max(job.progress or 0.0, 0.0), 1.0),
        "model": job.model_source,
        "method": job.method,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
        "finished_at": job.finished_at,
        "error": _error(job),
        "links": links,
    }


def job_out(session: Session, job: Job) -> JobOut:
    """The full view of a job, with its summary once the worker has stored one."""
    links = _links(job)
    return JobOut(
        **_listed_fields(job, links),
        queued_at=job.queued_at,
        started_at=job.started_at,
        heartbeat_at=job.heartbeat_at,
        cancel_requested_at=job.cancel_requested_at,
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        request=job.request,
        summary=_summary(session, job, links),
    )


def _list_item(job: Job) -> JobListItem:
    return JobListItem(**_listed_fields(job, _links(job)))


def encode_cursor(job: Job) -> str:
    raw = json.dumps([job.created_at.isoformat(), str(job.id)], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[dt.datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, job_id = json.loads(raw)
        return dt.datetime.fromisoformat(created), uuid.UUID(job_id)
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError):
        raise Unprocessable("not a cursor returned by this API", field="cursor") from None


def list_jobs(
    session: Session,
    principal: Principal,
    *,
    status: JobStatus | None = None,
    model: str | None = None,
    cursor: str | None = None,
    limit: int = 20,
) -> Page[JobListItem]:
    """Newest first, filtered, one page at a time."""
    after = decode_cursor(cursor) if cursor else None
    rows = jobs_repo.list_jobs(session, principal, status=status, model=model, after=after, limit=limit + 1)
    page, more = rows[:limit], len(rows) > limit
    return Page[JobListItem](
        items=[_list_item(job) for job in page],
        next_cursor=encode_cursor(page[-1]) if more and page else None,
    )


# -- cancellation --------------------------------------------------------------------------------------


def cancel_job(session: Session, job_id: uuid.UUID, principal: Principal) -> tuple[Job, bool]:
    """Cancel a queued job now or flag a running one; returns (job, is final); succeeded/failed is 409."""
    job = get_job(session, job_id, principal)
    now = utcnow()
    if jobs_repo.cancel_if_queued(session, job.id, now):
        events_repo.add_event(
            session, job.id, EventKind.status, status=JobStatus.cancelled.value, message="cancelled", at=now
        )
        return jobs_repo.reload(session, job.id), True
    if jobs_repo.request_cancel_if_running(session, job.id, now):
        events_repo.add_event(session, job.id, EventKind.cancel_requested, status=JobStatus.running.value, at=now)
        return jobs_repo.reload(session, job.id), False
    job = jobs_repo.reload(session, job.id)
    if job.status == JobStatus.cancelled:
        return job, True
    raise Conflict(f"job {job.id} already {job.status.value}; it cannot be cancelled", code="job_finished")


# -- analysis ------------------------------------------------------------------------------------------


def _job_budget(request: dict[str, Any], num_blocks: int) -> tuple[int | None, SelectionOptions]:
    try:
        spec = JobCreate.model_validate(request)
    except ValidationError:
        return None, SelectionOptions()
    options = spec.options
    try:
        return spec.target.blocks_for(num_blocks), options
    except EngineError:
        return None, options


def _structure(S: np.ndarray, options: SelectionOptions) -> Structure | None:
    try:
        return analyze_structure(S, options)
    except EngineError:
        return None


def _scores(
    S: np.ndarray, D: np.ndarray | None, n: int | None, options: SelectionOptions, structure: Structure | None
) -> dict[str, Any]:
    if n is None or structure is None:
        return {}
    out: dict[str, dict[str, list[float | None]]] = {}
    for name in DEFAULT_PLAN_METHODS:
        try:
            selection = METHODS[name](S, D, n, options, structure=structure)
        except EngineError:
            continue
        out[name] = {key: [finite(v) for v in values] for key, values in selection.scores.items()}
    return out


def no_analysis_reason(job: Job) -> str:
    """Why a job has no analysis: still coming (queued, running), or never (it ended before its capture)."""
    if job.status.terminal:
        return (
            f"job {job.id} {job.status.value} before its similarity analysis was computed, so it has none; "
            "submit the job again to get one"
        )
    return (
        f"job {job.id} has no similarity analysis yet (status {job.status.value}); it is stored when the job succeeds"
    )


def get_analysis(session: Session, job_id: uuid.UUID, principal: Principal) -> AnalysisOut:
    """S, D, LoRP's structure, the job's plans and per-block scores; 404 until the analysis exists."""
    job = get_job(session, job_id, principal)
    analysis = analyses_repo.get(session, job.analysis_id) if job.analysis_id is not None else None
    if analysis is None:
        raise NotFound(no_analysis_reason(job), code="analysis_not_ready")
    S = np.asarray(analysis.similarity, dtype=np.float64)
    D = np.asarray(analysis.angular_distance, dtype=np.float64) if analysis.angular_distance else None
    n, options = _job_budget(job.request, analysis.num_blocks)
    # One analysis row serves every job with the same calibration; LoRP's structure depends on each
    # job's own options (a K override, the clustering seed), so it is this job's, not the first one's.
    structure = _structure(S, options)
    rls, k, clusters, redundancy = (
        (structure.rls, structure.k, structure.clusters, structure.redundancy)
        if structure is not None
        else (analysis.rls, analysis.k, analysis.clusters, analysis.redundancy)
    )
    plans = jobs_repo.plans_for(session, job.id)
    return AnalysisOut(
        id=analysis.id,
        job_id=job.id,
        fingerprint=analysis.fingerprint,
        num_blocks=analysis.num_blocks,
        similarity=analysis.similarity,
        angular_distance=analysis.angular_distance,
        rls=finite(rls),
        k=k,
        clusters=list(clusters),
        redundancy=[finite(v) for v in redundancy],
        plans=[
            PlanOut(
                name=p.name,
                k=p.k,
                pruned_layers=list(p.pruned_layers),
                validation_perplexity=finite(p.validation_perplexity),
                chosen=p.chosen,
            )
            for p in plans
        ],
        scores=_scores(S, D, n, options, structure),
        provenance=analysis.provenance,
        created_at=analysis.created_at,
    )


# -- artifacts -----------------------------------------------------------------------------------------


def list_artifacts(session: Session, job_id: uuid.UUID, principal: Principal) -> list[ArtifactOut]:
    """A succeeded job's published files; empty for any other job."""
    job = get_job(session, job_id, principal)
    if job.status != JobStatus.succeeded:
        return []
    return [
        ArtifactOut(
            name=a.name,
            size_bytes=a.size_bytes,
            sha256=a.sha256,
            content_type=a.content_type,
            url=artifact_url(job.id, a.name),
        )
        for a in jobs_repo.artifacts_for(session, job.id)
    ]


def get_artifact(session: Session, job_id: uuid.UUID, name: str, principal: Principal) -> Artifact:
    """One published file of a succeeded job, looked up by name in the artifacts table."""
    job = get_job(session, job_id, principal)
    artifact = jobs_repo.artifact_by_name(session, job.id, name) if job.status == JobStatus.succeeded else None
    if artifact is None:
        raise NotFound(f"job {job.id} has no artifact {name!r}", field="name")
    return artifact
