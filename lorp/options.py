"""The options every selection method shares, and their bounds: the leaf the method registry
(``lorp.selection``) and the job specification (``lorp.spec``) both build on.

``lorp.spec`` re-exports everything here, so a caller names the job's types from one module.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

Heal = Literal["linear", "none"]
Execution = Literal["auto", "resident", "sequential"]
SelectionMetric = Literal["perplexity", "kl"]

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
            (``lorp.heal``), ``none`` removes the blocks as they are. Unset: ``linear`` where the
            architecture can fold one, ``none`` where it cannot (Gemma 2/3, OLMo 2/3). Validated
            methods score every plan healed the same way it will ship.
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
    execution: Execution = "auto"
    selection_metric: SelectionMetric = "perplexity"
