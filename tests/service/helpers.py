"""Helpers shared by the service and reliability tests."""

from __future__ import annotations

import uuid

from app.core.config import Settings
from app.db.models import Dataset, Job
from app.db.session import session_factory, session_scope
from app.jobspec import CalibrationRef, EvaluationRef, JobCreate, ModelRef, TargetSpec
from app.storage import artifact_store


def upload_dataset(settings: Settings, data: bytes, *, name: str = "corpus.txt") -> uuid.UUID:
    """Put a .txt corpus into storage and register it, as ``POST /v1/datasets`` does (without its checks)."""
    dataset_id = uuid.uuid4()
    key = f"datasets/{dataset_id}/data.txt"
    stored = artifact_store(settings).put_bytes(key, data, content_type="text/plain")
    with session_scope(session_factory(settings.sqlalchemy_url)) as session:
        session.add(
            Dataset(
                id=dataset_id,
                name=name,
                format="txt",
                text_field=None,
                size_bytes=stored.size,
                sha256=stored.sha256,
                storage_key=key,
                num_documents=1,
            )
        )
    return dataset_id


def job_request(
    model_id: str,
    dataset: uuid.UUID | str,
    *,
    num_layers: int = 2,
    method: str = "auto",
    num_samples: int = 8,
    seq_len: int = 32,
    batch_size: int = 4,
    seed: int = 0,
    eval_windows: int = 2,
    perplexity: bool = True,
    speed: bool = False,
    tasks: list[dict] | None = None,
    options: dict | None = None,
) -> JobCreate:
    """A small, valid job on ``model_id`` calibrated on ``dataset`` (an uploaded id or a source)."""
    return JobCreate.model_validate(
        {
            "model": ModelRef(id=model_id),
            "method": method,
            "target": TargetSpec(num_layers=num_layers),
            "calibration": CalibrationRef(
                dataset=str(dataset), num_samples=num_samples, seq_len=seq_len, seed=seed, batch_size=batch_size
            ),
            "evaluation": EvaluationRef.model_validate(
                {"max_windows": eval_windows, "perplexity": perplexity, "speed": speed, "tasks": tasks or []}
            ),
            "options": options or {},
        }
    )


def create_job(settings: Settings, request: JobCreate, *, max_attempts: int = 3) -> uuid.UUID:
    """Insert and commit a queued job row, as the API does before enqueueing (enqueueing is the caller's)."""
    with session_scope(session_factory(settings.sqlalchemy_url)) as session:
        job = Job(
            request=request.model_dump(mode="json"),
            request_hash=request.fingerprint(),
            model_source=request.model.id,
            method=request.method,
            queue=settings.queue_name,
            max_attempts=max_attempts,
        )
        session.add(job)
        session.flush()
        return job.id
