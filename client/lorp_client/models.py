"""The service's wire models: every response of the HTTP API, as the API itself serves them.

The API (``app/``) builds its responses from these very classes, so a client reads exactly what
the server writes. This module needs only pydantic: no server, database or engine package.
"""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, Field

T = TypeVar("T")


def _as_utc(value: dt.datetime) -> dt.datetime:
    # SQLite (the embedded mode) hands back naive datetimes; every stored time is UTC.
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value


UtcDateTime = Annotated[dt.datetime, AfterValidator(_as_utc)]


class JobStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


class Problem(BaseModel):
    """An RFC 9457 problem: every error response has this shape (application/problem+json)."""

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None
    code: str = Field(description="stable machine-readable error code")
    errors: list[dict[str, str | None]] = Field(description="[{field, message}]: the inputs at fault")


class Page(BaseModel, Generic[T]):
    """One page of a newest-first listing; pass ``next_cursor`` as ``cursor`` for the next page."""

    items: list[T]
    next_cursor: str | None = None


class JobError(BaseModel):
    """Why a job failed. The codes, and which are retryable, are listed in the README's "Job error codes"."""

    code: str = Field(description="stable machine-readable error code")
    message: str = Field(description="what happened and what to do, for a person")
    retryable: bool | None = Field(
        default=None,
        description="whether the same request, submitted again, may succeed: the failure came from the "
        "service's condition (a worker lost, storage down, a full disk), not from the request; null for a "
        "code this service does not know",
    )


class JobLinks(BaseModel):
    self: str
    cancel: str
    analysis: str | None = None
    heatmap: str | None = None
    plans_chart: str | None = Field(default=None, description="the candidate plans and task scores compared (PNG)")
    budget_chart: str | None = Field(
        default=None, description="each method's validation perplexity by blocks removed (PNG), where the job drew it"
    )
    artifacts: str | None = None


class PlanOut(BaseModel):
    """One candidate plan of a job: the blocks it cuts and, when validated, its validation perplexity and
    (where the job measured it: ``options.selection_metric`` kl or ``target.max_kl``) its validation
    mean KL from the dense model's next-token distributions, in nats."""

    name: str
    k: int | None
    pruned_layers: list[int]
    validation_perplexity: float | None
    validation_kl: float | None = None
    chosen: bool


class TaskMetricOut(BaseModel):
    """One downstream task's metric (lm-evaluation-harness) on the dense or the pruned model."""

    task: str
    metric: str
    phase: str = Field(description="dense or pruned")
    value: float | None
    stderr: float | None
    num_samples: int
    num_fewshot: int | None


class EvalTaskOut(BaseModel):
    """A downstream task the workers can run."""

    name: str
    source: Literal["built-in", "local", "hub"] = Field(
        description="built-in (offline, from the built-in corpus), local (LORP_EVAL_TASKS_DIR) or hub "
        "(lm-eval's registry; its data comes from the Hugging Face hub)"
    )
    metrics: list[str] = Field(description="the metrics the task's own YAML declares (empty where it inherits them)")


class EvalTasksOut(BaseModel):
    """A page of the tasks the workers published, and when the newest publication was."""

    tasks: list[EvalTaskOut]
    total: int
    published_at: dt.datetime | None


class MethodOut(BaseModel):
    """A pruning method a job's ``method`` may name (the engine's registry, as ``GET /v1/methods`` lists it)."""

    name: str
    label: str = Field(description="what the method does, in one line")
    needs_model: bool = Field(description="scores plans on the model (auto, search), so POST /v1/plans cannot run it")
    auto_candidate: bool = Field(description="auto scores this method's plan among its candidates")
    on_curve: bool = Field(description="the budget curve draws this method's plan at every budget")
    needs_distance: bool = Field(description="needs the angular-distance matrix D, not only S")


class MethodsOut(BaseModel):
    """Every method, in the engine's order; ``default`` is what a job without ``method`` runs."""

    methods: list[MethodOut]
    default: str


class CurvePointOut(BaseModel):
    method: str
    budget: int = Field(description="blocks removed")
    pruned_layers: list[int]
    validation_perplexity: float | None
    distilled_perplexity: float | None = Field(
        default=None,
        description="on the best plan at each budget of a curve drawn distilled (evaluation.curve_distill): the "
        "validation perplexity of what a distilling job would ship for it",
    )


class BudgetCurveOut(BaseModel):
    """The plans ``POST /v1/plans`` lists for the curve's budgets, scored on the job's validation windows."""

    healed: bool = Field(description="whether each plan was scored healed, as the job scored its candidates")
    dense_validation_perplexity: float | None
    points: list[CurvePointOut]


class ExecutionOut(BaseModel):
    """How the worker ran the model: resident (whole) or sequential (one block at a time), and why."""

    mode: Literal["resident", "sequential"]
    requested: str = Field(description="options.execution as asked: auto, resident or sequential")
    reason: str
    device: str = Field(description="the device the passes ran on (cpu, cuda:0, ...)")
    device_name: str | None = Field(default=None, description="the device's own name (a GPU's model)")
    block_loads: int = Field(
        default=0,
        description="decoder blocks loaded onto the device (sequential, and a reload check run block by block)",
    )
    skipped: list[str] = Field(default_factory=list, description="what a sequential run did not measure, and why")
    resumed_at_block: int | None = Field(
        default=None, description="a retried sequential capture went on from the earlier attempt's states here"
    )


