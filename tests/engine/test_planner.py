"""Choosing the plan that ships (lorp.planner, lorp.search) through the whole job on a tiny model.

- ``heal`` unset means linear where a map can be folded and fitted, none (with the reason) where not;
  an explicit ``linear`` that cannot apply is refused naming ``options.heal``;
- a healed job reports each span's fit, its reload check compares the healed model, and healing
  changed the shipped weights;
- ``auto`` screens every candidate and measures only its finalists in full;
- ``search`` grows its plan one block per step, keeps the best of it and the one-pass finalists,
  and can be cancelled mid-search;
- a ``max_perplexity_ratio`` target cuts the most blocks within the bound and reports the ratio
  one block further.
"""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorp.calibration import TokenWindows
from lorp.errors import BudgetError, InvalidRequestError, JobCancelled
from lorp.pipeline import run_prune
from lorp.planner import (
    AUTO_FINALISTS,
    HEAL_MAX_TOKENS,
    MIN_TOKENS_PER_WIDTH,
    heal_unavailable,
    heal_windows,
    resolve_heal,
)
from lorp.scoring import PlanScorer
from lorp.search import GreedySearch
from lorp.spec import CalibrationSpec, EvaluationSpec, SelectionOptions, TargetSpec
from lorp.states import StateCache

from .archs import build
from .helpers import make_spec, windows

QUIET = EvaluationSpec(perplexity=False, speed=False)


def test_heal_unset_resolves_by_architecture_and_token_count() -> None:
    llama, gemma2 = build("llama"), build("gemma2")
    assert resolve_heal(llama, None, heal_tokens=4 * 32) == "linear"
    assert resolve_heal(llama, None, heal_tokens=4 * 32 - 1) == "none"
    assert "calibration tokens" in (heal_unavailable(llama, 100) or "")
    assert resolve_heal(gemma2, None) == "none"
    assert resolve_heal(llama, "none", heal_tokens=10_000) == "none"
    for model, tokens in ((gemma2, 10_000), (llama, 100)):
        with pytest.raises(InvalidRequestError) as info:
            resolve_heal(model, "linear", heal_tokens=tokens)
        assert info.value.field == "options.heal"


def test_explicit_linear_with_too_few_tokens_is_refused_before_the_capture(tiny_model_dir, corpus_files, tmp_path):
    stages: list[str] = []
    spec = make_spec(
        tiny_model_dir,
        corpus_files,
        calibration=CalibrationSpec(dataset=str(corpus_files[0]), num_samples=2, seq_len=16),
        options=SelectionOptions(heal="linear"),
    )
    with pytest.raises(InvalidRequestError) as info:
        run_prune(spec, tmp_path / "few", progress=lambda stage, _f: stages.append(stage))
    assert info.value.field == "options.heal" and "capture" not in stages


def test_a_healed_job_reports_its_spans_and_ships_the_healed_weights(tiny_model_dir, corpus_files, tmp_path):
    spec = make_spec(tiny_model_dir, corpus_files, method="shortgpt", evaluation=QUIET)
    report = run_prune(spec, tmp_path / "healed").report
    assert report.heal.method == "linear" and report.heal.mode == "dense"
    spans = report.heal.spans
    assert spans and all(s["anchor"] == s["start"] - 1 for s in spans)
    assert all(0.0 <= s["residual_after"] <= s["residual_before"] for s in spans)
    assert report.reload_check["max_abs_logit_diff"] <= 1e-5

    unhealed = run_prune(
        make_spec(
            tiny_model_dir, corpus_files, method="shortgpt", evaluation=QUIET, options=SelectionOptions(heal="none")
        ),
        tmp_path / "unhealed",
    ).report
    assert unhealed.heal.method == "none" and unhealed.heal.reason == "options.heal is none"
    assert unhealed.chosen.pruned_layers == report.chosen.pruned_layers
    healed_model = AutoModelForCausalLM.from_pretrained(tmp_path / "healed" / "model")
    plain_model = AutoModelForCausalLM.from_pretrained(tmp_path / "unhealed" / "model")
    anchor = spans[0]["anchor"]  # its index is the same in the pruned model: blocks before a cut keep theirs
    a = healed_model.model.layers[anchor].mlp.down_proj.weight
    b = plain_model.model.layers[anchor].mlp.down_proj.weight
    assert not torch.equal(a, b)
    other = [i for i in range(len(plain_model.model.layers)) if i not in {s["anchor"] for s in spans}]
    for i in other:  # nothing else moved
        assert torch.equal(
            healed_model.model.layers[i].mlp.down_proj.weight, plain_model.model.layers[i].mlp.down_proj.weight
        )


