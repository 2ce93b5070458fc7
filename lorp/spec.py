"""The job specification: strict pydantic models shared by the CLI, the API and the worker.

Every bound and every method name is defined here once: the service's request (``app.jobspec``)
is built from these types and models. Field names follow the request's (``model.id``,
``calibration.dataset``, ``target.num_layers``, ``options.protected_layers``), and so do the
``field`` paths of the engine's errors. Validated wherever a job enters (API, worker, CLI). Checks
that need the model (a budget larger than the eligible blocks) happen in ``lorp.pipeline`` right
after loading, before any pass.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from lorp.errors import BudgetError
from lorp.options import (
    MAX_SEED,
    Execution,
    Heal,
    NumClusters,
    ProtectedLayers,
    Seed,
    SelectionMetric,
    SelectionOptions,
    StrictModel,
)
from lorp.selection import all_methods, check_method

__all__ = [
    "MAX_SEED",
    "BatchSize",
    "CalibrationFields",
    "CalibrationSpec",
    "DType",
    "DownstreamFields",
    "EvaluationFields",
    "EvaluationSpec",
    "Execution",
    "Heal",
    "MaxWindows",
    "Method",
    "ModelSpec",
    "NumClusters",
    "NumSamples",
    "ProtectedLayers",
    "PruneSpec",
    "Seed",
    "SelectionMetric",
    "SelectionOptions",
    "SeqLen",
    "StrictModel",
    "TargetSpec",
    "TaskSpec",
    "curve_refusal",
    "execution_refusal",
]

# A method's name: any method of lorp.selection.REGISTRY, checked when validated (so a method registered
# later is accepted too), and listed as the JSON schema's enum when the schema is drawn.
Method = Annotated[
    str,
    AfterValidator(check_method),
    Field(json_schema_extra=lambda schema: schema.update(enum=all_methods())),
]
DType = Literal["auto", "float32", "bfloat16", "float16"]

NumSamples = Annotated[int, Field(ge=1, le=4096, description="calibration windows M")]
SeqLen = Annotated[int, Field(ge=8, le=32768, description="tokens per window T")]
BatchSize = Annotated[int, Field(ge=1, le=512, description="sequences per forward pass")]
MaxWindows = Annotated[int, Field(ge=1, le=4096, description="evaluation windows")]
Revision = Annotated[str, Field(max_length=256, pattern=r"^[A-Za-z0-9._/-]+$", description="branch, tag or commit")]


class ModelSpec(StrictModel):
    """Which model to prune and how to load it."""

    id: str = Field(
        min_length=1,
        max_length=1024,
        description='"demo", a local Hugging Face directory, a .gguf file, or a hub model id',
    )
    revision: Revision | None = None
    dtype: DType = "auto"
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    trust_remote_code: bool = False
    allow_pickle: bool = False


class TargetSpec(StrictModel):
    """How many blocks to remove: a count, a ratio of the model's blocks, or a quality bound.

    A quality bound cuts the most blocks whose best plan (by ``options.selection_metric``) keeps a
    validation measure within it: ``max_perplexity_ratio`` bounds its validation perplexity over the
    dense model's, ``max_kl`` its mean KL(dense || pruned) of the next-token distributions on the
    validation windows (nats). The count is then found by scoring, after the capture.
    """

    num_layers: int | None = Field(default=None, ge=1)
    ratio: float | None = Field(default=None, gt=0.0, lt=1.0)
    max_perplexity_ratio: float | None = Field(
        default=None,
        gt=1.0,
        le=1000.0,
        description="validation perplexity of the pruned model over the dense one, at most this",
    )
    max_kl: float | None = Field(
        default=None,
        gt=0.0,
        le=100.0,
        description="validation mean KL(dense || pruned) of the next-token distributions, in nats, at most this",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> TargetSpec:
        given = [v for v in (self.num_layers, self.ratio, self.max_perplexity_ratio, self.max_kl) if v is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of num_layers, ratio, max_perplexity_ratio or max_kl")
        return self

    @property
    def quality_field(self) -> str | None:
        """The quality bound's field (``max_perplexity_ratio`` or ``max_kl``) when the target is one, else None."""
        if self.max_perplexity_ratio is not None:
            return "max_perplexity_ratio"
        return "max_kl" if self.max_kl is not None else None

    @property
    def is_quality_bound(self) -> bool:
        return self.quality_field is not None

    def blocks_for(self, n_blocks: int) -> int:
        """The block budget for a model of ``n_blocks`` blocks.

        A ratio rounds down (``floor(ratio * N)``): the service never removes more than asked. A
        quality bound has no budget before plans are scored (``BudgetError``, field
        ``target.max_perplexity_ratio`` or ``target.max_kl``).
        """
        if self.num_layers is not None:
            return self.num_layers
        if self.ratio is None:
            raise BudgetError(
                f"a {self.quality_field} target has no block count until plans are scored",
                field=f"target.{self.quality_field}",
            )
        n = math.floor(self.ratio * n_blocks + 1e-9)
        if n < 1:
            raise BudgetError(
                f"ratio {self.ratio} of {n_blocks} blocks rounds down to 0 blocks; use a larger ratio",
                field="target.ratio",
            )
        return n


class CalibrationFields(StrictModel):
    """The calibration fields the engine's spec and the service's request share, with their defaults
    (the request narrows ``dataset`` to the references a client may name)."""

    dataset: str = Field(
        default="builtin",
        min_length=1,
        max_length=1024,
        description='"builtin", FILE.txt, FILE.jsonl[#field] or hf:DATASET[/CONFIG]:SPLIT#FIELD',
    )
    num_samples: NumSamples = 64
    seq_len: SeqLen = 256
    seed: Seed = 0
    chat_template: bool = False
    batch_size: BatchSize = 4


