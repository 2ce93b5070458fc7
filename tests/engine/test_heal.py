"""Healing a cut with a folded linear map (lorp.heal), fitted as jobs fit it (``lorp.scoring.CachedHealer``,
from cached dense states), pinned on tiny models of every architecture.

- the fold is exact algebra: after folding T into the anchor block, its output is Y + M T;
- a span that adds nothing is healed by the identity, and the healed pruned model equals the dense one;
- the least-squares fit recovers a known map, and never leaves the anchor's output further from the
  target than no healing;
- a sequential fit of a later span sees the model cut and healed before it; a dense one does not;
- architectures that normalise the MLP output before the residual add are refused by name;
- a healed and pruned model saves and reloads with equal logits.

(``tests/engine/test_scoring.py`` holds the healer's fits and healed scores to the independent
reference in ``tests/engine/reference.py``.)
"""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from lorp.blocks import decoder_blocks, remove_blocks
from lorp.errors import InvalidRequestError
from lorp.execution import Runner
from lorp.export import save_pruned, verify_reload
from lorp.heal import FitStatistics, HealMode, contiguous_spans, fold, fold_weights, heal_refusal
from lorp.planner import resolve_heal
from lorp.scoring import CachedHealer, PlanScorer, apply_fits
from lorp.states import StateCache

from .archs import build, probe
from .helpers import EXPERTS, FOLDABLE, REFUSED, windows
from .reference import anchor_outputs


def healer(model: torch.nn.Module, mode: HealMode = "dense") -> CachedHealer:
    """A job's healer (``dense``, as jobs fit, unless told) on the dense states of ``windows()``."""
    return CachedHealer(model, StateCache(model, windows(), batch_size=4), mode=mode)


def test_contiguous_spans() -> None:
    assert contiguous_spans([5, 2, 3, 9]) == [(2, 4), (5, 6), (9, 10)]
    assert contiguous_spans([]) == []


