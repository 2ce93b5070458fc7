"""Healing a cut with a folded linear map (lorp.heal), pinned on tiny models of every architecture.

- the fold is exact algebra: after folding T into the anchor block, its output is Y + M T;
- a span that adds nothing is healed by the identity, and the healed pruned model equals the dense one;
- the least-squares fit recovers a known map, and never leaves the anchor's output further from the
  target than no healing;
- architectures that normalise the MLP output before the residual add are refused by name;
- a healed and pruned model saves and reloads with equal logits.
"""

from __future__ import annotations

import pytest
import torch

from lorp.blocks import decoder_blocks, remove_blocks
from lorp.calibration import TokenWindows
from lorp.errors import InvalidRequestError
from lorp.execution import Runner
from lorp.export import save_pruned, verify_reload
from lorp.heal import (
    FitStatistics,
    _anchor_outputs,
    contiguous_spans,
    fold,
    heal_cuts,
    heal_refusal,
    output_projection,
)

from .archs import ARCHS, build, probe

REFUSED = {"gemma2", "gemma3_text", "olmo2", "olmo3"}
FOLDABLE = [name for name in ARCHS if name not in REFUSED]


def windows(batch: int = 6, length: int = 12, seed: int = 3) -> TokenWindows:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 384, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # padding is masked out of the statistics
    return TokenWindows(input_ids=ids, attention_mask=mask)


def test_contiguous_spans() -> None:
    assert contiguous_spans([5, 2, 3, 9]) == [(2, 4), (5, 6), (9, 10)]
    assert contiguous_spans([]) == []


@pytest.mark.parametrize("name", FOLDABLE)
def test_the_fold_is_exact_algebra(name: str) -> None:
    model = build(name)
    anchor = decoder_blocks(model)[1]
    ids = probe()
    runner = Runner(model)
    batch = runner.batch(ids, torch.ones_like(ids))
    ((m, h),) = _anchor_outputs(runner, batch, [1])
    width = m.shape[-1]
    g = torch.Generator().manual_seed(5)
    T = torch.eye(width, dtype=torch.float64) + 0.1 * torch.randn(width, width, generator=g, dtype=torch.float64)
    projection, kind = output_projection(model, anchor)
    fold(projection, kind, T)
    ((m_after, h_after),) = _anchor_outputs(runner, batch, [1])
    expected = (h - m).double() + m.double() @ T
    torch.testing.assert_close(m_after.double(), m.double() @ T, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(h_after.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_post_norm_architectures_are_refused_by_name(name: str) -> None:
    model = build(name)
    assert heal_refusal(model) is not None and "post_feedforward_layernorm" in heal_refusal(model)
    with pytest.raises(InvalidRequestError) as err:
        heal_cuts(model, [2], windows())
    assert err.value.field == "options.heal" and "normalises the MLP output" in err.value.message


def test_an_opt_model_with_post_layer_norm_is_refused() -> None:
    model = build("opt", do_layer_norm_before=False)
    with pytest.raises(InvalidRequestError, match="do_layer_norm_before"):
        heal_cuts(model, [2], windows())


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
    fits = heal_cuts(model, [2, 4], windows(), mode=mode)
    assert [(f.start, f.end, f.anchor) for f in fits] == [(2, 3, 1), (4, 5, 3)]
    for fit in fits:
        assert fit.residual_before == pytest.approx(0.0, abs=1e-5) and fit.residual_after == pytest.approx(
            0.0, abs=1e-6
        )
        assert fit.num_tokens == 6 * 12 - 3
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
    torch.testing.assert_close(stats.solve(ridge=1e-10), A, rtol=1e-6, atol=1e-6)
    assert stats.relative(stats.squared_error(A)) < 1e-8
    assert stats.tokens == 500


@pytest.mark.parametrize("name", ["llama", "gpt2", "gpt_neox", "opt", "falcon", "phi3"])
def test_healing_never_moves_the_anchor_output_away_from_the_target(name: str) -> None:
    model = build(name, **({"n_layer": 6} if name == "gpt2" else {"num_hidden_layers": 6}))
    fits = heal_cuts(model, [2, 3], windows())
    (fit,) = fits
    assert (fit.start, fit.end, fit.anchor) == (2, 4, 1)
    assert 0.0 <= fit.residual_after <= fit.residual_before


def test_sequential_fits_each_span_on_the_model_healed_before_it() -> None:
    # Two spans: the second one's statistics come from the model with the first span removed and
    # healed, so sequential and dense fits of it differ; with one span they are the same fit.
    one_seq, one_dense = build("llama", num_hidden_layers=6), build("llama", num_hidden_layers=6)
    assert heal_cuts(one_seq, [3], windows(), mode="sequential") == heal_cuts(one_dense, [3], windows(), mode="dense")
    seq, dense = build("llama", num_hidden_layers=8), build("llama", num_hidden_layers=8)
    fits_seq = heal_cuts(seq, [2, 5], windows(), mode="sequential")
    fits_dense = heal_cuts(dense, [2, 5], windows(), mode="dense")
    assert fits_seq[0] == fits_dense[0]
    assert fits_seq[1].residual_before != pytest.approx(fits_dense[1].residual_before)


def test_a_span_at_block_0_has_no_anchor_and_is_left_alone() -> None:
    model = build("llama")
    assert heal_cuts(model, [0], windows()) == []


def test_a_healed_pruned_model_saves_and_reloads_with_equal_logits(tmp_path, tiny_tokenizer) -> None:
    model = build("llama", num_hidden_layers=6)
    heal_cuts(model, [2, 3], windows())
    remove_blocks(model, [2, 3])
    out = save_pruned(model, tiny_tokenizer, tmp_path / "healed")
    check = verify_reload(out, model, probe())
    assert check["num_layers"] == 4 and check["max_abs_logit_diff"] <= 1e-5