class JobSummary(BaseModel):
    """What a job found and produced, filled in as the worker stores it."""

    rls: float | None = None
    k: int | None = None
    clusters: list[int] | None = None
    num_blocks: int | None = None
    analysis_reused: bool = False
    plans: list[PlanOut] = Field(default_factory=list)
    chosen_method: str | None = None
    pruned_layers: list[int] | None = None
    metrics: dict[str, dict[str, int | float | None]] = Field(
        default_factory=dict,
        description="{phase: {metric: value}}; phase is dense, pruned or ratio; counts (blocks, bytes) are integers",
    )
    metric_units: dict[str, str | None] = Field(default_factory=dict, description="{metric: unit}")
    tasks: list[TaskMetricOut] = Field(default_factory=list, description="downstream task metrics, dense and pruned")
    budget_curve: BudgetCurveOut | None = Field(
        default=None, description="each one-pass method's plan at several budgets and its validation perplexity"
    )
    execution: ExecutionOut | None = Field(default=None, description="how the model ran (options.execution)")
    report: dict[str, Any] | None = Field(default=None, description="the worker's own summary, as stored")
    links: JobLinks


class JobListItem(BaseModel):
    """A job as listed: state without the request and summary."""

    id: uuid.UUID
    status: JobStatus
    stage: str | None = Field(
        description="the engine's step while running (loading, calibration, capture, selection, ..., reporting), "
        "then uploading; done once succeeded; a failed or cancelled job keeps the stage it stopped in"
    )
    progress: float = Field(ge=0.0, le=1.0)
    model: str
    method: str
    created_at: UtcDateTime
    updated_at: UtcDateTime
    finished_at: UtcDateTime | None
    error: JobError | None
    waiting_for: Literal["worker"] | None = Field(
        default=None,
        description='"worker" while the job is queued and no live worker serves its queue (alert on it); else null',
    )
    worker_last_seen_at: UtcDateTime | None = Field(
        default=None, description="while waiting for a worker: when one was last seen on the queue (null: never)"
    )
    worker_unseen_s: float | None = Field(
        default=None, description="while waiting for a worker: seconds since one was last seen (null: never)"
    )
    links: JobLinks


class JobOut(JobListItem):
    """A job's full state: the listed fields, its timeline, attempts, request and summary."""

    queued_at: UtcDateTime | None
    started_at: UtcDateTime | None
    heartbeat_at: UtcDateTime | None
    cancel_requested_at: UtcDateTime | None
    attempts: int
    max_attempts: int
    request: dict[str, Any]
    notify_url: str | None = Field(default=None, description="the job's webhook (its secret is never shown)")
    notified_at: UtcDateTime | None = Field(default=None, description="when the webhook was delivered")
    summary: JobSummary | None = None


class JobDeleted(BaseModel):
    """What ``DELETE /v1/jobs/{id}`` did: the job is gone from every read; ``purged`` once its files and
    results are removed too (at once for a job that had stopped; else when its worker stops it)."""

    id: uuid.UUID
    status: JobStatus
    deleted_at: UtcDateTime
    purged: bool


class DeliveryOut(BaseModel):
    """One attempt at POSTing a job's final state to its webhook."""

    attempt: int
    event: str = Field(description="job.succeeded, job.failed or job.cancelled")
    url: str
    at: UtcDateTime
    status_code: int | None = Field(description="the receiver's HTTP status; null when it gave none")
    error: str | None = Field(
        description=(
            'why the attempt failed, coarse: "HTTP <status>", "no HTTP answer within <N> s" (refused, reset, '
            'timed out, not HTTP: all alike), "address not allowed", "not attempted: ..."; nothing of the '
            "receiver's body. Null when delivered, or while the attempt is in flight"
        )
    )
    duration_ms: float = Field(
        description="how long the attempt took; an attempt with no HTTP answer counts its whole deadline"
    )
    delivered: bool = Field(description="a 2xx answer: no further attempt")


class ArtifactOut(BaseModel):
    name: str
    size_bytes: int
    sha256: str
    content_type: str
    url: str = Field(description="download link on this API (redirects to storage where it presigns)")


class AnalysisOut(BaseModel):
    """S and D with LoRP's structure, the job's plans and every method's per-block scores."""

    id: uuid.UUID
    job_id: uuid.UUID
    fingerprint: str
    num_blocks: int
    similarity: list[list[float]] = Field(description="S, (N+1) x (N+1); index l < N is block l's input")
    angular_distance: list[list[float]] = Field(description="D, (N+1) x (N+1), mean angular distances")
    rls: float | None
    k: int
    clusters: list[int]
    redundancy: list[float | None] = Field(description="r(l); null for a block alone in its cluster")
    plans: list[PlanOut]
    scores: dict[str, dict[str, list[float | None]]] = Field(
        description="{method: {score name: values}} for the job's budget"
    )
    provenance: dict[str, Any]
    created_at: UtcDateTime


class DatasetOut(BaseModel):
    id: uuid.UUID
    name: str
    format: str
    text_field: str | None
    size_bytes: int
    sha256: str
    num_documents: int
    created_at: UtcDateTime
    reference: str = Field(description="the value to put in a job's calibration.dataset")


class PlanResult(BaseModel):
    method: str
    budget: int = Field(description="blocks removed")
    ratio: float | None = None
    pruned_layers: list[int]
    rls: float | None
    k: int
    clusters: list[int]
    validation_perplexity: float | None = Field(
        default=None,
        description="this plan's validation perplexity where the job scored these very blocks (a candidate "
        "or a budget-curve point), else null: planning here runs no model",
    )


class PlansResponse(BaseModel):
    job_id: uuid.UUID
    analysis_id: uuid.UUID
    num_blocks: int
    plans: list[PlanResult]
    elapsed_ms: float
