"""/v1/jobs: submit, list, inspect, cancel, and fetch a job's analysis and files."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse

from app.api.deps import DatabaseDep, PrincipalDep, SessionDep, SettingsDep, StorageDep, UnitOfWorkRoute
from app.db.models import Artifact, JobStatus
from app.jobspec import JobCreate
from app.schemas import AnalysisOut, ArtifactOut, DeliveryOut, JobDeleted, JobListItem, JobOut, Page, Problem
from app.services import analysis as analysis_service
from app.services import artifacts as artifacts_service
from app.services import deletion as deletion_service
from app.services import job_views
from app.services import jobs as jobs_service
from app.services import webhooks as webhooks_service
from app.storage import Storage

router = APIRouter(prefix="/jobs", tags=["jobs"], route_class=UnitOfWorkRoute)

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=jobs_service.MAX_IDEMPOTENCY_KEY_LEN,
        description="the same key and body return the same job; the same key with another body is 409",
    ),
]


@router.post(
    "",
    status_code=202,
    response_model=JobOut,
    responses={
        200: {"description": "idempotent replay"},
        409: {"model": Problem, "description": "Idempotency-Key reused with another body"},
        429: {"model": Problem, "description": "the key holds LORP_KEY_MAX_QUEUED_JOBS queued jobs; see Retry-After"},
    },
)
def create_job(
    spec: JobCreate,
    response: Response,
    db: DatabaseDep,
    principal: PrincipalDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKey = None,
) -> JobOut:
    """Submit a pruning job; it is queued and runs on a GPU worker."""
    submission = jobs_service.submit_job(db.session, spec, principal, settings, idempotency_key)
    # The row must be durable before a worker can receive its id.
    db.commit()
    if submission.created:
        jobs_service.enqueue_submitted(db.session, submission.job.id, settings)
    else:
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = job_views.job_path(submission.job.id)
    return job_views.job_out(db.session, submission.job, settings)


@router.get("", response_model=Page[JobListItem])
def list_jobs(
    session: SessionDep,
    principal: PrincipalDep,
    settings: SettingsDep,
    status: JobStatus | None = None,
    model: Annotated[
        str | None, Query(max_length=1024, pattern=r"^[^\x00-\x1f\x7f]*$", description="exact model id")
    ] = None,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> Page[JobListItem]:
    """List jobs newest first, filtered by status and model, one page at a time."""
    return jobs_service.list_jobs(session, principal, settings, status=status, model=model, cursor=cursor, limit=limit)


@router.get("/{job_id}", response_model=JobOut)
def get_job(job_id: uuid.UUID, session: SessionDep, principal: PrincipalDep, settings: SettingsDep) -> JobOut:
    """A job's state, and its summary once available; a queued job with no live worker says it waits for one."""
    return job_views.job_out(session, jobs_service.get_job(session, job_id, principal), settings)


@router.post(
    "/{job_id}/cancel",
    response_model=JobOut,
    responses={
        202: {"description": "running: stop requested"},
        409: {"model": Problem, "description": "the job already finished"},
    },
)
def cancel_job(job_id: uuid.UUID, session: SessionDep, principal: PrincipalDep, settings: SettingsDep) -> JSONResponse:
    """Cancel a queued job at once (200) or ask a running one to stop at its next checkpoint (202)."""
    job, final = jobs_service.cancel_job(session, job_id, principal)
    body = job_views.job_out(session, job, settings)
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if final else 202)


@router.delete(
    "/{job_id}",
    response_model=JobDeleted,
    responses={202: {"description": "deleted; its files go once its worker has stopped it"}},
)
def delete_job(job_id: uuid.UUID, db: DatabaseDep, principal: PrincipalDep, storage: StorageDep) -> JSONResponse:
    """Delete a job: cancel it if it runs, remove its files and results (200 when done now, 202 when
    its worker must stop first), and hide it from every read. An analysis other jobs use stays."""
    job = deletion_service.mark_deleted(db.session, job_id, principal)
    db.commit()  # hidden for good before any file goes
    done = deletion_service.purge_if_stopped(db.session, storage, job)
    body = JobDeleted(id=done.job_id, status=done.status, deleted_at=done.deleted_at, purged=done.purged)
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if done.purged else 202)


