"""The HTTP API's models: the responses are the wire models of ``lorp_client.models`` (one definition,
which the Python client reads back), plus the small requests defined here; job requests are
``app.jobspec.JobCreate``."""

from __future__ import annotations

import uuid

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lorp.selection import plan_methods
from lorp.spec import NumClusters, ProtectedLayers, Seed
from lorp_client.models import (
    AnalysisOut,
    ArtifactOut,
    BudgetCurveOut,
    CurvePointOut,
    DatasetOut,
    DeliveryOut,
    EvalTaskOut,
    EvalTasksOut,
    ExecutionOut,
    JobDeleted,
    JobError,
    JobLinks,
    JobListItem,
    JobOut,
    JobSummary,
    MethodOut,
    MethodsOut,
    Page,
    PlanOut,
    PlanResult,
    PlansResponse,
    Problem,
    TaskMetricOut,
)

__all__ = [
    "AnalysisOut",
    "ArtifactOut",
    "BudgetCurveOut",
    "CurvePointOut",
    "DatasetOut",
    "DeliveryOut",
    "EvalTaskOut",
    "EvalTasksOut",
    "ExecutionOut",
    "JobDeleted",
    "JobError",
    "JobLinks",
    "JobListItem",
    "JobOut",
    "JobSummary",
    "MethodOut",
    "MethodsOut",
    "Page",
    "PlanOut",
    "PlanResult",
    "PlansRequest",
    "PlansResponse",
    "Problem",
    "TaskMetricOut",
]


class PlansRequest(BaseModel):
    """Budgets and methods to plan on a job's stored S and D (no model is loaded)."""

    model_config = ConfigDict(extra="forbid")

    job_id: uuid.UUID
    budgets: list[int] | None = Field(default=None, min_length=1, max_length=64, description="blocks to remove")
    ratios: list[float] | None = Field(default=None, min_length=1, max_length=64, description="fractions of N")
    methods: list[str] = Field(
        default_factory=plan_methods,
        min_length=1,
        max_length=16,
        description="default: every one-pass method (GET /v1/methods lists them)",
    )
    # The engine's option types (the same bounds as a job's options); unset means the job's own.
    num_clusters: NumClusters | None = None
    protected_layers: ProtectedLayers | None = None
    cluster_seed: Seed | None = None

    @model_validator(mode="after")
    def _one_budget_kind(self) -> PlansRequest:
        if (self.budgets is None) == (self.ratios is None):
            raise ValueError("give exactly one of budgets or ratios")
        return self
