"""Cached-prefix scoring (lorp.states, lorp.scoring) equals running the whole pruned model.

- a plan's score from the cached dense states equals its perplexity with the blocks removed, on
  every architecture (sliding windows, ALiBi, learned positions, GPT-2's layer scaling);
- healed scores and fits from the cache equal the independent reference (``reference_heal_cuts``, in
  tests/engine/reference.py: passes over the windows, no cache) on the same windows, in both modes, and
  a fit a plan shares with an earlier one is reused;
- plans past the scorer's cap on states in flight are scored in several passes, with the same scores;
- cancelling between batches raises ``JobCancelled``;
- a plan's KL score (``metric="kl"``) is 0 for the dense model and, for a cut, the divergence of the
  pruned model's logits from the dense model's; a search by KL keeps the addition nearest the dense model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorp.blocks import pruned_view
from lorp.divergence import next_token_valid, token_divergence
from lorp.errors import JobCancelled
from lorp.evaluation import perplexity
from lorp.scoring import CachedHealer, PlanScorer
from lorp.search import GreedySearch
from lorp.states import StateCache

from .archs import ARCHS, six_blocks
from .helpers import FOLDABLE, tiny_llama, windows, windows_with_padding
from .reference import reference_heal_cuts

PLANS = [[], [2], [1, 2], [3, 4], [5], [1, 4, 5], [0, 3]]


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_cached_prefix_scores_equal_full_re_evaluation(name: str) -> None:
    model = six_blocks(name)
    data = windows(batch=5, length=12, seed=4)
    scorer = PlanScorer(model, StateCache(model, data, batch_size=2))
    for plan in PLANS:
        with pruned_view(model, plan):
            full = perplexity(model, data, batch_size=2)
        assert scorer.score(plan) == pytest.approx(full, rel=1e-5), plan
    assert scorer.evaluations == len(PLANS)
    scorer.score([2])
    assert scorer.evaluations == len(PLANS)  # a plan already scored is not measured again


def test_a_full_measure_after_a_screening_runs_only_the_windows_not_screened() -> None:
    model = six_blocks("llama")
    cache = StateCache(model, windows(batch=8, length=12, seed=4), batch_size=2)  # four batches
    fresh = PlanScorer(model, cache, healer=CachedHealer(model, cache, mode="dense"))
    full = fresh.score_many([[2], [3, 4]])
    runs_in_full = fresh.runner.block_runs
    scorer = PlanScorer(model, cache, healer=CachedHealer(model, cache, mode="dense"), screen_windows=2)
    screened = scorer.score_many([[2], [3, 4]], screen=True)
    before = scorer.runner.block_runs
    assert scorer.score_many([[2], [3, 4]]) == full  # exactly: the same sums, in the same order
    assert runs_in_full > 0 and (scorer.runner.block_runs - before) * 4 == runs_in_full * 3  # batches 2..4
    assert (scorer.screenings, scorer.evaluations) == (2, 2)
    assert scorer.score_many([[2], [3, 4]], screen=True) == screened  # read from the kept sums


def test_plans_past_the_state_cap_are_scored_in_several_passes_with_the_same_scores() -> None:
    model = six_blocks("llama")
    cache = StateCache(model, windows(batch=6, length=12, seed=4), batch_size=2)
    one_pass = PlanScorer(model, cache).score_many(PLANS)
    per_plan = sum(b.ids.numel() for b in cache.batches) * model.config.hidden_size * 4
    capped = PlanScorer(model, cache, group_state_bytes=2 * per_plan)  # two plans' states per pass
    passes = []
    run_plans = capped.runner.run_plans
    capped.runner.run_plans = lambda batches, plan_passes, **kw: (
        passes.append(len(plan_passes)) or run_plans(batches, plan_passes, **kw)
    )
    assert capped.score_many(PLANS) == one_pass  # exactly: the same sums per plan
    assert passes == [2, 2, 2, 1]


@pytest.mark.parametrize("mode", ["sequential", "dense"])
@pytest.mark.parametrize("name", ["llama", "gpt2", "opt", "falcon"])
def test_cached_heal_fits_and_healed_scores_equal_the_reference(name: str, mode: str) -> None:
    assert name in FOLDABLE
    fit_on, score_on = windows(batch=6, length=12, seed=3), windows(batch=4, length=12, seed=9)
    for plan in ([2, 3], [1, 4], [2, 4, 5]):
        model = six_blocks(name)
        healer = CachedHealer(model, StateCache(model, fit_on, batch_size=4), mode=mode)  # type: ignore[arg-type]
        scorer = PlanScorer(model, StateCache(model, score_on, batch_size=3), healer=healer)
        cached = scorer.score(plan)
        spans = [fit.span for fit in healer.fits(plan)]

        reference = six_blocks(name)
        expected = reference_heal_cuts(reference, plan, fit_on, batch_size=4, mode=mode)  # type: ignore[arg-type]
        with pruned_view(reference, plan):
            full = perplexity(reference, score_on, batch_size=3)
        assert cached == pytest.approx(full, rel=1e-4), plan
        assert [(s.start, s.end, s.anchor, s.num_tokens) for s in spans] == [
            (s.start, s.end, s.anchor, s.num_tokens) for s in expected
        ]
        for got, want in zip(spans, expected, strict=True):
            assert got.residual_after == pytest.approx(want.residual_after, rel=1e-4, abs=1e-6)
        # the dense model is left as it was
        dense = six_blocks(name)
        for (key, a), b in zip(model.state_dict().items(), dense.state_dict().values(), strict=True):
            assert torch.equal(a, b), key


@pytest.mark.parametrize("mode", ["sequential", "dense"])
def test_a_healer_that_spills_its_maps_to_disk_gives_the_same_fits_and_scores(mode: str, tmp_path: Path) -> None:
    model = six_blocks("llama")
    fit_on, score_on = windows(batch=6, length=12, seed=3), windows(batch=4, length=12, seed=9)
    held = CachedHealer(model, StateCache(model, fit_on, batch_size=4), mode=mode)  # type: ignore[arg-type]
    spilled = CachedHealer(model, StateCache(model, fit_on, batch_size=4), mode=mode, spill=tmp_path / "fits")  # type: ignore[arg-type]
    cache = StateCache(model, score_on, batch_size=3)
    scores = {}
    for healer in (held, spilled):
        scorer = PlanScorer(model, cache, healer=healer)
        scores[healer is spilled] = scorer.score_many([[2, 3], [2, 3, 5], [1, 4]])
    assert scores[True] == scores[False]
    got = spilled.fits([2, 3, 5])
    assert all(fit.held is None and fit.file is not None and fit.file.is_file() for fit in got)
    for fit, want in zip(got, held.fits([2, 3, 5]), strict=True):
        assert torch.equal(fit.T, want.T) and fit.span == want.span
        assert fit.loaded().held is not None and torch.equal(fit.loaded().T, want.T)
    assert len(list((tmp_path / "fits").glob("fit-*.pt"))) == spilled.fits_computed
    # The M^T M of each anchor fitted on the dense model waits in a file too: every span's in dense
    # mode, each plan's first span's in sequential mode (the later ones are fitted after a cut).
    anchors = {0, 1, 3, 4} if mode == "dense" else {0, 1}
    assert {p.name for p in (tmp_path / "fits").glob("mtm-*.pt")} == {f"mtm-{a:05d}.pt" for a in anchors}


def test_fits_a_plan_shares_with_an_earlier_one_are_reused() -> None:
    model = six_blocks("llama")
    healer = CachedHealer(model, StateCache(model, windows(), batch_size=3), mode="sequential")
    healer.fits([2, 3])
    assert healer.fits_computed == 1
    healer.fits([2, 3, 5])  # shares the first span and its fit; the second span is new
    assert healer.fits_computed == 2
    healer.fits([1, 3])  # a new first span, and so a new context for the second
    assert healer.fits_computed == 4
    dense = CachedHealer(model, StateCache(model, windows(), batch_size=3), mode="dense")
    dense.fits([2, 5])
    assert dense.fits_computed == 2
    dense.fits([1, 5])  # in dense mode a span's fit does not depend on the spans before it
    assert dense.fits_computed == 3


def test_cancel_between_batches_raises() -> None:
    model = six_blocks("llama")
    calls = {"n": 0}

    def cancel_on_second() -> bool:
        calls["n"] += 1
        return calls["n"] >= 2

    scorer = PlanScorer(model, StateCache(model, windows(), batch_size=2), should_cancel=cancel_on_second)
    with pytest.raises(JobCancelled):
        scorer.score([2])
    with pytest.raises(JobCancelled):
        StateCache(model, windows(), batch_size=2, should_cancel=lambda: True)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_the_capture_keeps_the_heal_states_so_healing_needs_no_second_pass(name: str) -> None:
    from lorp.similarity import capture_similarity
    from lorp.states import StateSink

    model = six_blocks(name)
    data = windows(batch=6, length=12, seed=3)
    sink = StateSink(max_windows=5, batch_size=4, dtype=torch.float32)
    capture_similarity(model, data, batch_size=4, keep_states=sink)
    kept = sink.cache()
    assert kept.windows.num_windows == 5 and [batch.num_windows for batch in kept.batches] == [4, 1]
    first_five = windows(batch=6, length=12, seed=3)
    first_five = type(first_five)(first_five.input_ids[:5], first_five.attention_mask[:5])
    direct = StateCache(model, first_five, batch_size=4)
    for b in range(direct.num_batches):
        real = direct.batches[b].real
        for j in range(direct.num_blocks + 1):
            assert torch.allclose(kept.state(b, j)[real], direct.state(b, j)[real], atol=1e-6)
    # The blocks' MLP outputs were kept too: a dense fit reads them and runs no block.
    assert direct.mlp_output(0, 2) is None and kept.mlp_output(0, 2) is not None
    capture_healer, pass_healer = CachedHealer(model, kept, mode="dense"), CachedHealer(model, direct, mode="dense")
    plan = [2, 3, 5]  # two spans: anchors 1 and 4
    from_capture, from_pass = capture_healer.fits(plan), pass_healer.fits(plan)
    assert (capture_healer.anchor_passes, pass_healer.anchor_passes) == (0, 2)
    for kept_fit, run_fit in zip(from_capture, from_pass, strict=True):
        assert kept_fit.span.residual_after == pytest.approx(run_fit.span.residual_after, rel=1e-5)
        assert torch.allclose(kept_fit.T, run_fit.T, atol=1e-6)


def test_a_longer_span_after_the_same_anchor_reuses_its_outputs_and_fits_the_same() -> None:
    model = six_blocks("llama")
    cache = StateCache(model, windows(), batch_size=4)
    healer = CachedHealer(model, cache, mode="dense")
    healer.fits([2, 3])
    (grown,) = healer.fits([2, 3, 4])  # span [2, 5): the same anchor, block 1
    assert list(healer._anchors) == [1]
    (fresh,) = CachedHealer(model, cache, mode="dense").fits([2, 3, 4])
    assert torch.allclose(grown.T, fresh.T) and grown.span == fresh.span


def test_the_kl_score_is_zero_for_the_dense_model_and_the_pruned_views_divergence_for_a_plan() -> None:
    model, data = tiny_llama(5), windows_with_padding()
    cache = StateCache(model, data, batch_size=2)
    scorer = PlanScorer(model, cache, metric="kl")
    assert scorer.score([]) == pytest.approx(0.0, abs=1e-7)
    plan = [1, 2]
    ids, mask = data.input_ids, data.attention_mask
    with torch.no_grad():
        dense_logits = model(input_ids=ids, attention_mask=mask).logits
        with pruned_view(model, plan):
            pruned_logits = model(input_ids=ids, attention_mask=mask).logits
            full = perplexity(model, data, batch_size=2)
    kl, _ = token_divergence(dense_logits, pruned_logits, next_token_valid(mask))
    assert float(kl.mean()) > 0
    assert scorer.score(plan) == pytest.approx(float(kl.mean()), rel=1e-4)
    # Perplexity comes from the same measure, read back without running a block.
    runs = scorer.runner.block_runs
    assert scorer.score(plan, metric="perplexity") == pytest.approx(full, rel=1e-5)
    assert scorer.figures(plan) == (scorer.score(plan, metric="perplexity"), scorer.score(plan))
    assert scorer.runner.block_runs == runs and scorer.evaluations == 2
    # A perplexity scorer measures no KL unless asked to; asked, it ranks by perplexity and keeps both.
    plain = PlanScorer(model, cache)
    assert plain.figures(plan) == (scorer.score(plan, metric="perplexity"), None)
    with pytest.raises(ValueError, match="does not measure KL"):
        plain.score(plan, metric="kl")
    both = PlanScorer(model, cache, measure_kl=True)
    assert both.score(plan) == plain.score(plan) and both.score(plan, metric="kl") == scorer.score(plan)
    assert torch.is_grad_enabled()  # the dense logits' pass leaves gradients as it found them


def test_a_search_by_kl_keeps_the_addition_nearest_the_dense_predictions() -> None:
    model = six_blocks("llama")
    scorer = PlanScorer(model, StateCache(model, windows(batch=8, length=12), batch_size=4), metric="kl")
    S = torch.rand(7, 7, generator=torch.Generator().manual_seed(1)).double().numpy()
    search = GreedySearch(scorer, S, eligible=list(range(1, 5)), width=3)
    shortlist = search.shortlist()
    step = search.step()
    assert step.pruned_layers == [min(shortlist, key=lambda b: scorer.score([b], screen=True))]
    assert step.validation_kl == scorer.score(step.pruned_layers, screen=True)
    assert step.validation_perplexity == scorer.score(step.pruned_layers, screen=True, metric="perplexity")
