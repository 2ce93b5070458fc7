"""A job's analysis: S, D, LoRP's structure for the job's own options, and every method's scores."""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
from pydantic import ValidationError
from sqlalchemy.orm import Session

from app.core.errors import NotFound
from app.core.security import Principal
from app.db.models import Job
from app.jobspec import JobCreate
from app.repositories import analyses as analyses_repo
from app.repositories import jobs as jobs_repo
from app.schemas import (
    AnalysisOut,
)
from app.services.job_views import plan_out
from app.services.jobs import get_job
from lorp.errors import EngineError
from lorp.jsonable import finite
from lorp.selection import METHODS, SelectionOptions, Structure, analyze_structure, plan_methods


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
    for name in plan_methods():
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
        plans=[plan_out(p, job.summary) for p in plans],
        scores=_scores(S, D, n, options, structure),
        provenance=analysis.provenance,
        created_at=analysis.created_at,
    )