def test_greedy_search_keeps_the_best_screened_addition() -> None:
    model = build("llama", num_hidden_layers=8)
    scorer = PlanScorer(model, StateCache(model, windows(batch=8, length=12), batch_size=4), screen_windows=4)
    S = torch.rand(9, 9, generator=torch.Generator().manual_seed(0)).double().numpy()
    search = GreedySearch(scorer, S, eligible=list(range(1, 7)), width=2)
    shortlist = search.shortlist()
    assert shortlist == sorted(range(1, 7), key=lambda b: (-S[b, b + 1], b))[:2]  # most redundant first
    first = search.step()
    assert first.pruned_layers == [min(shortlist, key=lambda b: scorer.score([b], screen=True))]
    (block,) = first.pruned_layers
    shortlist = search.shortlist()
    assert {block - 1, block + 1} & set(range(1, 7)) <= set(shortlist)  # the span's neighbours are tried
    second = search.step()
    expected = min(shortlist, key=lambda b: scorer.score([block, b], screen=True))
    assert second.pruned_layers == sorted([block, expected]) and second.tried == len(shortlist)
    assert scorer.evaluations == 0 and scorer.screenings > 0  # steps compare screening scores only


def test_search_job_reports_its_path_and_keeps_the_best_finalist(tiny_model_dir, corpus_files, tmp_path):
    seen: list[tuple[str, float]] = []
    spec = make_spec(tiny_model_dir, corpus_files, method="search", target=TargetSpec(num_layers=3), evaluation=QUIET)
    result = run_prune(spec, tmp_path / "search", progress=lambda s, f: seen.append((s, f)))
    report = json.loads((result.out_dir / "report.json").read_text())
    path = report["selection"]["search_path"]
    assert [step["num_layers"] for step in path] == [1, 2, 3]
    for smaller, larger in itertools.pairwise(path):
        assert set(smaller["pruned_layers"]) < set(larger["pruned_layers"])
    assert report["plans"]["search"]["pruned_layers"] == path[-1]["pruned_layers"]
    measured = {k: v["validation_perplexity"] for k, v in report["plans"].items() if v["validation_perplexity"]}
    assert "search" in measured and len(measured) == 3  # the searched plan and two one-pass finalists
    assert measured[report["chosen"]["candidate"]] == min(measured.values())
    distinct = {tuple(sorted(report["plans"][name]["pruned_layers"])) for name in measured}
    assert report["selection"]["evaluations"] >= len(distinct) and report["selection"]["screenings"] > 0
    assert any(stage == "selection" and 0 < f < 1 for stage, f in seen)


def test_auto_screens_every_candidate_and_measures_only_its_finalists(tiny_model_dir, corpus_files, tmp_path):
    """A full measure of a plan costs about half a capture: auto screens its dozen candidates on the
    first validation windows and measures the best AUTO_FINALISTS distinct plans in full."""
    spec = make_spec(tiny_model_dir, corpus_files, method="auto", target=TargetSpec(num_layers=3), evaluation=QUIET)
    report = json.loads((run_prune(spec, tmp_path / "auto").out_dir / "report.json").read_text())
    plans = {name: tuple(sorted(plan["pruned_layers"])) for name, plan in report["plans"].items()}
    measured = {k: v["validation_perplexity"] for k, v in report["plans"].items() if v["validation_perplexity"]}
    distinct = set(plans.values())
    assert len(distinct) > AUTO_FINALISTS, "the test needs more candidates than finalists"
    assert len({plans[name] for name in measured}) == AUTO_FINALISTS
    # Names that chose the same blocks share one measure.
    assert all(name in measured for name in plans if plans[name] in {plans[m] for m in measured})
    assert measured[report["chosen"]["candidate"]] == min(measured.values())
    assert report["selection"]["screenings"] >= len(distinct)
    assert report["selection"]["evaluations"] <= AUTO_FINALISTS + 1  # + the plan unhealed, if screening asks


