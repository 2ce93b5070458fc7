"""The pruned checkpoint written by tensor surgery equals what save_pretrained writes of the pruned model."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from lorp.blocks import decoder_blocks, remove_blocks
from lorp.errors import InvalidRequestError, ModelLoadError
from lorp.foldable import fold_refusal
from lorp.heal import fold
from lorp.shards import INDEX_FILE, Checkpoint, read_header
from lorp.surgery import write_pruned

from .archs import ARCHS, build, greedy, probe, write_mxfp4_gpt_oss, write_wide_llama

REMOVED = [1, 2]  # of 4 blocks: one span, anchored at block 0


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def _config(directory: Path) -> dict[str, Any]:
    config = json.loads((directory / "config.json").read_text())
    config.pop("transformers_version", None)
    return config


def _heal_map(d: int, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.eye(d, dtype=torch.float64) + 0.05 * torch.randn(d, d, generator=g, dtype=torch.float64)


def _source(tmp_path: Path, name: str, tokenizer: Any, **overrides: Any) -> tuple[Any, Path]:
    model = build(name, **overrides)
    src = tmp_path / "source"
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    return model, src


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_written_checkpoint_equals_save_pretrained_of_the_pruned_model(
    name: str, tmp_path: Path, tiny_tokenizer: Any
) -> None:
    model, src = _source(tmp_path, name, tiny_tokenizer)
    folds = {}
    if fold_refusal(ARCHS[name][2], model.config.to_dict()) is None:
        folds = {0: _heal_map(model.config.hidden_size if name != "gpt2" else model.config.n_embd)}
        fold(model, decoder_blocks(model)[0], folds[0])
    remove_blocks(model, REMOVED)
    reference = tmp_path / "reference"
    model.save_pretrained(reference)

    written = write_pruned(src, tmp_path / "out", REMOVED, folds)

    assert written.kept == [0, 3]
    expected, got = _tensors(reference), _tensors(written.directory)
    assert sorted(got) == sorted(expected)
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype, key
        assert torch.equal(got[key], tensor), key
    assert _config(written.directory) == _config(reference)
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(written.copied)

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(written.directory).eval()
    ids = probe()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    assert greedy(reloaded, ids[:1], use_cache=True) == greedy(model, ids[:1], use_cache=True)


def test_tensors_kept_as_stored_are_copied_in_parts_byte_for_byte(
    tmp_path: Path, tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Parts of 1,000 bytes: every kept tensor larger than that (the embeddings, the projections) is
    # copied in several, and the folded projection is computed as before.
    monkeypatch.setattr("lorp.shards._COPY_BYTES", 1000)
    model, src = _source(tmp_path, "llama", tiny_tokenizer)
    whole = write_pruned(src, tmp_path / "whole", REMOVED, {0: _heal_map(model.config.hidden_size)})
    monkeypatch.undo()
    parts = _tensors(tmp_path / "whole")
    reference = _tensors(
        write_pruned(src, tmp_path / "ref", REMOVED, {0: _heal_map(model.config.hidden_size)}).directory
    )
    assert sorted(parts) == sorted(reference) and whole.tensors == len(reference)
    assert max(t.numel() * t.element_size() for t in reference.values()) > 10 * 1000
    for key, tensor in reference.items():
        assert torch.equal(parts[key], tensor), key
    source = _tensors(src)
    assert torch.equal(parts["model.embed_tokens.weight"], source["model.embed_tokens.weight"])


def test_shards_are_bounded_indexed_and_read_back(tmp_path: Path, tiny_tokenizer: Any) -> None:
    model = build("llama")
    src = tmp_path / "source"
    model.save_pretrained(src, max_shard_size="20KB")  # a sharded source with its index
    assert (src / INDEX_FILE).is_file()
    limit = 16 * 1024

    written = write_pruned(src, tmp_path / "out", REMOVED, max_shard_bytes=limit)

    assert len(written.files) > 2 and (written.directory / INDEX_FILE).is_file()
    index = json.loads((written.directory / INDEX_FILE).read_text())
    assert sorted(set(index["weight_map"].values())) == written.files
    sizes = {}
    for file in written.files:
        header = read_header(written.directory / file)
        assert all(index["weight_map"][name] == file for name in header)
        sizes[file] = sum(info.nbytes for info in header.values())
        largest = max(info.nbytes for info in header.values())
        assert sizes[file] <= limit or len(header) == 1 or largest > limit
    assert index["metadata"]["total_size"] == sum(sizes.values()) == written.nbytes
    remove_blocks(model, REMOVED)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(written.directory).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(probe()).logits, model(probe()).logits)


def test_stored_dtype_is_kept_and_folds_round_like_the_in_memory_model(tmp_path: Path, tiny_tokenizer: Any) -> None:
    model = build("llama").to(torch.bfloat16)
    src = tmp_path / "source"
    model.save_pretrained(src)
    T = _heal_map(32)

    written = write_pruned(src, tmp_path / "out", REMOVED, {0: T})

    assert {info.dtype for info in Checkpoint(written.directory).tensors.values()} == {"BF16"}
    assert _config(written.directory)["dtype"] == "bfloat16"
    fold(model, decoder_blocks(model)[0], T)
    got = _tensors(written.directory)["model.layers.0.mlp.down_proj.weight"]
    assert torch.equal(got, decoder_blocks(model)[0].mlp.down_proj.weight.detach())


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "gpt_oss", "gpt_oss-mxfp4"])
def test_replaced_expert_weights_are_written_as_the_checkpoint_stores_them(
    name: str, tmp_path: Path, tiny_tokenizer: Any
) -> None:
    # A distilled mixture of experts changes the model's stacked expert weights. The writer splits each
    # into the pieces the checkpoint stores (one per expert, gate and up apart: Mixtral, Qwen2-MoE), or
    # writes the changed block's experts unquantized where they are stored in MXFP4; either way
    # transformers loads back the very values given, and every other weight as it was.
    src = tmp_path / "source"
    if name == "gpt_oss-mxfp4":
        write_mxfp4_gpt_oss(src)
    else:
        build(name).save_pretrained(src)
    stored = Checkpoint(src).tensors
    model = transformers.AutoModelForCausalLM.from_pretrained(src)  # MXFP4: dequantized, no kernels here
    remove_blocks(model, REMOVED)
    g = torch.Generator().manual_seed(5)
    experts = decoder_blocks(model)[1].mlp.experts  # source block 3
    replaced = {
        f"model.layers.1.mlp.experts.{weight}": getattr(experts, weight).detach()
        + 0.01 * torch.randn(getattr(experts, weight).shape, generator=g)
        for weight in ("gate_up_proj", "down_proj")
    }

    written = write_pruned(src, tmp_path / "out", REMOVED, replaced=replaced)

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(written.directory)
    for weight, value in replaced.items():
        assert torch.equal(reloaded.get_parameter(weight), value), weight
    for weight, value in reloaded.named_parameters():
        if weight not in replaced:
            assert torch.equal(value, model.get_parameter(weight)), weight
    keys = set(Checkpoint(written.directory).tensors)
    if name == "gpt_oss-mxfp4":  # the changed block unquantized and listed so; the others as stored
        assert {"model.layers.1.mlp.experts.down_proj", "model.layers.0.mlp.experts.down_proj_blocks"} <= keys
        assert not any(key.startswith("model.layers.1.") and key.endswith("_blocks") for key in keys)
        listed = _config(written.directory)["quantization_config"]["modules_to_not_convert"]
        assert "model.layers.1.mlp.experts" in listed and "model.layers.0.mlp.experts" not in listed
    else:  # the source's layout, renumbered: the same names for block 1 as for source block 3
        assert {key for key in keys if ".layers.1." in key} == {
            key.replace(".layers.3.", ".layers.1.") for key in stored if ".layers.3." in key
        }


def test_tied_head_stays_tied_and_is_written_once(tmp_path: Path, tiny_tokenizer: Any) -> None:
    model = build("llama", tie_word_embeddings=True)
    src = tmp_path / "source"
    src.mkdir()
    model.config.save_pretrained(src)
    # Both names stored, as some checkpoints do; save_pretrained keeps one, and so does the writer.
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})

    written = write_pruned(src, tmp_path / "out", REMOVED)

    assert "lm_head.weight" not in _tensors(written.directory)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(written.directory)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()


def test_bad_requests_are_refused_before_anything_is_written(tmp_path: Path, tiny_tokenizer: Any) -> None:
    _, src = _source(tmp_path, "llama", tiny_tokenizer)
    out = tmp_path / "out"
    with pytest.raises(InvalidRequestError, match="out of range"):
        write_pruned(src, out, [7])
    with pytest.raises(InvalidRequestError, match="at least one block"):
        write_pruned(src, out, [0, 1, 2, 3])
    with pytest.raises(InvalidRequestError, match=r"heal maps for blocks \[1\], which are removed"):
        write_pruned(src, out, [1], {1: _heal_map(32)})
    assert not out.exists() or not any(out.iterdir())
    gemma2 = build("gemma2")
    gemma_src = tmp_path / "gemma2"
    gemma2.save_pretrained(gemma_src)
    with pytest.raises(InvalidRequestError, match="post_feedforward_layernorm") as refused:
        write_pruned(gemma_src, tmp_path / "g-out", [1], {0: _heal_map(32)})
    assert refused.value.field == "options.heal"
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "x").write_text("x")
    with pytest.raises(InvalidRequestError, match="not empty"):
        write_pruned(src, occupied, [1])


def test_a_truncated_source_fails_and_leaves_no_partial_file(tmp_path: Path, tiny_tokenizer: Any) -> None:
    _, src = _source(tmp_path, "llama", tiny_tokenizer)
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    out = tmp_path / "out"
    with pytest.raises(ModelLoadError, match="truncated"):
        write_pruned(src, out, [1])
    assert not list(out.glob("*.safetensors*")) and not list(out.glob(".*"))


_PEAK = textwrap.dedent(
    """
    import resource, sys
    from pathlib import Path
    import torch, transformers
    from transformers import LlamaForCausalLM
    from lorp.surgery import write_pruned
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    write_pruned(Path(sys.argv[1]), Path(sys.argv[2]), [1, 2], {0: torch.eye(int(sys.argv[3]), dtype=torch.float64)})
    print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """
)


def test_writer_holds_about_one_tensor_not_the_model(tmp_path: Path) -> None:
    # 6 blocks of 16 MiB (float32, hidden 512, MLP 2048) plus embeddings: ~100 MiB of weights, the
    # largest tensor 4 MiB. The writer's growth in peak memory over its imports stays far below that.
    src = tmp_path / "big"
    write_wide_llama(src, num_hidden_layers=6)
    size = Checkpoint(src).nbytes
    largest = max(info.nbytes for info in Checkpoint(src).tensors.values())
    done = subprocess.run(
        [sys.executable, "-c", _PEAK, str(src), str(tmp_path / "out"), "512"],
        capture_output=True,
        text=True,
        check=True,
    )
    base_kb, peak_kb = map(int, done.stdout.split())
    growth = (peak_kb - base_kb) * 1024
    assert growth < 0.3 * size, (growth, size, largest)