class CalibrationSpec(CalibrationFields):
    """The text the similarity pass and plan validation read."""

    angular: Literal["all_tokens", "last_token"] = "all_tokens"
    validation_fraction: float = Field(default=0.1, gt=0.0, lt=0.5)
    validation_windows: int = Field(default=16, ge=1, le=1024)


TaskName = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:\-]+$")]
MAX_TASKS = 16
MAX_PROMPTS = 16
DEFAULT_PROMPTS = (
    "The capital of France is",
    "In mathematics, a prime number is",
    "The history of the city began when",
)


class TaskSpec(StrictModel):
    """One downstream task, run through lm-evaluation-harness on the dense and the pruned model."""

    name: TaskName = Field(
        description="a task lm-eval knows: the built-in lorp_cloze, a local YAML's, or its registry's"
    )
    limit: int | None = Field(default=None, ge=1, le=100_000, description="items to run (default: all)")
    num_fewshot: int | None = Field(default=None, ge=0, le=64, description="examples in the prompt (the task's own)")


Prompt = Annotated[str, Field(min_length=1, max_length=2000)]
CurveBudget = Annotated[int, Field(ge=1, le=4096)]
MAX_CURVE_BUDGETS = 32


class DownstreamFields(StrictModel):
    """Downstream evidence a job gathers on both models: lm-eval tasks and greedy completions.

    Shared by the engine's ``EvaluationSpec`` and the service's request, so both validate alike.
    """

    tasks: list[TaskSpec] = Field(default_factory=list, max_length=MAX_TASKS)
    prompts: list[Prompt] = Field(
        default_factory=lambda: list(DEFAULT_PROMPTS),
        max_length=MAX_PROMPTS,
        description="prompts whose greedy completions are shown dense vs pruned ([] for none)",
    )
    generate_tokens: int = Field(default=24, ge=1, le=512, description="new tokens per completion")
    curve_budgets: list[CurveBudget] | None = Field(
        default=None,
        max_length=MAX_CURVE_BUDGETS,
        description="budgets (blocks removed) at which the budget curve scores each one-pass method's plan; "
        "default: up to 4 spread over 1..the job's budget, ending at it; [] for no curve",
    )
    curve_distill: bool = Field(
        default=False,
        description="with options.heal 'distill': also distil the best plan at each curve budget, as the job "
        "distils its own (one distillation per budget), and draw it as the curve's distilled line",
    )

    @model_validator(mode="after")
    def _distinct_tasks(self) -> DownstreamFields:
        seen: set[str] = set()
        for task in self.tasks:
            if task.name in seen:
                raise ValueError(f"task {task.name!r} is listed twice in evaluation.tasks")
            seen.add(task.name)
        return self

    @field_validator("curve_budgets")
    @classmethod
    def _distinct_budgets(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("a budget is listed twice in evaluation.curve_budgets")
        return value


class EvaluationFields(DownstreamFields):
    """The evaluation fields the engine's spec and the service's request share, with their defaults
    (the request narrows ``dataset`` to the references a client may name)."""

    perplexity: bool = True
    dataset: str | None = Field(
        default=None,
        max_length=1024,
        description="held-out text; default the built-in corpus's evaluation split",
    )
    max_windows: MaxWindows = 32
    speed: bool = True


class EvaluationSpec(EvaluationFields):
    """What to measure on the dense and the pruned model."""

    speed_prompt_len: int = Field(default=128, ge=1, le=32768)
    speed_new_tokens: int = Field(default=32, ge=1, le=4096)
    speed_batch: int = Field(default=1, ge=1, le=256)


def execution_refusal(execution: str, tasks: int) -> tuple[str, str] | None:
    """(message, field) when a request's ``options.execution`` cannot give what it asks, else None:
    lm-eval tasks need the model whole on the device, which ``sequential`` never loads. (Speed and
    completions, asked by default, are skipped instead, and the report says so; distillation runs
    block-locally, ``lorp.local_distill``.)"""
    if execution == "sequential" and tasks:
        return (
            "evaluation.tasks need the model whole on the device, and options.execution 'sequential' never "
            "loads it whole; drop the tasks, or use 'auto' (which skips them only where the model does not fit) "
            "or 'resident'",
            "evaluation.tasks",
        )
    return None


def curve_refusal(heal: str | None, curve_distill: bool, curve_budgets: list[int] | None) -> tuple[str, str] | None:
    """(message, field) when ``evaluation.curve_distill`` cannot be given, else None: it distils as the
    job does, so it needs ``options.heal: distill``, and a curve to draw."""
    if not curve_distill:
        return None
    if heal != "distill":
        return (
            "evaluation.curve_distill distils the best plan at each curve budget as a distilling job does: it "
            "needs options.heal 'distill'",
            "evaluation.curve_distill",
        )
    if curve_budgets == []:
        return (
            "evaluation.curve_distill needs a budget curve, and evaluation.curve_budgets is []",
            "evaluation.curve_distill",
        )
    return None


class PruneSpec(StrictModel):
    """A whole pruning job."""

    model: ModelSpec
    method: Method = "auto"
    target: TargetSpec
    calibration: CalibrationSpec = CalibrationSpec()
    options: SelectionOptions = SelectionOptions()
    evaluation: EvaluationSpec = EvaluationSpec()