def test_cancel_mid_search_stops_the_job(tiny_model_dir, corpus_files, tmp_path):
    stage = {"now": "", "checks": 0}

    def progress(name: str, _fraction: float) -> None:
        stage["now"] = name

    def cancel() -> bool:
        if stage["now"] != "selection":
            return False
        stage["checks"] += 1
        return stage["checks"] > 5  # some batches of the search have run

    spec = make_spec(tiny_model_dir, corpus_files, method="search", target=TargetSpec(num_layers=3), evaluation=QUIET)
    with pytest.raises(JobCancelled):
        run_prune(spec, tmp_path / "cancelled", progress=progress, should_cancel=cancel)
    assert stage["now"] == "selection" and stage["checks"] == 6
    assert not (tmp_path / "cancelled" / "model").exists()


@pytest.mark.parametrize("method", ["auto", "search"])
def test_a_quality_target_cuts_the_most_blocks_within_the_bound(trained_model_dir, structured_corpus, tmp_path, method):
    spec = make_spec(
        trained_model_dir,
        structured_corpus,
        method=method,
        target=TargetSpec(max_perplexity_ratio=1.2),
        evaluation=QUIET,
    )
    report = run_prune(spec, tmp_path / method).report
    quality = report.selection.quality_target
    assert quality is not None and quality["num_layers"] == report.num_layers_removed >= 1
    assert 1.0 < quality["ratio"] <= 1.2
    assert quality["next_ratio"] is None or quality["next_ratio"] > 1.2
    chosen = report.plans[report.chosen.candidate].validation_perplexity
    assert chosen == pytest.approx(quality["ratio"] * quality["dense_validation_perplexity"])


def test_a_quality_target_no_plan_meets_is_a_budget_error(trained_model_dir, structured_corpus, tmp_path):
    # Only block 0 may go (the embedding's own block, with no block before it to heal into).
    spec = make_spec(
        trained_model_dir,
        structured_corpus,
        target=TargetSpec(max_perplexity_ratio=1.01),
        options=SelectionOptions(protected_layers=tuple(range(1, 8))),
        evaluation=QUIET,
    )
    with pytest.raises(BudgetError) as info:
        run_prune(spec, tmp_path / "strict")
    assert info.value.field == "target.max_perplexity_ratio" and "above target.max_perplexity_ratio 1.01" in str(
        info.value
    )


def test_target_kinds_are_exclusive() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        TargetSpec(num_layers=2, max_perplexity_ratio=1.5)
    with pytest.raises(ValueError):
        TargetSpec(max_perplexity_ratio=1.0)
    with pytest.raises(BudgetError) as info:
        TargetSpec(max_perplexity_ratio=1.5).blocks_for(30)
    assert info.value.field == "target.max_perplexity_ratio"
    with pytest.raises(ValueError, match="exactly one of num_layers, ratio, max_perplexity_ratio or max_kl"):
        TargetSpec(max_perplexity_ratio=1.5, max_kl=0.1)
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError):
            TargetSpec(max_kl=bad)
    with pytest.raises(BudgetError) as info:
        TargetSpec(max_kl=0.1).blocks_for(30)
    assert info.value.field == "target.max_kl" and "a max_kl target has no block count" in str(info.value)
    assert TargetSpec(max_kl=0.1).is_quality_bound and not TargetSpec(num_layers=2).is_quality_bound


@pytest.mark.parametrize(("width", "kept"), [(576, 8192 // 512), (2048, 16384 // 512), (8192, 64)])
def test_heal_windows_grow_with_the_width_so_wide_models_can_heal(width: int, kept: int) -> None:
    # 64 capture windows of 512 tokens: a narrow model keeps 8,192 heal tokens as before; a wide one
    # keeps twice what its d x d fit needs (so that 8B and 70B models are not always left unhealed).
    capture = TokenWindows(
        input_ids=torch.zeros(64, 512, dtype=torch.long),
        attention_mask=torch.ones(64, 512, dtype=torch.long),
        starts=tuple(range(64)),
    )
    fit_on = heal_windows(capture, width)
    assert fit_on.num_windows == kept
    assert fit_on.num_tokens == max(HEAL_MAX_TOKENS, min(64 * 512, 2 * MIN_TOKENS_PER_WIDTH * width))
    assert fit_on.num_tokens >= min(64 * 512, MIN_TOKENS_PER_WIDTH * width)
