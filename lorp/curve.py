"""The budget curve: each one-pass method's plan at several budgets, scored on the validation windows.

The plans are the ones ``POST /v1/plans`` lists for the same statistics and options (the same
selection functions on the same S and D); the curve adds what the service cannot compute without
the model: each plan's validation perplexity, scored the way the job scores its candidates (healed
when the job heals, by the same ``PlanScorer``, so a plan the job already scored costs nothing). A
job that ran ``search`` adds its searched plan at each budget it reached. A distilling job can have
the best plan at each budget distilled too (``evaluation.curve_distill``: :func:`best_points`,
:func:`with_distilled`; the pipeline runs the distillations).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from lorp.errors import InvalidRequestError
from lorp.result import BudgetCurve, CurvePoint
from lorp.scoring import PlanScorer
from lorp.selection import METHODS, REGISTRY, SelectionOptions, Structure, curve_methods, eligible_blocks

DEFAULT_POINTS = 4
CURVE_FIELD = "evaluation.curve_budgets"


def default_budgets(n: int, points: int = DEFAULT_POINTS) -> list[int]:
    """At most ``points`` budgets spread evenly over 1..n, ending at n (the job's own budget)."""
    if n <= points:
        return list(range(1, n + 1))
    return sorted({max(1, round(n * (i + 1) / points)) for i in range(points)})


def check_budgets(budgets: Sequence[int], n_blocks: int, options: SelectionOptions) -> None:
    """Refuse a requested budget this model cannot be cut to (field ``evaluation.curve_budgets.i``)."""
    limit = len(eligible_blocks(n_blocks, options))
    for i, n in enumerate(budgets):
        if not 1 <= n <= limit:
            raise InvalidRequestError(
                f"a curve budget must remove between 1 and the {limit} blocks this {n_blocks}-block model "
                f"lets a plan remove, got {n}",
                field=f"{CURVE_FIELD}.{i}",
            )


def curve_plans(
    S: np.ndarray,
    D: np.ndarray | None,
    budgets: Sequence[int],
    options: SelectionOptions,
    structure: Structure,
    searched: dict[int, list[int]] | None = None,
) -> list[tuple[str, int, list[int]]]:
    """(method, budget, blocks) of every plan the curve scores: each registered method the curve draws
    (``lorp.selection.curve_methods``) at each budget where it has a plan, then the searched plan."""
    methods = [m for m in curve_methods() if not REGISTRY[m].needs_distance or D is not None]
    plans: list[tuple[str, int, list[int]]] = []
    for n in budgets:
        for name in methods:
            try:
                selection = METHODS[name](S, D, n, options, structure=structure)
            except InvalidRequestError:  # no such plan here (a budget, or a statistic, it lacks)
                continue
            plans.append((name, n, list(selection.pruned_layers)))
        if searched and n in searched:
            plans.append(("search", n, list(searched[n])))
    return plans


def budget_curve(
    scorer: PlanScorer,
    S: np.ndarray,
    D: np.ndarray | None,
    budgets: Sequence[int],
    options: SelectionOptions,
    structure: Structure,
    *,
    searched: dict[int, list[int]] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> BudgetCurve:
    """Every curve method's plan at every budget, scored; ``searched``: the search's plan per budget.

    A method that has no plan at a budget (``angular`` without D, a contiguous run the protected
    blocks break) has no point there.
    """
    plans = curve_plans(S, D, budgets, options, structure, searched)
    dense = scorer.score([], metric="perplexity")  # the curve is in perplexity whatever chose the plan
    # Every budget's plans measured together: one pass over the blocks from the earliest change of any
    # of them (the scorer splits it only where the plans' states in flight would exceed its bound).
    scores = scorer.score_many([pruned for _, _, pruned in plans], metric="perplexity")
    points = [CurvePoint(name, n, pruned, score) for (name, n, pruned), score in zip(plans, scores, strict=True)]
    if progress is not None:
        progress(len(budgets), len(budgets))
    return BudgetCurve(healed=scorer.heals, dense_validation_perplexity=dense, points=points)


def best_points(curve: BudgetCurve) -> dict[int, CurvePoint]:
    """The point with the lowest finite validation perplexity at each budget (the first of equals), by budget."""
    best: dict[int, CurvePoint] = {}
    for point in curve.points:
        if not np.isfinite(point.validation_perplexity):
            continue
        held = best.get(point.budget)
        if held is None or point.validation_perplexity < held.validation_perplexity:
            best[point.budget] = point
    return dict(sorted(best.items()))


def with_distilled(curve: BudgetCurve, distilled: dict[int, float]) -> BudgetCurve:
    """``curve`` with ``distilled[n]`` put on the best point at each budget ``n`` (:func:`best_points`)."""
    best = {id(point): n for n, point in best_points(curve).items() if n in distilled}
    points = [
        dataclasses.replace(point, distilled_perplexity=distilled[best[id(point)]]) if id(point) in best else point
        for point in curve.points
    ]
    return dataclasses.replace(curve, points=points)
