"""The service's tables (docs/architecture.md). Schema changes go through Alembic only (alembic/versions/)."""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.db.base import Base, IdMixin, JsonType, TimestampMixin, utcnow
from lorp_client.models import JobStatus as JobStatus  # the wire's statuses are the column's


class EventKind(enum.StrEnum):
    """What a ``job_events`` row records."""

    status = "status"  # the job's status changed
    stage = "stage"  # a running job entered a stage
    attempt = "attempt"  # an attempt was taken back and the job queued again
    cancel_requested = "cancel_requested"  # someone asked a running job to stop


# A running job's stage is the engine's current step (lorp.stages.Stage: loading ... reporting), then
# "uploading"; a succeeded job says "done"; a failed or cancelled one keeps the stage it stopped in.
UPLOADING_STAGE = "uploading"
DONE_STAGE = "done"


class ApiKey(IdMixin, TimestampMixin, Base):
    __tablename__ = "api_keys"

    name: Mapped[str] = mapped_column(String(200))
    prefix: Mapped[str] = mapped_column(String(16), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class Dataset(IdMixin, TimestampMixin, Base):
    __tablename__ = "datasets"

    owner_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("api_keys.id", ondelete="SET NULL"), index=True)
    name: Mapped[str] = mapped_column(String(255))
    format: Mapped[str] = mapped_column(String(16))  # txt | jsonl
    text_field: Mapped[str | None] = mapped_column(String(128))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    storage_key: Mapped[str] = mapped_column(String(1024))
    num_documents: Mapped[int] = mapped_column(Integer)


class Analysis(IdMixin, TimestampMixin, Base):
    """S and D of one (model, calibration text, sampling) fingerprint, reused across jobs."""

    __tablename__ = "analyses"

    fingerprint: Mapped[str] = mapped_column(String(64), unique=True)
    model_source: Mapped[str] = mapped_column(String(1024))
    model_revision: Mapped[str | None] = mapped_column(String(256))
    dataset_sha256: Mapped[str] = mapped_column(String(64))
    num_samples: Mapped[int] = mapped_column(Integer)
    seq_len: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(Integer)
    num_tokens: Mapped[int] = mapped_column(BigInteger)
    num_blocks: Mapped[int] = mapped_column(Integer)
    similarity: Mapped[list[list[float]]] = mapped_column(JsonType)  # S, (N+1)x(N+1)
    angular_distance: Mapped[list[list[float]]] = mapped_column(JsonType)  # D
    # LoRP's structure with the options of the job that captured S; GET .../analysis recomputes it
    # with each job's own options (a K override changes k and clusters).
    rls: Mapped[float | None] = mapped_column(Float)
    k: Mapped[int] = mapped_column(Integer)
    clusters: Mapped[list[int]] = mapped_column(JsonType)
    redundancy: Mapped[list[float | None]] = mapped_column(JsonType)
    provenance: Mapped[dict[str, Any]] = mapped_column(JsonType)


class Job(IdMixin, TimestampMixin, Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("owner_id", "idempotency_key", name="uq_jobs_owner_idempotency"),
        # NULLs are distinct in the constraint above: anonymous jobs (no API keys) need their own index.
        Index(
            "uq_jobs_anonymous_idempotency",
            "idempotency_key",
            unique=True,
            postgresql_where=text("owner_id IS NULL AND idempotency_key IS NOT NULL"),
            sqlite_where=text("owner_id IS NULL AND idempotency_key IS NOT NULL"),
        ),
        Index("ix_jobs_status_created_at", "status", "created_at"),
        Index("ix_jobs_owner_created_at", "owner_id", "created_at"),
    )

    owner_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("api_keys.id", ondelete="SET NULL"))
    status: Mapped[JobStatus] = mapped_column(
        Enum(JobStatus, name="job_status", native_enum=False, length=16), default=JobStatus.queued
    )
    stage: Mapped[str | None] = mapped_column(String(32))
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    request: Mapped[dict[str, Any]] = mapped_column(JsonType)
    request_hash: Mapped[str] = mapped_column(String(64))
    model_source: Mapped[str] = mapped_column(String(1024), index=True)
    method: Mapped[str] = mapped_column(String(32))
    # The broker queue the job was sent to (LORP_QUEUE_NAME when submitted); the reconciler re-sends there.
    queue: Mapped[str] = mapped_column(String(255), server_default="gpu")
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    worker: Mapped[str | None] = mapped_column(String(255))
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    queued_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    enqueued_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    progress_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    cancel_requested_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    # DELETE /v1/jobs/{id} or LORP_ARTIFACT_TTL_DAYS: hidden from the API at once; its files and result
    # rows are removed once it has stopped (purged_at), the row itself stays as a tombstone.
    deleted_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    purged_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    # The job's webhook (notify): where, the signing key (never in ``request``), and its deliveries so far.
    notify_url: Mapped[str | None] = mapped_column(String(2048))
    notify_secret: Mapped[str | None] = mapped_column(String(256))
    notify_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    notify_next_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    notified_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    analysis_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("analyses.id", ondelete="SET NULL"))
    analysis_reused: Mapped[bool] = mapped_column(Boolean, default=False)
    chosen_method: Mapped[str | None] = mapped_column(String(32))
    pruned_layers: Mapped[list[int] | None] = mapped_column(JsonType)
    summary: Mapped[dict[str, Any] | None] = mapped_column(JsonType)

    analysis: Mapped[Analysis | None] = relationship(lazy="raise")
    plans: Mapped[list[Plan]] = relationship(back_populates="job", lazy="raise", cascade="all, delete-orphan")
    metrics: Mapped[list[Metric]] = relationship(back_populates="job", lazy="raise", cascade="all, delete-orphan")
    task_metrics: Mapped[list[TaskMetric]] = relationship(
        back_populates="job", lazy="raise", cascade="all, delete-orphan"
    )
    artifacts: Mapped[list[Artifact]] = relationship(back_populates="job", lazy="raise", cascade="all, delete-orphan")


