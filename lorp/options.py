"""The options every selection method shares, and their bounds: the leaf the method registry
(``lorp.selection``) and the job specification (``lorp.spec``) both build on.

``lorp.spec`` re-exports everything here, so a caller names the job's types from one module.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

Heal = Literal["linear", "distill", "none"]
Execution = Literal["auto", "resident", "sequential"]
SelectionMetric = Literal["perplexity", "kl"]

DEFAULT_HEAL_STEPS = 100  # distillation steps when options.heal_steps is unset (docs/benchmarks.md chose it)
# Block-local distillation (sequential execution): steps per anchor block when unset. A step runs one
# block, not the model, so more of them cost less than resident distillation's (docs/benchmarks.md).
DEFAULT_LOCAL_HEAL_STEPS = 128
MAX_HEAL_STEPS = 10_000
HealSteps = Annotated[int, Field(ge=0, le=MAX_HEAL_STEPS, description="distillation steps (options.heal distill)")]


def folds_maps(heal: str | None) -> bool:
    """Whether a heal method folds linear maps into the blocks before each cut: ``linear`` does, and
    ``distill`` starts from them (``lorp.distill``)."""
    return heal in ("linear", "distill")


# The bounds, once. A seed is a 31-bit integer because that is what every RNG here accepts.
MAX_SEED = 2**31 - 1
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
NumClusters = Annotated[int, Field(ge=2, le=1000, description="LoRP's K, 2 <= K <= N-2 for the model")]
ProtectedLayers = Annotated[
    tuple[int, ...],
    Field(max_length=1000, description="blocks never pruned; default first and last; negative counts from the end"),
]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SelectionOptions(StrictModel):
    """Options every selection method shares (``lorp.selection`` takes them as they are).

    Attributes:
        num_clusters: LoRP's granularity K, overriding the RLS table; must satisfy 2 <= K <= N-2.
        protected_layers: blocks never pruned. ``None`` means the default {0, N-1}; an explicit tuple
            replaces the default (it may be empty). Negative entries count from the end (-1 is N-1).
        cluster_seed: ``random_state`` of the spectral clustering.
        heal: ``linear`` folds a fitted linear map into the block before each removed span
            (``lorp.heal``), ``none`` removes the blocks as they are, ``distill`` folds the linear
            maps and then trains low-rank adapters on the kept blocks toward the dense model's
            predictions on the calibration windows, merged into the weights (``lorp.distill``;
            shipped only where it scores better on the validation windows than the linear heal; in
            sequential execution each cut's anchor block learns the dense span's output instead,
            ``lorp.local_distill``).
            Unset: ``linear`` where the architecture can fold one, ``none`` where it cannot (Gemma 2/3,
            OLMo 2/3). Validated methods score every plan with the linear heal (``distill`` too:
            distillation runs once, on the chosen plan).
        heal_steps: distillation steps (each a calibration batch of windows); only with ``heal``
            distill. Unset: :data:`DEFAULT_HEAL_STEPS`, or in sequential execution (block-local,
            ``lorp.local_distill``) :data:`DEFAULT_LOCAL_HEAL_STEPS` per anchor block; 0 ships the
            linear heal.
        execution: how the model runs (``lorp.execution.choice``): ``resident`` (whole, on the device),
            ``sequential`` (one decoder block at a time, loaded from the safetensors files; the dense and
            pruned model's speed, lm-eval tasks and completions are then skipped) or ``auto``
            (resident when the weights and the job's working set fit the device's memory budget).
            Both give the same statistics, plan and pruned weights.
        selection_metric: what ranks the plans a validated method compares (``auto``, ``search``, the
            best plan at a quality target's budget): ``perplexity`` (validation perplexity) or ``kl``
            (the validation windows' mean KL(dense || pruned) of the next-token distributions,
            ``lorp.divergence``; the dense predictions come from the cached dense states, so it costs
            a second head pass per window, not a second model pass). Perplexity is measured either way.
    """

    num_clusters: NumClusters | None = None
    protected_layers: ProtectedLayers | None = None
    cluster_seed: Seed = 0
    heal: Heal | None = None
    heal_steps: HealSteps | None = None
    execution: Execution = "auto"
    selection_metric: SelectionMetric = "perplexity"

    @field_validator("heal_steps")
    @classmethod
    def _steps_need_distill(cls, steps: int | None, info: ValidationInfo) -> int | None:
        if steps is not None and info.data.get("heal") != "distill":
            raise ValueError("heal_steps is for options.heal 'distill' (the distillation's steps)")
        return steps
