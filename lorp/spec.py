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

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lorp.errors import BudgetError

Method = Literal["auto", "search", "lorp", "shortgpt", "streamline", "angular", "reverse"]
Heal = Literal["linear", "none"]
Execution = Literal["auto", "resident", "sequential"]
# Methods that score plans on the model itself (the others need only S and D).
VALIDATED_METHODS = ("auto", "search")
DType = Literal["auto", "float32", "bfloat16", "float16"]

# The bounds, once. A seed is a 31-bit integer because that is what every RNG here accepts.
MAX_SEED = 2**31 - 1
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
NumSamples = Annotated[int, Field(ge=1, le=4096, description="calibration windows M")]
SeqLen = Annotated[int, Field(ge=8, le=32768, description="tokens per window T")]
BatchSize = Annotated[int, Field(ge=1, le=512, description="sequences per forward pass")]
MaxWindows = Annotated[int, Field(ge=1, le=4096, description="evaluation windows")]
NumClusters = Annotated[int, Field(ge=2, le=1000, description="LoRP's K, 2 <= K <= N-2 for the model")]
ProtectedLayers = Annotated[
    tuple[int, ...],
    Field(max_length=1000, description="blocks never pruned; default first and last; negative counts from the end"),
]
Revision = Annotated[str, Field(max_length=256, pattern=r"^[A-Za-z0-9._/-]+$", description="branch, tag or commit")]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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

    ``max_perplexity_ratio`` cuts the most blocks whose best plan keeps validation perplexity within
    that multiple of the dense model's; the count is then found by scoring, after the capture.
    """

    num_layers: int | None = Field(default=None, ge=1)
    ratio: float | None = Field(default=None, gt=0.0, lt=1.0)
    max_perplexity_ratio: float | None = Field(
        default=None,
        gt=1.0,
        le=1000.0,
        description="validation perplexity of the pruned model over the dense one, at most this",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> TargetSpec:
        given = [v for v in (self.num_layers, self.ratio, self.max_perplexity_ratio) if v is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of num_layers, ratio or max_perplexity_ratio")
        return self

    @property
    def is_quality_bound(self) -> bool:
        return self.max_perplexity_ratio is not None

    def blocks_for(self, n_blocks: int) -> int:
        """The block budget for a model of ``n_blocks`` blocks.

        A ratio rounds down (``floor(ratio * N)``): the service never removes more than asked. A
        quality bound has no budget before plans are scored (``BudgetError``, field
        ``target.max_perplexity_ratio``).
        """
        if self.num_layers is not None:
            return self.num_layers
        if self.ratio is None:
            raise BudgetError(
                "a max_perplexity_ratio target has no block count until plans are scored",
                field="target.max_perplexity_ratio",
            )
        n = math.floor(self.ratio * n_blocks + 1e-9)
        if n < 1:
            raise BudgetError(
                f"ratio {self.ratio} of {n_blocks} blocks rounds down to 0 blocks; use a larger ratio",
                field="target.ratio",
            )
        return n


class CalibrationSpec(StrictModel):
    """The text the similarity pass and plan validation read."""

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
    angular: Literal["all_tokens", "last_token"] = "all_tokens"
    validation_fraction: float = Field(default=0.1, gt=0.0, lt=0.5)
    validation_windows: int = Field(default=16, ge=1, le=1024)


class SelectionOptions(StrictModel):
    """Options every selection method shares (``lorp.selection`` takes them as they are).

    Attributes:
        num_clusters: LoRP's granularity K, overriding the RLS table; must satisfy 2 <= K <= N-2.
        protected_layers: blocks never pruned. ``None`` means the default {0, N-1}; an explicit tuple
            replaces the default (it may be empty). Negative entries count from the end (-1 is N-1).
        cluster_seed: ``random_state`` of the spectral clustering.
        heal: ``linear`` folds a fitted linear map into the block before each removed span
            (``lorp.heal``), ``none`` removes the blocks as they are. Unset: ``linear`` where the
            architecture can fold one, ``none`` where it cannot (Gemma 2/3, OLMo 2/3). Validated
            methods score every plan healed the same way it will ship.
        execution: how the model runs (``lorp.execution.choice``): ``resident`` (whole, on the device),
            ``sequential`` (one decoder block at a time, loaded from the safetensors files; the dense and
            pruned model's speed, lm-eval tasks and completions are then skipped) or ``auto``
            (resident when the weights and the job's working set fit the device's memory budget).
            Both give the same statistics, plan and pruned weights.
    """

    num_clusters: NumClusters | None = None
    protected_layers: ProtectedLayers | None = None
    cluster_seed: Seed = 0
    heal: Heal | None = None
    execution: Execution = "auto"


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


class EvaluationSpec(DownstreamFields):
    """What to measure on the dense and the pruned model."""

    perplexity: bool = True
    dataset: str | None = Field(
        default=None,
        max_length=1024,
        description="held-out text; default the built-in corpus's evaluation split",
    )
    max_windows: MaxWindows = 32
    speed: bool = True
    speed_prompt_len: int = Field(default=128, ge=1, le=32768)
    speed_new_tokens: int = Field(default=32, ge=1, le=4096)
    speed_batch: int = Field(default=1, ge=1, le=256)


def execution_refusal(execution: str, tasks: int) -> tuple[str, str] | None:
    """(message, field) when a request's ``options.execution`` cannot give what it asks, else None:
    lm-eval tasks need the model whole on the device, which ``sequential`` never loads. (Speed and
    completions, asked by default, are skipped instead, and the report says so.)"""
    if execution == "sequential" and tasks:
        return (
            "evaluation.tasks need the model whole on the device, and options.execution 'sequential' never "
            "loads it whole; drop the tasks, or use 'auto' (which skips them only where the model does not fit) "
            "or 'resident'",
            "evaluation.tasks",
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