@router.get("/{job_id}/deliveries", response_model=list[DeliveryOut])
def list_deliveries(job_id: uuid.UUID, session: SessionDep, principal: PrincipalDep) -> list[DeliveryOut]:
    """Every attempt at delivering the job's webhook (``notify``), in order."""
    return webhooks_service.list_deliveries(session, job_id, principal)


@router.get("/{job_id}/analysis", response_model=AnalysisOut)
def get_analysis(job_id: uuid.UUID, session: SessionDep, principal: PrincipalDep) -> AnalysisOut:
    """S, D, clusters and per-block scores of the job's analysis."""
    return analysis_service.get_analysis(session, job_id, principal)


@router.get("/{job_id}/artifacts", response_model=list[ArtifactOut])
def list_artifacts(job_id: uuid.UUID, session: SessionDep, principal: PrincipalDep) -> list[ArtifactOut]:
    """A succeeded job's files with size, sha256 and a download link."""
    return artifacts_service.list_artifacts(session, job_id, principal)


def _download(artifact: Artifact, storage: Storage, settings: SettingsDep) -> Response:
    filename = artifact.name.rsplit("/", 1)[-1]
    url = storage.presigned_url(artifact.storage_key, expires_s=settings.presign_expires_s, filename=filename)
    if url is not None:
        return RedirectResponse(url, status_code=302)
    chunks = storage.iter_chunks(artifact.storage_key)  # opens now: a missing object fails before streaming
    return StreamingResponse(
        chunks,
        media_type=artifact.content_type,
        headers={
            "Content-Length": str(artifact.size_bytes),
            "Content-Disposition": f'attachment; filename="{_ascii_filename(filename)}"',
            "X-Content-SHA256": artifact.sha256,
        },
    )


def _ascii_filename(name: str) -> str:
    return "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "_" for c in name) or "download"


# A succeeded job's charts, each a PNG artifact under its own path (route name, artifact, what it shows).
_CHARTS = (
    ("heatmap.png", "get_heatmap", job_views.HEATMAP, "The similarity heat map of a succeeded job (PNG)."),
    (
        "plans.png",
        "get_plans_chart",
        job_views.PLANS_CHART,
        "A succeeded job's candidate plans compared: validation perplexity, and task scores dense vs pruned (PNG).",
    ),
    (
        "budgets.png",
        "get_budget_chart",
        job_views.BUDGET_CHART,
        "A succeeded job's budget curve: each method's validation perplexity by blocks removed (PNG).",
    ),
)


def _chart_route(artifact_name: str, doc: str) -> Callable[..., Response]:
    def get_chart(
        job_id: uuid.UUID, session: SessionDep, principal: PrincipalDep, storage: StorageDep, settings: SettingsDep
    ) -> Response:
        artifact = artifacts_service.get_artifact(session, job_id, artifact_name, principal)
        return _download(artifact, storage, settings)

    get_chart.__doc__ = doc
    return get_chart


for _path, _name, _artifact, _doc in _CHARTS:
    router.add_api_route(
        f"/{{job_id}}/{_path}",
        _chart_route(_artifact, _doc),
        methods=["GET"],
        name=_name,
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}, 302: {"description": "presigned storage URL"}},
    )


@router.get(
    "/{job_id}/artifacts/{name:path}",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}, 302: {"description": "presigned storage URL"}},
)
def download_artifact(
    job_id: uuid.UUID,
    name: str,
    session: SessionDep,
    principal: PrincipalDep,
    storage: StorageDep,
    settings: SettingsDep,
) -> Response:
    """Redirect to (S3) or stream (local storage) one of a succeeded job's files."""
    artifact = artifacts_service.get_artifact(session, job_id, name, principal)
    return _download(artifact, storage, settings)