class JobEvent(IdMixin, Base):
    __tablename__ = "job_events"

    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))  # an EventKind
    status: Mapped[str | None] = mapped_column(String(16))
    stage: Mapped[str | None] = mapped_column(String(32))
    message: Mapped[str | None] = mapped_column(Text)


class Plan(IdMixin, Base):
    """One candidate plan of a job: which blocks a method would cut, and its validation score."""

    __tablename__ = "plans"
    __table_args__ = (UniqueConstraint("job_id", "name", name="uq_plans_job_name"),)

    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(32))
    k: Mapped[int | None] = mapped_column(Integer)
    pruned_layers: Mapped[list[int]] = mapped_column(JsonType)
    validation_perplexity: Mapped[float | None] = mapped_column(Float)
    chosen: Mapped[bool] = mapped_column(Boolean, default=False)

    job: Mapped[Job] = relationship(back_populates="plans")


class Metric(IdMixin, Base):
    __tablename__ = "metrics"
    __table_args__ = (UniqueConstraint("job_id", "name", "phase", name="uq_metrics_job_name_phase"),)

    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    phase: Mapped[str] = mapped_column(String(16))  # dense | pruned | ratio
    value: Mapped[float | None] = mapped_column(Float)
    unit: Mapped[str | None] = mapped_column(String(32))

    job: Mapped[Job] = relationship(back_populates="metrics")


class TaskMetric(IdMixin, Base):
    """One downstream task's metric on the dense or the pruned model (lm-evaluation-harness)."""

    __tablename__ = "task_metrics"
    __table_args__ = (UniqueConstraint("job_id", "task", "metric", "phase", name="uq_task_metrics_job_task_phase"),)

    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    task: Mapped[str] = mapped_column(String(200))
    metric: Mapped[str] = mapped_column(String(128))
    phase: Mapped[str] = mapped_column(String(16))  # dense | pruned
    value: Mapped[float | None] = mapped_column(Float)
    stderr: Mapped[float | None] = mapped_column(Float)
    num_samples: Mapped[int] = mapped_column(Integer)
    num_fewshot: Mapped[int | None] = mapped_column(Integer)

    job: Mapped[Job] = relationship(back_populates="task_metrics")


class EvalTask(Base):
    """A downstream task the workers can run (lm-eval's registry, the operator's folder, built-in),
    as the last worker to start published it; the API checks ``evaluation.tasks`` against it."""

    __tablename__ = "eval_tasks"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    source: Mapped[str] = mapped_column(String(16))  # built-in | local | hub
    metrics: Mapped[list[str]] = mapped_column(JsonType, default=list)
    published_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class WebhookDelivery(IdMixin, Base):
    """One attempt at POSTing a job's final state to its webhook (one row per attempt: the claim of an
    attempt and its row are one transaction, see ``app.repositories.webhooks``)."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (UniqueConstraint("job_id", "attempt", name="uq_webhook_deliveries_job_attempt"),)

    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    event: Mapped[str] = mapped_column(String(32))  # job.succeeded | job.failed | job.cancelled
    url: Mapped[str] = mapped_column(String(2048))
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    duration_ms: Mapped[float] = mapped_column(Float)
    delivered: Mapped[bool] = mapped_column(Boolean, default=False)


class Worker(IdMixin, Base):
    """One worker process's liveness: it registers when it is ready to take jobs, beats every
    ``worker_beat_interval_s`` and says when it stops; one beat newer than ``worker_timeout_s``
    makes it live. The API reads this table for /readyz, /metrics and a queued job's ``waiting_for``."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(255))  # Celery's node name, e.g. celery@host
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    queues: Mapped[list[str]] = mapped_column(JsonType, default=list)
    concurrency: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    beat_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    stopped_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    # Closed without a warm stop (its process was found gone): it may have died holding a job's message.
    lost: Mapped[bool] = mapped_column(Boolean, default=False)
    # Pool children that accepted a job and did not start it within LORP_JOB_START_TIMEOUT_S (each
    # was killed, its job handed back); stuck_since is set at such a find and cleared once a job
    # starts on this worker again (worker/startwatch.py).
    stuck_starts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    stuck_since: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    stuck_detail: Mapped[str | None] = mapped_column(String(500))
    # The device it runs jobs on, as it found it when it registered: {"kind": "cuda" | "cpu", "name",
    # "count", "memory_bytes", "budget_bytes"} (worker/device.py); None for workers before 0009.
    device: Mapped[dict[str, Any] | None] = mapped_column(JsonType)

    @property
    def stuck(self) -> bool:
        return self.stuck_since is not None


class Artifact(IdMixin, TimestampMixin, Base):
    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "name", name="uq_artifacts_job_name"),)

    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(512))  # e.g. "model/config.json", "report.json"
    storage_key: Mapped[str] = mapped_column(String(1024))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    content_type: Mapped[str] = mapped_column(String(128))

    job: Mapped[Job] = relationship(back_populates="artifacts")
