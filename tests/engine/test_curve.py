"""The budget curve (lorp.curve) and its chart: which budgets, which plans, what each costs.

- the default budgets spread over 1..n and end at n; a budget the model cannot be cut to is
  refused naming its index;
- every point is the selection function's own plan (the plan ``POST /v1/plans`` lists) with the
  scorer's score for exactly those blocks; a plan already scored is not measured again; angular
  has no points without D; a search's plans join at the budgets they reached;
- the chart is a PNG with the shipped plan starred;
- a curve drawn distilled carries each budget's distilled figure on its best plan, drawn as a dotted line.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from lorp.curve import best_points, budget_curve, check_budgets, curve_plans, default_budgets, with_distilled
from lorp.errors import InvalidRequestError
from lorp.execution import Runner
from lorp.report import plot_budget_curve
from lorp.result import BudgetCurve, CurvePoint
from lorp.scoring import PlanScorer
from lorp.selection import METHODS, SelectionOptions, analyze_structure
from lorp.similarity import capture_similarity
from lorp.states import StateCache

from .archs import build
from .helpers import windows


def test_default_budgets_spread_up_to_the_jobs_own() -> None:
    assert default_budgets(1) == [1]
    assert default_budgets(3) == [1, 2, 3]
    assert default_budgets(4) == [1, 2, 3, 4]
    assert default_budgets(10) == [2, 5, 8, 10]
    assert default_budgets(30, points=6) == [5, 10, 15, 20, 25, 30]


def test_a_budget_beyond_the_eligible_blocks_is_refused_by_index() -> None:
    options = SelectionOptions(protected_layers=[0, 1, 11])  # 9 of 12 blocks may go
    check_budgets([1, 9], 12, options)
    with pytest.raises(InvalidRequestError) as err:
        check_budgets([1, 9, 10], 12, options)
    assert err.value.field == "evaluation.curve_budgets.2"
    assert "9 blocks" in err.value.message and "got 10" in err.value.message


@pytest.fixture(scope="module")
def scored_model():
    model = build("llama", num_hidden_layers=8)
    stats = capture_similarity(model, windows(batch=6, length=16, seed=2), batch_size=3, angular="all_tokens")
    return model, stats


def test_points_are_the_methods_plans_scored_once_each(scored_model) -> None:
    model, stats = scored_model
    options = SelectionOptions()
    structure = analyze_structure(stats.S, options)
    scorer = PlanScorer(model, StateCache(model, windows(batch=4, length=16, seed=5), batch_size=2))
    already = METHODS["shortgpt"](stats.S, stats.D, 3, options).pruned_layers
    scorer.score(already)
    before = scorer.evaluations
    ticks: list[tuple[int, int]] = []
    curve = budget_curve(
        scorer,
        stats.S,
        stats.D,
        [1, 3],
        options,
        structure,
        searched={3: [2, 4, 5]},
        progress=lambda d, t: ticks.append((d, t)),
    )
    assert curve.healed is False
    assert curve.dense_validation_perplexity == scorer.score([])
    keys = [(p.method, p.budget) for p in curve.points]
    drawn = ("lorp", "shortgpt", "streamline", "angular")  # the built-in methods the registry puts on the curve
    assert keys == [*((m, 1) for m in drawn), *((m, 3) for m in drawn), ("search", 3)]
    for point in curve.points:
        expected = (
            [2, 4, 5]
            if point.method == "search"
            else METHODS[point.method](stats.S, stats.D, point.budget, options).pruned_layers
        )
        assert point.pruned_layers == expected
        assert point.validation_perplexity == scorer.score(expected)
    distinct = {tuple(sorted(p.pruned_layers)) for p in curve.points} | {()}
    # Every distinct block set (and the dense model) measured once; the one scored before was free.
    assert scorer.evaluations - before == len(distinct - {tuple(sorted(already))})
    assert ticks == [(2, 2)]  # one tick: every budget's plans are measured together


def test_every_budgets_plans_take_one_pass_over_the_blocks_in_sequential_mode(tmp_path) -> None:
    model = build("llama", num_hidden_layers=8)
    model.save_pretrained(tmp_path)
    runner = Runner.sequential(tmp_path, model.config, device="cpu", dtype=torch.float32)
    stats = capture_similarity(runner, windows(batch=4, length=16), batch_size=2)
    options = SelectionOptions()
    scorer = PlanScorer(runner, StateCache(runner, windows(batch=4, length=16, seed=5), batch_size=2))
    scorer.score([])
    budgets = [1, 2, 3]
    plans = curve_plans(stats.S, stats.D, budgets, options, analyze_structure(stats.S, options))
    assert len({n for _, n, _ in plans}) == 3 and min(min(p) for _, _, p in plans) < 5
    before = runner.block_loads
    curve = budget_curve(scorer, stats.S, stats.D, budgets, options, analyze_structure(stats.S, options))
    # One block-major pass for the three budgets' plans (a pass per budget would load the blocks from
    # each budget's earliest change again), with each plan's score what it scores alone.
    assert runner.block_loads - before <= 8
    for point in curve.points:
        assert point.validation_perplexity == pytest.approx(scorer.score(point.pruned_layers), rel=1e-9)


def test_angular_has_no_points_without_d(scored_model) -> None:
    model, stats = scored_model
    options = SelectionOptions()
    scorer = PlanScorer(model, StateCache(model, windows(batch=2, length=16, seed=5), batch_size=2))
    curve = budget_curve(scorer, stats.S, None, [2], options, analyze_structure(stats.S, options))
    assert [p.method for p in curve.points] == ["lorp", "shortgpt", "streamline"]


BLACK = np.array([0.0, 0.0, 0.0])


def _black_pixels(path) -> int:
    image = imread(path)[..., :3]
    return int((np.abs(image - BLACK).max(axis=-1) < 0.05).sum())


def test_the_chart_stars_the_shipped_plan(tmp_path) -> None:
    points = [
        CurvePoint(method, n, list(range(n)), value * n)
        for method, value in (("lorp", 30.0), ("shortgpt", 12.0), ("streamline", 11.0))
        for n in (1, 2, 3, 4)
    ]
    curve = BudgetCurve(healed=True, dense_validation_perplexity=9.5, points=points)
    starred = plot_budget_curve(tmp_path / "a.png", curve, chosen=("streamline_2", 4, 40.0), title="auto at 4")
    plain = plot_budget_curve(tmp_path / "b.png", curve)
    assert starred.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The star (and its legend entry) are the only black marks; text and axes are anti-aliased thin lines.
    assert _black_pixels(starred) > _black_pixels(plain) + 150


def _curve(values: dict[str, list[float]]) -> BudgetCurve:
    return BudgetCurve(
        healed=True,
        dense_validation_perplexity=9.5,
        points=[
            CurvePoint(method, n, list(range(n)), value)
            for method, scores in values.items()
            for n, value in zip((1, 2, 3), scores, strict=True)
        ],
    )


def test_the_distilled_line_goes_on_the_best_plan_at_each_budget(tmp_path) -> None:
    curve = _curve({"lorp": [12.0, 20.0, float("nan")], "shortgpt": [11.0, 25.0, 40.0], "streamline": [11.0, 21, 39]})
    best = best_points(curve)
    assert {n: (p.method, p.validation_perplexity) for n, p in best.items()} == {
        1: ("shortgpt", 11.0),  # the first of equals
        2: ("lorp", 20.0),
        3: ("streamline", 39.0),  # a non-finite score is never the best
    }
    distilled = with_distilled(curve, {1: 10.5, 2: 17.0})
    marked = {(p.method, p.budget): p.distilled_perplexity for p in distilled.points if p.distilled_perplexity}
    assert marked == {("shortgpt", 1): 10.5, ("lorp", 2): 17.0}
    assert [dataclasses.replace(p, distilled_perplexity=None) for p in distilled.points] == curve.points
    # The chart draws it as a dotted black line: more black than the same curve without it.
    plain = plot_budget_curve(tmp_path / "plain.png", curve)
    drawn = plot_budget_curve(tmp_path / "distilled.png", with_distilled(curve, {1: 10.5, 2: 17.0, 3: 30.0}))
    assert _black_pixels(drawn) > _black_pixels(plain) + 100