@pytest.mark.parametrize("name", FOLDABLE)
def test_the_fold_is_exact_algebra(name: str) -> None:
    # M is what the block adds for its MLP: a mixture of experts' routed sum, Granite's projection
    # output times its residual_multiplier (0.22 here); h - M is then the rest of the block.
    model = build(name)
    anchor = decoder_blocks(model)[1]
    ids = probe()
    runner = Runner(model)
    batch = runner.batch(ids, torch.ones_like(ids))
    ((m, h),) = anchor_outputs(runner, batch, [1])
    width = m.shape[-1]
    g = torch.Generator().manual_seed(5)
    T = torch.eye(width, dtype=torch.float64) + 0.1 * torch.randn(width, width, generator=g, dtype=torch.float64)
    fold(model, anchor, T)
    ((m_after, h_after),) = anchor_outputs(runner, batch, [1])
    expected = (h - m).double() + m.double() @ T
    torch.testing.assert_close(m_after.double(), m.double() @ T, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(h_after.double(), expected, rtol=1e-4, atol=1e-5)


# What a map folds into in a block with experts: the stacked down projection the model holds, a
# shared expert's, the experts' biases (a block without experts: its MLP's down projection).
_FOLDED_IN = {
    "mixtral": ["mlp.experts.down_proj"],
    "qwen2_moe": ["mlp.experts.down_proj", "mlp.shared_expert.down_proj.weight"],
    "qwen3_moe": ["mlp.experts.down_proj"],
    "olmoe": ["mlp.experts.down_proj"],
    "gpt_oss": ["mlp.experts.down_proj", "mlp.experts.down_proj_bias"],
}


@pytest.mark.parametrize("name", sorted(EXPERTS))
def test_a_map_folds_into_every_experts_output_at_every_block(name: str) -> None:
    model = build(name)
    with torch.no_grad():  # biases start at zero (gpt-oss's experts'): make the fold change them
        for parameter in (p for n, p in model.named_parameters() if n.endswith("bias") and not p.any()):
            parameter.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(1))
    runner = Runner(model)
    ids = probe()
    batch = runner.batch(ids, torch.ones_like(ids))
    width = model.config.hidden_size
    T = torch.eye(width, dtype=torch.float64) + 0.1 * torch.randn(
        width, width, generator=torch.Generator().manual_seed(5), dtype=torch.float64
    )
    kinds = set()
    for index, block in enumerate(decoder_blocks(model)):
        sparse = hasattr(block.mlp, "experts")
        kinds.add(sparse)
        assert sorted(fold_weights(model, block)) == (_FOLDED_IN[name] if sparse else ["mlp.down_proj.weight"])
        ((m, h),) = anchor_outputs(runner, batch, [index])
        fold(model, block, T)
        ((m_after, h_after),) = anchor_outputs(runner, batch, [index])
        torch.testing.assert_close(m_after.double(), m.double() @ T, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(h_after.double(), (h - m).double() + m.double() @ T, rtol=1e-4, atol=1e-5)
    # Qwen3-MoE's test model has blocks with experts and without (mlp_only_layers, decoder_sparse_step).
    assert kinds == ({True, False} if name == "qwen3_moe" else {True})


# What each refusal names: the norm the MLP output passes.
_REFUSED_FOR = {
    **dict.fromkeys(["gemma2", "gemma3_text", "olmo2", "olmo3", "exaone4"], "post_feedforward_layernorm"),
    "glm4": "post_mlp_layernorm",
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_architectures_whose_mlp_output_cannot_take_a_map_are_refused_by_name(name: str) -> None:
    model = build(name)
    reason = _REFUSED_FOR[name]
    assert reason in (heal_refusal(model) or "")
    with pytest.raises(InvalidRequestError) as err:
        resolve_heal(model, "linear", heal_tokens=10_000)  # a job asking for it: refused before any pass
    assert err.value.field == "options.heal" and reason in err.value.message
    for mode in ("dense", "sequential"):
        with pytest.raises(InvalidRequestError) as err:
            healer(model, mode).fits([2])
        assert err.value.field == "options.heal" and reason in err.value.message


def test_an_opt_model_with_post_layer_norm_is_refused() -> None:
    model = build("opt", do_layer_norm_before=False)
    with pytest.raises(InvalidRequestError, match="do_layer_norm_before"):
        resolve_heal(model, "linear", heal_tokens=10_000)
    with pytest.raises(InvalidRequestError, match="do_layer_norm_before"):
        healer(model).fits([2])


def _silence(block: torch.nn.Module) -> None:
    """Make a Llama block add nothing: its attention output and MLP output projections are zero."""
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()


@pytest.mark.parametrize("mode", ["sequential", "dense"])
def test_a_span_that_adds_nothing_is_healed_by_the_identity(mode: str) -> None:
    model = build("llama", num_hidden_layers=6)
    blocks = decoder_blocks(model)
    for b in (2, 4):
        _silence(blocks[b])
    ids = probe()
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    before = [blocks[a].mlp.down_proj.weight.detach().clone() for a in (1, 3)]
    fits = healer(model, mode).fits([2, 4])
    assert [(f.span.start, f.span.end, f.anchor) for f in fits] == [(2, 3, 1), (4, 5, 3)]
    for fit in fits:
        assert fit.span.residual_before == pytest.approx(0.0, abs=1e-5)
        assert fit.span.residual_after == pytest.approx(0.0, abs=1e-6)
        assert fit.span.num_tokens == 6 * 12 - 3
    apply_fits(model, fits)  # as a job folds the chosen plan's maps, before removing its blocks
    for a, weight in zip((1, 3), before, strict=True):
        torch.testing.assert_close(blocks[a].mlp.down_proj.weight, weight, rtol=1e-5, atol=1e-6)
    remove_blocks(model, [2, 4])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, dense, rtol=1e-4, atol=1e-4)


def test_the_fit_recovers_a_known_map_from_the_statistics() -> None:
    g = torch.Generator().manual_seed(7)
    m = torch.randn(500, 8, generator=g, dtype=torch.float64)
    A = torch.randn(8, 8, generator=g, dtype=torch.float64)
    stats = FitStatistics(torch.device("cpu"))
    for part in range(5):  # accumulated batch by batch, as over calibration windows
        rows = slice(100 * part, 100 * (part + 1))
        stats.add(m[rows], m[rows] @ A)
    T, before, after = stats.solve(ridge=1e-10)
    torch.testing.assert_close(T, A, rtol=1e-6, atol=1e-6)
    assert after < 1e-6 and before == pytest.approx(float(torch.linalg.norm(m - m @ A) / torch.linalg.norm(m @ A)))
    assert stats.tokens == 500


def _statistics(width: int, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """M and Z whose fit is neither exact nor the identity, in float64."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(tokens, width, generator=g, dtype=torch.float64)
    mix = torch.eye(width, dtype=torch.float64) + 0.3 * torch.randn(width, width, generator=g, dtype=torch.float64)
    return m, m @ mix + torch.randn(tokens, width, generator=g, dtype=torch.float64), mix


@pytest.mark.parametrize("shared", [False, True])
def test_the_solve_is_the_ridge_solution_with_its_residuals_in_at_most_four_d_by_d_matrices(shared: bool) -> None:
    # A Cholesky factor formed in place (in M^T M itself when the statistics own it, else in one copy)
    # and T solved in place in a copy of M^T Z: what the solve allocates is two matrices at most (its
    # copy of M^T M, shared, and T), where torch.linalg.solve on copies of both allocated four. The
    # residual with T comes from the system, not from a product M^T M T: it must still be ||M T - Z||.
    width, ridge = 128, 1e-2
    m, z, _ = _statistics(width, 400, seed=3)
    stats = FitStatistics(torch.device("cpu"))
    if shared:
        gram = m.T @ m
        stats.use_gram(gram, shared=True)
        stats.add(m, z, gram=False)
    else:
        stats.add(m, z)
    mtm, mtz = m.T @ m, stats.mtz.clone()
    torch.testing.assert_close(stats.mtm, mtm, rtol=1e-12, atol=1e-9)  # accumulated into, as a sum
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as run:
        T, before, after = stats.solve(ridge=ridge)
    allocated = sum(event.self_cpu_memory_usage for event in run.events() if event.self_cpu_memory_usage > 0)
    assert allocated <= (2.5 if shared else 1.5) * width * width * 8
    lam = ridge * float(torch.trace(mtm)) / width
    eye = torch.eye(width, dtype=torch.float64)
    torch.testing.assert_close(T, torch.linalg.solve(mtm + lam * eye, mtz + lam * eye), rtol=1e-10, atol=1e-12)
    zn = float(torch.linalg.norm(z))
    assert before == pytest.approx(float(torch.linalg.norm(m - z)) / zn, rel=1e-9)
    assert after == pytest.approx(float(torch.linalg.norm(m @ T - z)) / zn, rel=1e-9)
    assert 0 < after < before
    assert torch.equal(stats.mtz, mtz)  # read by the residual after the solve
    if shared:
        assert torch.equal(gram, m.T @ m)  # a cache's M^T M is left alone
        assert torch.equal(stats.solve(ridge=ridge)[0], T)  # and can be solved again
    else:
        with pytest.raises(ValueError, match="spent"):  # its own M^T M now holds the factor
            stats.solve(ridge=ridge)


@pytest.mark.parametrize("name", ["llama", "gpt2", "gpt_neox", "opt", "falcon", "phi3"])
def test_healing_never_moves_the_anchor_output_away_from_the_target(name: str) -> None:
    model = build(name, **({"n_layer": 6} if name == "gpt2" else {"num_hidden_layers": 6}))
    for mode in ("dense", "sequential"):  # one span: fitted on the dense model either way
        (fit,) = healer(model, mode).fits([2, 3])
        assert (fit.span.start, fit.span.end, fit.anchor) == (2, 4, 1)
        assert 0.0 <= fit.span.residual_after <= fit.span.residual_before


def test_sequential_fits_each_span_on_the_model_healed_before_it() -> None:
    # Two spans: the second one's statistics come from the model with the first span removed and
    # healed, so sequential and dense fits of it differ; with one span they are the same fit.
    six = build("llama", num_hidden_layers=6)
    (one_seq,), (one_dense,) = healer(six, "sequential").fits([3]), healer(six, "dense").fits([3])
    assert one_seq.span == one_dense.span and torch.equal(one_seq.T, one_dense.T)
    eight = build("llama", num_hidden_layers=8)
    fits_seq, fits_dense = healer(eight, "sequential").fits([2, 5]), healer(eight, "dense").fits([2, 5])
    assert fits_seq[0].span == fits_dense[0].span and torch.equal(fits_seq[0].T, fits_dense[0].T)
    assert fits_seq[1].span.residual_before != pytest.approx(fits_dense[1].span.residual_before)


def test_a_span_at_block_0_has_no_anchor_and_is_left_alone() -> None:
    model = build("llama")
    fit_on = healer(model)
    assert fit_on.fits([0]) == [] and fit_on.fits([0, 1]) == [] and fit_on.fits_computed == 0
    scorer = PlanScorer(model, StateCache(model, windows(seed=9), batch_size=4), healer=fit_on)
    assert scorer.score([0]) == scorer.score([0], healed=False)  # scored healed, it is the plain cut


def test_a_healed_pruned_model_saves_and_reloads_with_equal_logits(tmp_path, tiny_tokenizer) -> None:
    model = build("llama", num_hidden_layers=6)
    apply_fits(model, healer(model).fits([2, 3]))
    remove_blocks(model, [2, 3])
    out = save_pruned(model, tiny_tokenizer, tmp_path / "healed")
    check = verify_reload(out, model, probe())
    assert check["num_layers"] == 4 and check["max_abs_logit_diff"] <= 1e-5
