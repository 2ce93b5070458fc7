"""Block discovery, block removal and the save / reload-and-compare check on tiny random models."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import torch
import transformers

from lorp.blocks import BlockLayout, block_layout, decoder_blocks, remove_blocks
from lorp.errors import InvalidRequestError, ReloadCheckError, UnsupportedArchitectureError
from lorp.export import save_pruned, verify_reload

from .archs import ARCHS, VOCAB, block_types, build, greedy, layer_indices, probe


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_layout_found_by_architecture(name: str) -> None:
    _, _, family, path, attr = ARCHS[name]
    model = build(name)
    assert block_layout(model) == BlockLayout(family=family, path=path, num_layers_attr=attr)
    assert len(decoder_blocks(model)) == 4
    # The base model (no LM head) is found too, one level down the same path.
    base = model.base_model
    assert len(decoder_blocks(base)) == 4


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_remove_save_reload(name: str, tmp_path: Any, tiny_tokenizer: Any) -> None:
    model = build(name)
    original = list(decoder_blocks(model))
    old_layer_types = getattr(model.config, "layer_types", None)

    kept = remove_blocks(model, [1, 3])  # a middle block, so renumbering matters, and the last one
    assert kept == [0, 2]
    blocks = decoder_blocks(model)
    assert list(blocks) == [original[0], original[2]]
    assert layer_indices(model) == [[0], [1]]
    assert getattr(model.config, ARCHS[name][4]) == 2
    assert model.config.num_hidden_layers == 2
    if old_layer_types is not None:
        assert list(model.config.layer_types) == [old_layer_types[0], old_layer_types[2]]
        # Each kept block was built for its original layer type; the trimmed config must agree, or a
        # reload would rebuild it as the other type (the mask comes from the config, so in memory the
        # mismatch would be invisible).
        assert block_types(model) in ([], list(model.config.layer_types))

    ids = probe()
    # Cached generation on the pruned in-memory model agrees with generation without a cache.
    assert greedy(model, ids[:1]) == greedy(model, ids[:1], use_cache=False)

    out = save_pruned(model, tiny_tokenizer, tmp_path / "pruned")
    assert (out / "model.safetensors").exists()
    assert (out / "generation_config.json").exists()
    assert (out / "tokenizer.json").exists()
    saved = json.loads((out / "config.json").read_text())
    assert saved[ARCHS[name][4]] == 2

    report = verify_reload(out, model, ids, generate_tokens=4)
    assert report["num_layers"] == 2
    assert report["max_abs_logit_diff"] <= 1e-5
    assert len(report["generated_tokens"]) == 4

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert len(decoder_blocks(reloaded)) == 2
    assert layer_indices(reloaded) == [[0], [1]]


def test_specific_config_lists_are_trimmed() -> None:
    smol = build("smollm3")
    remove_blocks(smol, [1])
    assert smol.config.no_rope_layers == [1, 1, 1]
    assert [b.self_attn.use_rope for b in decoder_blocks(smol)] == [1, 1, 1]

    qwen = build("qwen3")  # max_window_layers=2: blocks 0, 1 full attention, 2, 3 sliding
    assert qwen.config.layer_types == [
        "full_attention",
        "full_attention",
        "sliding_attention",
        "sliding_attention",
    ]
    remove_blocks(qwen, [0, 2])
    assert qwen.config.layer_types == ["full_attention", "sliding_attention"]
    assert qwen.config.max_window_layers == 1  # one kept block below the old threshold
    qwen.config.validate_layer_type()


def test_gpt2_inverse_layer_scaling_follows_new_depth(tmp_path: Any, tiny_tokenizer: Any) -> None:
    # GPT2Attention folds 1/(layer_idx+1) into its scaling at construction: a reload rebuilds the block
    # at its new index, so the in-memory model must use the same factor or the check fails.
    model = build("gpt2", scale_attn_by_inverse_layer_idx=True)
    remove_blocks(model, [0, 2])
    head_dim = 32 // 4
    assert [b.attn.scaling for b in decoder_blocks(model)] == pytest.approx([head_dim**-0.5 / 1, head_dim**-0.5 / 2])
    out = save_pruned(model, tiny_tokenizer, tmp_path / "gpt2")
    assert verify_reload(out, model, probe())["num_layers"] == 2


def test_renumbering_matters_for_cached_generation(tmp_path: Any, tiny_tokenizer: Any) -> None:
    model = build("llama")
    layers = decoder_blocks(model)
    # Remove block 1 the naive way: drop the module and fix the count, but keep stale layer_idx.
    del layers[1]
    model.config.num_hidden_layers = 3
    assert layer_indices(model) == [[0], [2], [3]]
    ids = probe()
    with pytest.raises(IndexError):
        greedy(model, ids[:1])
    # verify_reload turns the same failure into a clear ReloadCheckError.
    out = save_pruned(model, tiny_tokenizer, tmp_path / "stale-idx")
    with pytest.raises(ReloadCheckError, match="cached generation fails"):
        verify_reload(out, model, ids)

    fixed = build("llama")
    remove_blocks(fixed, [1])
    assert layer_indices(fixed) == [[0], [1], [2]]
    assert greedy(fixed, ids[:1]) == greedy(fixed, ids[:1], use_cache=False)


def test_stale_block_count_is_caught_by_verify_reload(tmp_path: Any, tiny_tokenizer: Any) -> None:
    model = build("llama")
    layers = decoder_blocks(model)
    # Remove the last block by hand and leave num_hidden_layers at 4: the model runs in memory, and
    # the saved directory reloads with a fresh random block 3 (only a load report, no exception).
    del layers[3]
    assert model.config.num_hidden_layers == 4
    out = save_pruned(model, tiny_tokenizer, tmp_path / "stale-count")
    with pytest.raises(ReloadCheckError) as err:
        verify_reload(out, model, probe())
    message = str(err.value)
    # Caught three ways: the load report, the block count, and the logits themselves (the check that
    # still holds if a future transformers stops reporting missing keys).
    assert "missing_keys" in message
    assert "block count mismatch" in message
    assert "logits differ: max abs diff" in message


def test_logit_mismatch_reports_max_diff(tmp_path: Any, tiny_tokenizer: Any) -> None:
    model = build("llama")
    remove_blocks(model, [2])
    out = save_pruned(model, tiny_tokenizer, tmp_path / "pruned")
    # Change the in-memory model after saving: the directory no longer holds the same function.
    with torch.no_grad():
        decoder_blocks(model)[1].mlp.down_proj.weight.add_(0.5)
    with pytest.raises(ReloadCheckError, match="max abs diff"):
        verify_reload(out, model, probe())


def test_verify_reload_bf16(tmp_path: Any, tiny_tokenizer: Any) -> None:
    model = build("qwen3").to(torch.bfloat16)
    remove_blocks(model, [1])
    out = save_pruned(model, tiny_tokenizer, tmp_path / "bf16")
    report = verify_reload(out, model, probe())
    assert report["num_layers"] == 3


class _FakeConfig:
    model_type = "made_up_lm"
    architectures = ("MadeUpForCausalLM",)


class _FakeModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = _FakeConfig()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2)])


@pytest.mark.parametrize(
    ("make", "names"),
    [
        (_FakeModel, ["made_up_lm", "MadeUpForCausalLM"]),
        (
            lambda: transformers.BertForMaskedLM(
                transformers.BertConfig(
                    vocab_size=VOCAB,
                    hidden_size=32,
                    num_hidden_layers=1,
                    num_attention_heads=2,
                    intermediate_size=32,
                )
            ),
            ["bert", "BertForMaskedLM"],
        ),
    ],
)
def test_unknown_architecture_is_named(make: Callable[[], Any], names: list[str]) -> None:
    model = make()
    for call in (block_layout, decoder_blocks, lambda m: remove_blocks(m, [0])):
        with pytest.raises(UnsupportedArchitectureError) as err:
            call(model)
        for name in names:
            assert name in str(err.value)
        assert "llama" in str(err.value) and "gpt2" in str(err.value)  # lists what is supported


@pytest.mark.parametrize(
    "bad",
    [[4], [-1], [1, 1], [0, 1, 2, 3], ["1"], [1.0], [True], "12", 3],
)
def test_invalid_indices(bad: Any) -> None:
    model = build("llama")
    before = list(decoder_blocks(model))
    with pytest.raises(InvalidRequestError) as err:
        remove_blocks(model, bad)
    assert err.value.field == "pruned_layers"
    # Nothing changed: validation happens before any edit.
    assert list(decoder_blocks(model)) == before
    assert model.config.num_hidden_layers == 4


def test_numpy_indices_are_accepted() -> None:
    import numpy as np

    model = build("llama")
    assert remove_blocks(model, np.array([2, 1])) == [0, 3]
    assert layer_indices(model) == [[0], [1]]


def test_empty_removal_is_a_noop() -> None:
    model = build("gpt2")
    assert remove_blocks(model, []) == [0, 1, 2, 3]
    assert model.config.n_layer == 4


def test_save_pruned_refuses_non_empty_dir(tmp_path: Any, tiny_tokenizer: Any) -> None:
    (tmp_path / "junk.txt").write_text("x")
    with pytest.raises(InvalidRequestError) as err:
        save_pruned(build("llama"), tiny_tokenizer, tmp_path)
    assert err.value.field == "out_dir"


def test_save_pruned_drops_leftover_quantization_state(tmp_path: Any, tiny_tokenizer: Any) -> None:
    from transformers.quantizers.base import HfQuantizer

    class _Leftover(HfQuantizer):
        # Stands in for a dequantized GGUF load: the weights are dense, the state says otherwise.
        def __init__(self) -> None:
            self.quantization_config = type("Q", (), {"quant_method": "gguf"})()

        def is_serializable(self) -> bool:
            return False

        @property
        def is_trainable(self) -> bool:
            return False

    model = build("llama")
    remove_blocks(model, [1])
    model.hf_quantizer = _Leftover()
    model.config.quantization_config = {"quant_method": "gguf"}
    out = save_pruned(model, tiny_tokenizer, tmp_path / "q")
    assert getattr(model, "hf_quantizer", None) is None
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert verify_reload(out, model, probe())["num_layers"] == 3
