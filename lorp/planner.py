"""Choosing the plan that ships: the method's plan (or the best validated one), healed or not, and its size.

Selection criteria disagree badly on some models (docs/algorithm.md §7), so no plan reaches a user
unmeasured. Every plan is scored as it will ship: from cached dense states of the validation windows
(``lorp.scoring.PlanScorer``), and healed with maps fitted on the heal windows (the first capture
windows, at most ``heal_token_cap(d)`` tokens) when healing is on. ``auto`` keeps the best of the
one-pass plans, ``search`` grows a plan block by block (``lorp.search``) and keeps the best of it
and the one-pass plans, any other method's plan is scored for the report. "Best" is by
``options.selection_metric``: validation perplexity, or the validation windows' mean KL from the
dense model's predictions (``kl``). A quality target (``target.max_perplexity_ratio`` or
``target.max_kl``) raises the budget one block at a time and keeps the largest whose best plan
stays within the bound (docs/algorithm.md §8b).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lorp.calibration import CalibrationData, TokenWindows
from lorp.errors import BudgetError, InvalidRequestError
from lorp.execution import Runner, as_runner
from lorp.heal import HealMode, heal_refusal
from lorp.options import folds_maps
from lorp.scoring import CachedHealer, Fit, PlanScorer
from lorp.search import GreedySearch, Step
from lorp.selection import Selection, analyze_structure, candidate_plans, eligible_blocks, select, validate_budget
from lorp.spec import Heal, PruneSpec, SelectionMetric, TargetSpec
from lorp.states import StateCache

HEAL_MAX_TOKENS = 8192
FINALIST_SEEDS = 2  # one-pass plans measured in full beside the searched one (three for a quality target)
# auto screens every candidate on the first validation windows and measures this many in full: the
# full measure of a plan costs about 0.4 of a capture on the demo model, and auto has a dozen.
AUTO_FINALISTS = 3
MIN_TOKENS_PER_WIDTH = 4
# Measured against "sequential" in docs/benchmarks.md: as good on average, and a span's fit is then
# shared by every plan that cuts that span, whatever it cuts before it.
HEAL_MODE: HealMode = "dense"


@dataclass(frozen=True)
class QualityBound:
    """A quality target: the most blocks whose best plan keeps its measure within ``limit``.

    ``max_perplexity_ratio`` measures a plan's validation perplexity over the dense model's on the same
    windows (its ``ratio``); ``max_kl`` its validation mean KL from the dense model's predictions
    (its ``kl``, nats; the dense model's own is 0).
    """

    field: str  # the target's field: max_perplexity_ratio or max_kl
    limit: float

    @classmethod
    def of(cls, target: TargetSpec) -> QualityBound | None:
        name = target.quality_field
        return None if name is None else cls(name, float(getattr(target, name)))

    @property
    def metric(self) -> SelectionMetric:
        return "kl" if self.field == "max_kl" else "perplexity"

    @property
    def label(self) -> str:
        """What the measure is called in the report's ``quality_target``."""
        return "kl" if self.metric == "kl" else "ratio"

    def measure(self, scorer: PlanScorer, plan: Sequence[int], *, screen: bool = False) -> float:
        """The plan's measure on the full validation windows or (``screen``) the screening ones."""
        value = scorer.score(plan, screen=screen, metric=self.metric)
        return value if self.metric == "kl" else value / scorer.score([], screen=screen, metric="perplexity")

    def describe(self, value: float) -> str:
        """What a plan measuring ``value`` raised, for a refusal."""
        if self.metric == "kl":
            return f"the validation mean KL from the dense model to {value:.3g} nats"
        return f"validation perplexity to {value:.3g}x the dense model's"


@dataclass(frozen=True)
class QualityOutcome:
    """What a quality target chose: the budget, its best plan's measure, and the measure one block further."""

    bound: QualityBound
    dense_validation_perplexity: float
    num_layers: int
    value: float
    next_value: float | None  # None when no further block could be removed

    def summary(self) -> dict[str, Any]:
        """The report's ``selection.quality_target``: ``{field: limit, "dense_validation_perplexity",
        "num_layers", label: value, "next_" + label: next value}``, e.g. ``max_perplexity_ratio`` with
        ``ratio`` and ``next_ratio``, ``max_kl`` with ``kl`` and ``next_kl``."""
        label = self.bound.label
        return {
            self.bound.field: self.bound.limit,
            "dense_validation_perplexity": self.dense_validation_perplexity,
            "num_layers": self.num_layers,
            label: self.value,
            f"next_{label}": self.next_value,
        }


@dataclass
class PlanChoice:
    """The plan to apply, the candidates it was chosen from, its heal fits and what choosing cost.

    ``scores``: the validation perplexity of each candidate measured in full, as it ships; ``kl``: their
    validation mean KL from the dense model, where the job measured it (``metric`` kl, or a ``max_kl``
    target); ``metric``: which of the two chose the plan.
    """

    n: int
    chosen: Selection
    chosen_name: str
    plans: dict[str, Selection]
    scores: dict[str, float]
    heal: Heal
    fits: list[Fit]
    heal_tokens: int
    evaluations: int
    screenings: int
    heal_fits: int
    cache_s: float
    scoring_s: float
    quality: QualityOutcome | None = None
    search_path: list[Step] = field(default_factory=list)
    heal_reason: str | None = None  # why the cuts ship unhealed, when they do
    scorer: PlanScorer | None = None  # what scored the candidates, for more plans (the budget curve)
    kl: dict[str, float] = field(default_factory=dict)
    metric: SelectionMetric = "perplexity"


def choose_best(scores: dict[str, float], order: Sequence[str]) -> str:
    """The candidate with the lowest finite score; ties go to the earlier name in ``order``."""
    return min(order, key=lambda name: (scores[name] if math.isfinite(scores[name]) else math.inf, order.index(name)))


def hidden_size(model: Any) -> int:
    """The width of the model's residual stream (its input embeddings' dimension)."""
    return int(model.get_input_embeddings().embedding_dim)


def heal_unavailable(model: Any, heal_tokens: int | None = None) -> str | None:
    """Why this model's cuts cannot be healed here (architecture, or too few heal tokens), or None.

    A span's map has d x d entries, so the fit needs well over d calibration tokens: with fewer than
    ``MIN_TOKENS_PER_WIDTH * d`` heal tokens a map overfits them and hurts held-out text.
    """
    why = heal_refusal(model)
    if why is None and heal_tokens is not None:
        width = hidden_size(model)
        needed = MIN_TOKENS_PER_WIDTH * width
        if heal_tokens < needed:
            why = (
                f"fitting a {width} x {width} map needs at least {needed} calibration tokens "
                f"({MIN_TOKENS_PER_WIDTH} x the hidden size) and this job's capture windows give {heal_tokens}; "
                "raise calibration.num_samples or calibration.seq_len"
            )
    return why


def resolve_heal(model: Any, requested: Heal | None, heal_tokens: int | None = None) -> Heal:
    """``linear``, ``distill`` or ``none``: unset means ``linear`` wherever ``heal_unavailable`` finds no
    reason against.

    An explicit ``linear`` or ``distill`` (which starts from the linear maps) that cannot be applied is
    refused (field ``options.heal``).
    """
    why = heal_unavailable(model, heal_tokens)
    if folds_maps(requested) and why is not None:
        message = f"options.heal {requested!r} cannot be applied: {why}; or use 'none'"
        raise InvalidRequestError(message, field="options.heal")
    if requested is None:
        return "none" if why is not None else "linear"
    return requested


def heal_token_cap(width: int) -> int:
    """The most heal tokens kept for a model of hidden size ``width``: 8,192, or twice what a fit needs.

    A d x d fit needs ``MIN_TOKENS_PER_WIDTH * d`` tokens, so a fixed cap would leave every wide model
    (d = 4,096 for 8B models, 8,192 for 70B) unhealed whatever its calibration; the cap grows with the
    width, and so do the kept states (tokens x d per block, held where the capture holds its states).
    """
    return max(HEAL_MAX_TOKENS, 2 * MIN_TOKENS_PER_WIDTH * width)


def heal_windows(capture: TokenWindows, width: int, max_tokens: int | None = None) -> TokenWindows:
    """The first capture windows, at most ``max_tokens`` tokens (default :func:`heal_token_cap` of
    ``width``; and at least one window)."""
    max_tokens = heal_token_cap(width) if max_tokens is None else max_tokens
    count = max(1, min(capture.num_windows, max_tokens // max(int(capture.input_ids.shape[1]), 1)))
    return TokenWindows(
        input_ids=capture.input_ids[:count],
        attention_mask=capture.attention_mask[:count],
        starts=capture.starts[:count],
    )


class _Chooser:
    def __init__(
        self,
        spec: PruneSpec,
        scorer: PlanScorer,
        S: np.ndarray,
        D: np.ndarray | None,
        n_blocks: int,
        should_cancel: Callable[[], bool] | None,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        self.spec, self.scorer, self.S, self.D = spec, scorer, S, D
        self.progress = progress
        self.expected = spec.target.num_layers or max(1, n_blocks // 3)
        self.opts = spec.options
        self.n_blocks = n_blocks
        self.search = GreedySearch(scorer, S, eligible_blocks(n_blocks, self.opts), should_cancel=should_cancel)

    def best_at(
        self, n: int, *, final: bool = True, finalists: int | None = None
    ) -> tuple[str, Selection, dict[str, Selection], dict[str, float]]:
        """(winner's name, its plan, every candidate, their scores) at budget ``n``.

        ``final=False`` compares screening scores; ``finalists=k`` screens every candidate and
        measures the best ``k`` in full; otherwise every candidate is measured in full.
        """
        method, opts = self.spec.method, self.opts
        if method == "search":
            return self._search_at(n, final=final)
        if method == "auto":
            candidates = candidate_plans(self.S, self.D, n, opts)
        else:
            candidates = {method: select(method, self.S, self.D, n, opts)}
        names = list(candidates)
        if final and finalists is None and method == "auto":
            finalists = AUTO_FINALISTS
        if final and finalists is not None and len({_key(plan) for plan in candidates.values()}) > finalists:
            screened = self._scores(candidates, list(candidates), screen=True)
            ranked = sorted(names, key=lambda name: (screened[name], names.index(name)))
            best_plans = list(dict.fromkeys(_key(candidates[name]) for name in ranked))[:finalists]
            # Every name of a finalist plan (two methods may pick the same blocks): its score is free.
            names = [name for name in ranked if _key(candidates[name]) in best_plans]
        scores = self._scores(candidates, names, screen=not final)
        best = choose_best(scores, list(scores))
        return best, candidates[best], candidates, scores

    def _scores(self, plans: dict[str, Selection], names: list[str], *, screen: bool) -> dict[str, float]:
        """The named plans' scores, measured together (one pass over the blocks for all of them)."""
        scored = self.scorer.score_many([plans[name].pruned_layers for name in names], screen=screen)
        return dict(zip(names, scored, strict=True))

    def _search_at(self, n: int, *, final: bool) -> tuple[str, Selection, dict[str, Selection], dict[str, float]]:
        while len(self.search.plan) < n:
            self.search.step()
            if self.progress is not None:
                self.progress(len(self.search.plan), self.expected)
        step = self.search.path[n - 1]
        structure = analyze_structure(self.S, self.opts)
        plans: dict[str, Selection] = {"search": Selection("search", list(step.pruned_layers), structure, {})}
        if not final:  # its screening score, kept by the scorer since the step measured it
            return "search", plans["search"], plans, {"search": self.scorer.score(step.pruned_layers, screen=True)}
        seeds = candidate_plans(self.S, self.D, n, self.opts)
        screened = self._scores(seeds, list(seeds), screen=True)
        finalists = ["search", *sorted(screened, key=lambda name: screened[name])[:FINALIST_SEEDS]]
        plans.update(seeds)
        scores = self._scores(plans, finalists, screen=False)
        best = choose_best(scores, finalists)
        # Seeds that were only screened keep their screening score out of the report: it reads
        # fewer windows than the others and would not compare.
        return best, plans[best], plans, scores


def choose_plan(
    model: Any,
    S: np.ndarray,
    D: np.ndarray | None,
    data: CalibrationData,
    spec: PruneSpec,
    n_blocks: int,
    *,
    progress: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    heal_cache: StateCache | None = None,
    validation_cache: StateCache | None = None,
    spill: Path | None = None,
) -> PlanChoice:
    """Score the method's candidates on ``data.validation`` (healed as they will ship) and pick the plan.

    Args:
        model: the dense model, or a ``lorp.execution.Runner`` for it (left dense on return; the chosen
            plan's fits are in the result).
        S, D: the captured statistics.
        data: the calibration data: heal fits use its capture windows, scores its validation windows.
        spec: the job (method, target, options, batch size).
        n_blocks: the model's block count.
        progress: called as ``progress(done, total)``; ``total`` is an estimate for a quality target.
        should_cancel: checked between batches.
        heal_cache: the dense states of ``heal_windows(data.capture, d)`` when the capture kept them
            (``lorp.states.StateSink``); built here otherwise.
        validation_cache: the dense states of ``data.validation`` (a sequential job's, on disk); built
            here otherwise.
        spill: a folder the candidates' heal maps wait in (``CachedHealer``), for a job that should not
            hold them all; the chosen plan's stay there (``Fit.loaded`` holds one), so the caller keeps
            the folder while it uses them.
    """
    runner = as_runner(model)
    model = runner.model
    fit_on = heal_windows(data.capture, hidden_size(model))
    heal = resolve_heal(model, spec.options.heal, fit_on.num_tokens)
    heal_refusal_reason = (
        "options.heal is none" if spec.options.heal == "none" else heal_unavailable(model, fit_on.num_tokens)
    )
    started = time.perf_counter()
    healer = None
    if folds_maps(heal):
        healer = _healer(runner, fit_on, spec.calibration.batch_size, heal_cache, should_cancel, spill)
    scorer = _scorer(runner, data.validation, spec, healer, validation_cache, should_cancel)
    cache_s = time.perf_counter() - started
    chooser = _Chooser(spec, scorer, S, D, n_blocks, should_cancel, progress)
    n, (name, chosen, plans, scores), quality = _best_for_target(chooser, scorer, spec, n_blocks, progress)
    fits = scorer.fits(chosen.pruned_layers)
    reason = heal_refusal_reason if heal == "none" else None
    unhealed = _better_unhealed(scorer, chosen, scores[name]) if fits else None
    if unhealed is not None:
        # A map can hurt held-out text (a long span it cannot stand in for): ship the plan unhealed.
        reason = f"the chosen plan scored better unhealed ({unhealed:.4g}) than healed ({scores[name]:.4g})"
        heal, fits = "none", []
    perplexities, kls = _figures(scorer, plans, scores, unhealed=name if unhealed is not None else None)
    if progress is not None:
        progress(1, 1)
    return PlanChoice(
        n=n,
        chosen=chosen,
        chosen_name=name,
        plans=plans,
        scores=perplexities,
        heal=heal,
        fits=fits,
        heal_tokens=fit_on.num_tokens if healer is not None else 0,
        evaluations=scorer.evaluations,
        screenings=scorer.screenings,
        heal_fits=healer.fits_computed if healer is not None else 0,
        cache_s=round(cache_s, 3),
        scoring_s=round(scorer.seconds + (healer.seconds if healer is not None else 0.0), 3),
        quality=quality,
        search_path=list(chooser.search.path),
        heal_reason=reason,
        scorer=scorer,
        kl=kls,
        metric=scorer.metric,
    )


def _best_for_target(
    chooser: _Chooser,
    scorer: PlanScorer,
    spec: PruneSpec,
    n_blocks: int,
    progress: Callable[[int, int], None] | None,
) -> tuple[int, Best, QualityOutcome | None]:
    """The budget and the best plan at it: the target's block count, or for a quality target the
    largest count whose best plan keeps within the bound (with how that was found)."""
    bound = QualityBound.of(spec.target)
    if bound is not None:
        return _largest_within(chooser, scorer, bound, n_blocks, spec, progress)
    n = spec.target.blocks_for(n_blocks)
    return n, chooser.best_at(n), None


def _scorer(
    runner: Runner,
    validation: TokenWindows,
    spec: PruneSpec,
    healer: CachedHealer | None,
    validation_cache: StateCache | None,
    should_cancel: Callable[[], bool] | None,
) -> PlanScorer:
    """A job's scorer on the dense states of the validation windows (given, else computed now), by the
    job's selection metric, measuring KL too where a ``max_kl`` target needs it."""
    if validation_cache is None:
        validation_cache = StateCache(runner, validation, batch_size=spec.calibration.batch_size)
    return PlanScorer(
        runner,
        validation_cache,
        healer=healer,
        should_cancel=should_cancel,
        metric=spec.options.selection_metric,
        measure_kl=spec.target.max_kl is not None,
    )


def _healer(
    runner: Runner,
    fit_on: TokenWindows,
    batch_size: int,
    heal_cache: StateCache | None,
    should_cancel: Callable[[], bool] | None,
    spill: Path | None,
) -> CachedHealer:
    """A job's healer on the dense states of ``fit_on`` (those the capture kept, else computed now)."""
    if heal_cache is None:
        heal_cache = StateCache(runner, fit_on, batch_size=batch_size, should_cancel=should_cancel)
    return CachedHealer(runner, heal_cache, mode=HEAL_MODE, should_cancel=should_cancel, spill=spill)


def _better_unhealed(scorer: PlanScorer, chosen: Selection, healed: float) -> float | None:
    """The chosen plan's unhealed score when it beats its healed score ``healed``, else None; measured
    in full only where the screening windows say the plan may do better unhealed."""
    plan = chosen.pruned_layers
    if scorer.score(plan, healed=False, screen=True) >= scorer.score(plan, screen=True):
        return None
    unhealed = scorer.score(plan, healed=False)
    return unhealed if unhealed < healed else None


def _figures(
    scorer: PlanScorer, plans: dict[str, Selection], names: Iterable[str], unhealed: str | None
) -> tuple[dict[str, float], dict[str, float]]:
    """The named candidates' validation perplexity and (where the scorer measures it) mean KL, as they
    ship: ``unhealed`` (the chosen one, when it ships unhealed) as cut, the others as scored. Read from
    what choosing measured, not measured again."""
    perplexities: dict[str, float] = {}
    kls: dict[str, float] = {}
    for name in names:
        perplexity, kl = scorer.figures(plans[name].pruned_layers, healed=False if name == unhealed else None)
        perplexities[name] = perplexity
        if kl is not None:
            kls[name] = kl
    return perplexities, kls


Best = tuple[str, Selection, dict[str, Selection], dict[str, float]]


def _key(plan: Selection) -> tuple[int, ...]:
    return tuple(sorted(plan.pruned_layers))


def _largest_within(
    chooser: _Chooser,
    scorer: PlanScorer,
    bound: QualityBound,
    n_blocks: int,
    spec: PruneSpec,
    progress: Callable[[int, int], None] | None,
) -> tuple[int, Best, QualityOutcome]:
    """Raise the budget while the best plan's screened measure stays within the bound, then confirm in full.

    The scan compares screening measures (the first validation windows; a perplexity ratio is over the
    dense model's perplexity there); the chosen budget is then measured on every window and stepped
    down while it exceeds the bound. ``next_value`` is the full-window measure of the best screened
    plan one block further.
    """
    limit = len(eligible_blocks(n_blocks, spec.options))
    within = 0
    over: Selection | None = None
    for n in range(1, limit + 1):
        try:
            validate_budget(n_blocks, n, spec.options)
        except BudgetError:
            break
        _, plan, _, _ = chooser.best_at(n, final=False)
        if progress is not None:
            progress(n, limit)
        if bound.measure(scorer, plan.pruned_layers, screen=True) > bound.limit:
            over = plan
            break
        within = n
    while within >= 1:
        best = chooser.best_at(within, final=True, finalists=FINALIST_SEEDS + 1)
        if bound.measure(scorer, best[1].pruned_layers) <= bound.limit:
            break
        over, within = best[1], within - 1
    if within < 1:
        first = bound.measure(scorer, over.pruned_layers) if over is not None else math.inf
        raise BudgetError(
            f"removing even one block raises {bound.describe(first)}, above target.{bound.field} {bound.limit}",
            field=f"target.{bound.field}",
        )
    return (
        within,
        best,
        QualityOutcome(
            bound=bound,
            dense_validation_perplexity=scorer.score([], metric="perplexity"),
            num_layers=within,
            value=bound.measure(scorer, best[1].pruned_layers),
            next_value=bound.measure(scorer, over.pruned_layers) if over is not None else None,
        ),
    )
