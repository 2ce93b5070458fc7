"""A succeeded job's files: listed from the artifacts table, looked up by name (never by path)."""

from __future__ import annotations

import uuid

from sqlalchemy.orm import Session

from app.core.errors import NotFound
from app.core.security import Principal
from app.db.models import Artifact, JobStatus
from app.repositories import jobs as jobs_repo
from app.schemas import (
    ArtifactOut,
)
from app.services.job_views import artifact_url
from app.services.jobs import get_job


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
