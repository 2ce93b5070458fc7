"""What a pruning run found and produced, as typed values; ``report.json`` is written from them.

Readers (the worker, the CLI, tests) use the fields; ``PruneReport.to_json()`` is the one place
that knows the layout of ``report.json``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lorp.jsonable import json_safe


@dataclass(frozen=True)
class StructureSummary:
    """LoRP's view of the model from S (``analysis`` in report.json); see docs/algorithm.md §3-6."""

    num_blocks: int
    num_tokens: int
    rls: float | None
    k: int
    clusters: list[int]
    redundancy: list[float]


@dataclass(frozen=True)
class PlanScore:
    """One candidate plan: the blocks it removes, its K (LoRP's plans), its validation perplexity and its
    validation mean KL from the dense model's predictions (nats; measured when the job ranks plans by
    it or bounds it, ``options.selection_metric`` kl or ``target.max_kl``). None: not measured in full."""

    pruned_layers: list[int]
    k: int | None
    validation_perplexity: float | None
    validation_kl: float | None = None


@dataclass(frozen=True)
class ChosenPlan:
    """The plan that was applied: the candidate's name (a method, or ``lorp_k3`` ...) and its blocks."""

    candidate: str
    pruned_layers: list[int]


@dataclass(frozen=True)
class MetricKind:
    """What one measurement is: its unit (empty: none) and whether it counts things (blocks,
    parameters, bytes: stored as a float like every metric, shown as an integer)."""

    unit: str
    count: bool = False


# The measurements ``Metrics.dense`` and ``Metrics.pruned`` hold (lorp.evaluation), the one list the
# service stores and shows; each is stored when the job measured it. ``Metrics.ratios`` are in RATIO_UNIT.
METRICS: dict[str, MetricKind] = {
    "perplexity": MetricKind(""),
    # The pruned model's divergence from the dense model's predictions (lorp.divergence); pruned only.
    "kl_mean": MetricKind("nats"),
    "kl_p99": MetricKind("nats"),
    "top1_agreement": MetricKind(""),
    "prefill_tokens_per_s": MetricKind("tok/s"),
    "decode_tokens_per_s": MetricKind("tok/s"),
    "weights_bytes": MetricKind("B", count=True),
    "peak_memory_bytes": MetricKind("B", count=True),
    "num_layers": MetricKind("", count=True),
    "num_parameters": MetricKind("", count=True),
}
RATIO_UNIT = "x"


@dataclass(frozen=True)
class Metrics:
    """Dense and pruned measurements (perplexity, speed, memory, sizes) and their ratios."""

    dense: dict[str, Any]
    pruned: dict[str, Any]
    speedup_bound: float
    decode_speedup: float | None = None
    prefill_speedup: float | None = None

    def ratios(self) -> dict[str, float | None]:
        return {
            "decode_speedup": self.decode_speedup,
            "prefill_speedup": self.prefill_speedup,
            "speedup_bound": self.speedup_bound,
        }


@dataclass(frozen=True)
class HealSummary:
    """How the cuts were healed (``none``: blocks removed as they are) and each span's fit.

    Each span: ``start``, ``end``, ``anchor`` (the block the map is folded into), ``num_tokens`` and
    ``residual_before`` / ``residual_after``: the anchor's distance from the dense target relative to
    the part its MLP must supply, without and with the map (how much of the gap the map closed).
    ``method`` is what shipped: asked for ``distill``, ``distill`` or (the validation guard kept it)
    ``linear``, and ``distill`` holds the distillation's figures either way.
    """

    method: str
    mode: str | None = None
    num_tokens: int = 0
    spans: list[dict[str, Any]] = field(default_factory=list)
    reason: str | None = None  # why the cuts ship unhealed (or, asked to distil, with the linear heal)
    distill: dict[str, Any] | None = None  # lorp.distill.DistillSummary, where distillation ran


@dataclass(frozen=True)
class SelectionSummary:
    """What choosing the plan cost: plans scored, heal maps fitted, seconds, and the search's path."""

    evaluations: int
    screenings: int
    heal_fits: int
    cache_s: float
    scoring_s: float
    search_path: list[dict[str, Any]] = field(default_factory=list)
    quality_target: dict[str, Any] | None = None


@dataclass(frozen=True)
class CurvePoint:
    """One method's plan at one budget (blocks removed) and its validation perplexity.

    ``distilled_perplexity``: on the best plan at each budget of a curve drawn distilled
    (``evaluation.curve_distill``), the validation perplexity of what a distilling job would ship
    for it (the distilled model, or the linear heal where the validation guard kept it); else None.
    """

    method: str
    budget: int
    pruned_layers: list[int]
    validation_perplexity: float
    distilled_perplexity: float | None = None


@dataclass(frozen=True)
class BudgetCurve:
    """Each one-pass method's plan at several budgets, scored like the job's candidates (healed or not)."""

    healed: bool
    dense_validation_perplexity: float
    points: list[CurvePoint] = field(default_factory=list)


@dataclass(frozen=True)
class ExecutionSummary:
    """How the model ran (``lorp.execution.choice``): resident or sequential, asked how and why chosen.

    ``block_loads``: decoder blocks brought onto the device over the whole job: a sequential job's
    passes, and the reload check's where it runs the written model block by block (0 for a resident
    job whose check reloads the model whole); ``block_loads_by_stage``: a sequential job's by stage
    (they add up to ``block_loads``). ``skipped``: what sequential execution did not measure, each with
    its reason.
    """

    mode: str
    requested: str
    reason: str
    device: str
    device_name: str = ""
    block_loads: int = 0
    block_loads_by_stage: dict[str, int] = field(default_factory=dict)
    budget_bytes: int | None = None
    weights_bytes: int | None = None
    working_bytes: int | None = None
    skipped: list[str] = field(default_factory=list)
    resumed_at_block: int | None = None  # the capture went on from an earlier attempt's states at this block


@dataclass(frozen=True)
class Generation:
    """A prompt's greedy completion by the dense and by the pruned model."""

    prompt: str
    dense: str
    pruned: str


@dataclass(frozen=True)
class PruneReport:
    """Everything a run reports: the request, provenance, structure, every plan, the chosen one,
    the metrics, the reload check and the stage timings."""

    request: dict[str, Any]
    provenance: dict[str, Any]
    analysis_reused: bool
    analysis: StructureSummary
    num_layers_removed: int
    method: str
    chosen: ChosenPlan
    plans: dict[str, PlanScore]
    metrics: Metrics
    reload_check: dict[str, Any]
    timings_s: dict[str, float]
    files: dict[str, str] = field(default_factory=dict)
    heal: HealSummary = field(default_factory=lambda: HealSummary(method="none"))
    selection: SelectionSummary | None = None
    generations: list[Generation] = field(default_factory=list)
    budget_curve: BudgetCurve | None = None
    execution: ExecutionSummary | None = None

    @property
    def fingerprint(self) -> str | None:
        """The calibration fingerprint (equal fingerprints give equal S and D)."""
        value = self.provenance.get("fingerprint")
        return str(value) if value is not None else None

    def to_json(self) -> dict[str, Any]:
        """The report as ``report.json`` holds it (plain JSON; ratios that were not measured left out)."""
        out = dataclasses.asdict(self)
        metrics = out.pop("metrics")
        out["metrics"] = {
            "dense": metrics["dense"],
            "pruned": metrics["pruned"],
            **{name: value for name, value in self.metrics.ratios().items() if value is not None},
        }
        # Keep the file's key order: metrics sit after the plans, as they always have.
        ordered = {key: out[key] for key in (f.name for f in dataclasses.fields(self))}
        return json_safe(ordered)
