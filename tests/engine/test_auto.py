"""Method auto: temporary pruned views, plan scoring, and the choice of the best plan.

Scoring and choosing are asserted on what jobs run (``lorp.planner.choose_plan``, ``lorp.scoring.PlanScorer``),
against the independent reference in ``tests/engine/reference.py`` (every candidate measured over a pruned view),
by validation perplexity and by the mean KL from the dense predictions (``options.selection_metric``), and
the most blocks a ``target.max_kl`` allows.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from lorp.blocks import decoder_blocks, pruned_view, remove_blocks
from lorp.calibration import CalibrationData, TokenWindows
from lorp.errors import BudgetError
from lorp.evaluation import perplexity
from lorp.planner import PlanChoice, choose_best, choose_plan
from lorp.scoring import PlanScorer
from lorp.similarity import capture_similarity
from lorp.spec import CalibrationSpec, ModelSpec, PruneSpec, SelectionOptions, TargetSpec
from lorp.states import StateCache

from .archs import ARCHS, build, probe
from .reference import reference_auto_select, reference_kl

VOCAB = 384


@pytest.fixture()
def qwen3() -> Qwen3ForCausalLM:
    # Qwen3 keeps per-layer `layer_types` in its config: the view must trim and restore them.
    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
    )
    return Qwen3ForCausalLM(cfg).eval()


def windows(rows: int = 4, length: int = 16, seed: int = 0) -> TokenWindows:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, length), generator=gen)
    return TokenWindows(input_ids=ids, attention_mask=torch.ones_like(ids))


def test_pruned_view_equals_real_removal_and_restores(qwen3):
    probe = windows(2, 10).input_ids
    with torch.no_grad():
        before = qwen3(input_ids=probe).logits
    config_before = qwen3.config.to_dict()
    real = copy.deepcopy(qwen3)
    remove_blocks(real, [1, 4])
    with torch.no_grad():
        expected = real(input_ids=probe).logits
        with pruned_view(qwen3, [1, 4]):
            assert len(decoder_blocks(qwen3)) == 4
            assert qwen3.config.num_hidden_layers == 4
            inside = qwen3(input_ids=probe).logits
            # generation with a cache works inside the view (layer indices renumbered)
            out = qwen3.generate(probe[:1], max_new_tokens=3, do_sample=False, use_cache=True)
            assert out.shape[1] == probe.shape[1] + 3
        after = qwen3(input_ids=probe).logits
    torch.testing.assert_close(inside, expected)
    torch.testing.assert_close(after, before)
    assert qwen3.config.to_dict() == config_before
    assert [b.self_attn.layer_idx for b in decoder_blocks(qwen3)] == list(range(6))


def test_pruned_view_restores_on_error(qwen3):
    with pytest.raises(RuntimeError), pruned_view(qwen3, [2]):
        raise RuntimeError("boom")
    assert len(decoder_blocks(qwen3)) == 6
    assert qwen3.config.num_hidden_layers == 6


def test_identical_plans_are_measured_once(qwen3):
    val = windows()
    scorer = PlanScorer(qwen3, StateCache(qwen3, val, batch_size=4))
    a, b, c = scorer.score_many([[1, 2], [3, 4], [2, 1]])  # [2, 1]: the blocks of [1, 2] in another order
    assert c == a
    assert (scorer.evaluations, scorer.screenings) == (2, 0)
    runs = scorer.runner.block_runs
    assert scorer.score([1, 2]) == a and scorer.runner.block_runs == runs  # kept, not measured again
    with pruned_view(qwen3, [3, 4]):
        assert b == pytest.approx(perplexity(qwen3, val), rel=1e-5)


def test_choose_best_lowest_then_order():
    assert choose_best({"x": 5.0, "y": 3.0, "z": 3.0}, ["x", "y", "z"]) == "y"
    assert choose_best({"x": float("nan"), "y": 9.0}, ["x", "y"]) == "y"
    assert choose_best({"x": float("inf"), "y": float("inf")}, ["x", "y"]) == "x"


def test_auto_picks_the_lowest_validation_perplexity(qwen3):
    capture, val = windows(4, 16, seed=1), windows(4, 16, seed=2)
    stats = capture_similarity(qwen3, capture)
    dense = {key: value.clone() for key, value in qwen3.state_dict().items()}
    spec = PruneSpec(
        model=ModelSpec(id="tiny-qwen3"),
        method="auto",
        target=TargetSpec(num_layers=2),
        calibration=CalibrationSpec(batch_size=4),
        options=SelectionOptions(heal="none"),
    )
    data = CalibrationData(capture=capture, validation=val, text_sha256="", num_stream_tokens=0)
    choice = choose_plan(qwen3, stats.S, stats.D, data, spec, 6)
    reference = reference_auto_select(qwen3, stats.S, stats.D, 2, val, batch_size=4)
    assert set(choice.plans) == set(reference.candidates)
    assert {"lorp", "shortgpt", "streamline", "angular", "reverse"} <= set(choice.plans)
    # Four validation windows: the screening reads them all, so each distinct plan is measured once, in full.
    plan_of = {name: tuple(sorted(plan.pruned_layers)) for name, plan in choice.plans.items()}
    assert choice.scorer is not None
    assert (choice.scorer.evaluations, choice.scorer.screenings) == (len(set(plan_of.values())), 0)
    for name, score in choice.scores.items():
        assert score == pytest.approx(reference.scores[name], rel=1e-5), name
        assert all(choice.scores[other] == score for other in choice.scores if plan_of[other] == plan_of[name])
    assert choice.scores[choice.chosen_name] == min(choice.scores.values())
    # the lowest of every candidate measured the direct way, not only of the finalists
    assert reference.scores[choice.chosen_name] == pytest.approx(reference.scores[reference.chosen], rel=1e-5)
    assert choice.chosen.pruned_layers == choice.plans[choice.chosen_name].pruned_layers
    assert choice.heal == "none" and choice.fits == []
    assert np.isfinite(choice.scores[choice.chosen_name])
    # the model is left dense
    assert len(decoder_blocks(qwen3)) == 6
    assert all(torch.equal(value, dense[key]) for key, value in qwen3.state_dict().items())


def test_auto_by_kl_picks_the_candidate_nearest_the_dense_predictions(qwen3):
    capture, val = windows(4, 16, seed=1), windows(4, 16, seed=2)
    stats = capture_similarity(qwen3, capture)
    spec = PruneSpec(
        model=ModelSpec(id="tiny-qwen3"),
        method="auto",
        target=TargetSpec(num_layers=2),
        calibration=CalibrationSpec(batch_size=4),
        options=SelectionOptions(heal="none", selection_metric="kl"),
    )
    data = CalibrationData(capture=capture, validation=val, text_sha256="", num_stream_tokens=0)
    choice = choose_plan(qwen3, stats.S, stats.D, data, spec, 6)
    by_kl = reference_auto_select(qwen3, stats.S, stats.D, 2, val, batch_size=4, metric="kl")
    by_perplexity = reference_auto_select(qwen3, stats.S, stats.D, 2, val, batch_size=4)
    assert choice.metric == "kl" and set(choice.plans) == set(by_kl.candidates)
    # The finalists measured in full carry both figures, each equal to the direct measure.
    assert choice.kl and set(choice.kl) == set(choice.scores)
    for name in choice.kl:
        assert choice.kl[name] == pytest.approx(by_kl.scores[name], rel=1e-4), name
        assert choice.scores[name] == pytest.approx(by_perplexity.scores[name], rel=1e-5), name
    # The lowest KL of every candidate measured the direct way, not only of the finalists.
    assert choice.kl[choice.chosen_name] == min(choice.kl.values())
    assert by_kl.scores[choice.chosen_name] == pytest.approx(by_kl.scores[by_kl.chosen], rel=1e-4)
    assert reference_kl(qwen3, choice.chosen.pruned_layers, val) == pytest.approx(
        choice.kl[choice.chosen_name], rel=1e-4
    )
    # Here the two metrics disagree, and KL decided: perplexity would have cut other blocks.
    lowest_perplexity = by_perplexity.candidates[by_perplexity.chosen].pruned_layers
    assert sorted(lowest_perplexity) != sorted(choice.chosen.pruned_layers)
    assert len(decoder_blocks(qwen3)) == 6


def test_a_max_kl_target_cuts_the_most_blocks_whose_best_plan_keeps_within_it(qwen3):
    capture, val = windows(4, 16, seed=1), windows(4, 16, seed=2)
    stats = capture_similarity(qwen3, capture)
    data = CalibrationData(capture=capture, validation=val, text_sha256="", num_stream_tokens=0)

    def choose(target: TargetSpec, metric: str = "kl") -> PlanChoice:
        options = SelectionOptions(heal="none", selection_metric=metric)
        spec = PruneSpec(model=ModelSpec(id="tiny-qwen3"), target=target, options=options)
        return choose_plan(qwen3, stats.S, stats.D, data, spec, 6)

    best = {n: choose(TargetSpec(num_layers=n)) for n in (1, 2, 3)}
    kl = {n: choice.kl[choice.chosen_name] for n, choice in best.items()}
    assert kl[1] < kl[2] < kl[3]  # (on this model each further block moves the predictions further)
    bound = math.sqrt(kl[2] * kl[3])
    choice = choose(TargetSpec(max_kl=bound))
    assert choice.n == 2 and sorted(choice.chosen.pruned_layers) == sorted(best[2].chosen.pruned_layers)
    quality = choice.quality
    assert quality is not None and quality.bound.field == "max_kl"
    assert quality.value == choice.kl[choice.chosen_name] == pytest.approx(kl[2]) and kl[2] <= bound
    # One block more breaks the bound: the best 3-block plan's KL is past it.
    assert quality.next_value == pytest.approx(kl[3]) and kl[3] > bound
    assert quality.summary() == {
        "max_kl": bound,
        "dense_validation_perplexity": choice.scorer.score([], metric="perplexity"),
        "num_layers": 2,
        "kl": quality.value,
        "next_kl": quality.next_value,
    }
    # A bound no single block keeps within names its field.
    with pytest.raises(BudgetError) as info:
        choose(TargetSpec(max_kl=kl[1] / 2))
    assert info.value.field == "target.max_kl" and f"above target.max_kl {kl[1] / 2}" in str(info.value)
    # Ranked by perplexity, the bound still reads each budget's best plan's KL (measured beside it).
    by_perplexity = choose(TargetSpec(max_kl=1.0), metric="perplexity")
    assert by_perplexity.metric == "perplexity" and by_perplexity.n == 4  # every eligible block
    assert by_perplexity.kl[by_perplexity.chosen_name] == by_perplexity.quality.value <= 1.0


@pytest.mark.parametrize("name", ["gpt2-inverse-scaling", *sorted(ARCHS)])
def test_pruned_view_is_exact_and_reversible_for_every_architecture(name):
    model = build("gpt2", scale_attn_by_inverse_layer_idx=True) if name == "gpt2-inverse-scaling" else build(name)
    ids = probe()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        real = copy.deepcopy(model)
        remove_blocks(real, [1, 2])
        expected = real(input_ids=ids).logits
        with pruned_view(model, [1, 2]):
            inside = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    torch.testing.assert_close(inside, expected)
    torch.testing.assert_close(after, before)
