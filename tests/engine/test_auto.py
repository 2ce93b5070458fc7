"""Method auto: temporary pruned views, plan scoring, and the choice of the best plan."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from lorp.auto import auto_select, choose_best, score_candidates
from lorp.blocks import decoder_blocks, pruned_view, remove_blocks
from lorp.calibration import TokenWindows
from lorp.evaluation import perplexity
from lorp.selection import SelectionOptions
from lorp.similarity import capture_similarity

from .archs import ARCHS, build, probe

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


def _fake_selection(name: str, blocks: list[int]):
    from lorp.selection import Selection, Structure

    structure = Structure(rls=1.0, k=2, clusters=[0] * 6, redundancy=[0.0] * 6)
    return Selection(method=name, pruned_layers=blocks, structure=structure, scores={})


def test_score_candidates_measures_identical_plans_once(qwen3):
    val = windows()
    cands = {
        "a": _fake_selection("a", [1, 2]),
        "b": _fake_selection("b", [3, 4]),
        "c": _fake_selection("c", [1, 2]),
    }
    done: list[tuple[int, int]] = []
    scores, dups = score_candidates(qwen3, cands, val, progress=lambda d, t: done.append((d, t)))
    assert dups == {"c": "a"}
    assert scores["c"] == scores["a"]
    assert done == [(1, 2), (2, 2)]
    with pruned_view(qwen3, [3, 4]):
        assert scores["b"] == pytest.approx(perplexity(qwen3, val))


def test_choose_best_lowest_then_order():
    assert choose_best({"x": 5.0, "y": 3.0, "z": 3.0}, ["x", "y", "z"]) == "y"
    assert choose_best({"x": float("nan"), "y": 9.0}, ["x", "y"]) == "y"
    assert choose_best({"x": float("inf"), "y": float("inf")}, ["x", "y"]) == "x"


def test_auto_select_picks_the_lowest_validation_perplexity(qwen3):
    stats = capture_similarity(qwen3, windows(4, 16, seed=1))
    val = windows(4, 16, seed=2)
    result = auto_select(qwen3, stats.S, stats.D, 2, val, options=SelectionOptions())
    assert set(result.scores) == set(result.candidates)
    assert {"lorp", "shortgpt", "streamline", "angular", "reverse"} <= set(result.candidates)
    best = min(result.scores.values())
    assert result.scores[result.chosen.method] == best
    assert result.chosen.pruned_layers == result.candidates[result.chosen.method].pruned_layers
    # the model is left dense
    assert len(decoder_blocks(qwen3)) == 6
    assert np.isfinite(best)


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
