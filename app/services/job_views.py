"""How a job looks through the API: its full view (timeline, request, summary with plans, metrics
and LoRP's structure), its list item and its links."""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import quote

from sqlalchemy.orm import Session

from app import job_errors
from app.core.config import Settings
from app.db.models import Job, JobStatus, Plan
from app.repositories import analyses as analyses_repo
from app.repositories import jobs as jobs_repo
from app.schemas import (
    BudgetCurveOut,
    CurvePointOut,
    ExecutionOut,
    JobError,
    JobLinks,
    JobListItem,
    JobOut,
    JobSummary,
    PlanOut,
    TaskMetricOut,
)
from app.services.workers import WAITING_FOR_WORKER, WorkerWait, worker_waits
from lorp.jsonable import finite
from lorp.result import METRICS

HEATMAP = "heatmap.png"
PLANS_CHART = "plans.png"
BUDGET_CHART = "budgets.png"


def job_path(job_id: uuid.UUID) -> str:
    return f"/v1/jobs/{job_id}"


def artifact_url(job_id: uuid.UUID, name: str) -> str:
    return f"{job_path(job_id)}/artifacts/{quote(name, safe='/')}"


def _links(job: Job) -> JobLinks:
    base = job_path(job.id)
    succeeded = job.status == JobStatus.succeeded
    return JobLinks(
        self=base,
        cancel=f"{base}/cancel",
        analysis=f"{base}/analysis" if job.analysis_id is not None else None,
        heatmap=f"{base}/{HEATMAP}" if succeeded else None,
        plans_chart=f"{base}/{PLANS_CHART}" if succeeded else None,
        budget_chart=f"{base}/{BUDGET_CHART}" if succeeded and (job.summary or {}).get("budget_curve") else None,
        artifacts=f"{base}/artifacts" if succeeded else None,
    )


def _error(job: Job) -> JobError | None:
    if job.error_code is None and job.error_message is None:
        return None
    code = job.error_code or job_errors.UNKNOWN.code
    return JobError(code=code, message=job.error_message or "", retryable=job_errors.retryable(code))


# Metrics that count things (blocks, parameters, bytes): stored as floats like every metric, shown as integers.
COUNT_METRICS = frozenset(name for name, kind in METRICS.items() if kind.count)


def plan_out(plan: Plan, summary: dict[str, Any] | None = None) -> PlanOut:
    """A stored candidate plan as the API shows it (a non-finite score as null); its validation KL, kept
    in the job's ``summary`` rather than the plan table, where the job measured it."""
    kept = ((summary or {}).get("plans") or {}).get(plan.name) or {}
    return PlanOut(
        name=plan.name,
        k=plan.k,
        pruned_layers=list(plan.pruned_layers),
        validation_perplexity=finite(plan.validation_perplexity),
        validation_kl=finite(kept.get("validation_kl")),
        chosen=plan.chosen,
    )


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


def _budget_curve(summary: dict[str, Any] | None) -> BudgetCurveOut | None:
    curve = (summary or {}).get("budget_curve")
    if not curve:
        return None
    return BudgetCurveOut(
        healed=bool(curve.get("healed")),
        dense_validation_perplexity=finite(curve.get("dense_validation_perplexity")),
        points=[
            CurvePointOut(
                method=str(p["method"]),
                budget=int(p["budget"]),
                pruned_layers=[int(b) for b in p["pruned_layers"]],
                validation_perplexity=finite(p.get("validation_perplexity")),
                distilled_perplexity=finite(p.get("distilled_perplexity")),
            )
            for p in curve.get("points", [])
        ],
    )


def _execution(summary: dict[str, Any] | None) -> ExecutionOut | None:
    """How the stored job ran; jobs stored before execution was recorded have none."""
    stored = (summary or {}).get("execution")
    return ExecutionOut.model_validate(stored) if isinstance(stored, dict) else None


def _summary(session: Session, job: Job, links: JobLinks) -> JobSummary | None:
    # Plans, metrics and the analysis are written with the success, in one transaction: a job that
    # has not succeeded has none, and polling it costs one query, not four.
    if job.status != JobStatus.succeeded and job.analysis_id is None and job.summary is None:
        return None
    plans = jobs_repo.plans_for(session, job.id)
    metrics = jobs_repo.metrics_for(session, job.id)
    tasks = jobs_repo.task_metrics_for(session, job.id) if job.status == JobStatus.succeeded else []
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
        plans=[plan_out(p, job.summary) for p in plans],
        chosen_method=job.chosen_method,
        pruned_layers=list(job.pruned_layers) if job.pruned_layers is not None else None,
        metrics=grouped,
        metric_units=units,
        tasks=[
            TaskMetricOut(
                task=t.task,
                metric=t.metric,
                phase=t.phase,
                value=finite(t.value),
                stderr=finite(t.stderr),
                num_samples=t.num_samples,
                num_fewshot=t.num_fewshot,
            )
            for t in tasks
        ],
        budget_curve=_budget_curve(job.summary),
        execution=_execution(job.summary),
        report=job.summary,
        links=links,
    )


def queue_waits(session: Session, settings: Settings, jobs: list[Job]) -> dict[str, WorkerWait]:
    """The queues of the queued ones among ``jobs`` that no live worker serves (no query when none is queued)."""
    queues = {job.queue for job in jobs if job.status == JobStatus.queued}
    return worker_waits(session, settings, queues) if queues else {}


def _waiting(job: Job, waits: dict[str, WorkerWait]) -> dict[str, Any]:
    wait = waits.get(job.queue) if job.status == JobStatus.queued else None
    if wait is None:
        return {}
    return {
        "waiting_for": WAITING_FOR_WORKER,
        "worker_last_seen_at": wait.last_seen_at,
        "worker_unseen_s": wait.unseen_s,
    }


def _listed_fields(job: Job, links: JobLinks, waits: dict[str, WorkerWait]) -> dict[str, Any]:
    """The fields a job shows in a list; the full view adds to them."""
    return {
        **_waiting(job, waits),
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


def job_out(session: Session, job: Job, settings: Settings) -> JobOut:
    """The full view of a job, with its summary once the worker has stored one, and what it waits for."""
    links = _links(job)
    return JobOut(
        **_listed_fields(job, links, queue_waits(session, settings, [job])),
        queued_at=job.queued_at,
        started_at=job.started_at,
        heartbeat_at=job.heartbeat_at,
        cancel_requested_at=job.cancel_requested_at,
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        request=job.request,
        notify_url=job.notify_url,
        notified_at=job.notified_at,
        summary=_summary(session, job, links),
    )


def list_item(job: Job, waits: dict[str, WorkerWait]) -> JobListItem:
    """A listed job; ``waits`` (:func:`queue_waits` over its page) say what it waits for while queued."""
    return JobListItem(**_listed_fields(job, _links(job), waits))
