"""Model loading and its safety defaults, on tiny local checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lorp.errors import InvalidRequestError, ModelLoadError
from lorp.export import save_pruned, verify_reload
from lorp.loading import load_model, resolve_device, resolve_dtype


@pytest.fixture()
def tiny_dir(tmp_path, tiny_tokenizer):
    cfg = LlamaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2
    )
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    return tmp_path


def test_local_directory_loads_with_provenance(tiny_dir):
    loaded = load_model(str(tiny_dir), device="cpu", dtype="float32")
    assert loaded.model.config.num_hidden_layers == 3
    assert not loaded.model.training
    assert loaded.dtype == torch.float32
    prov = loaded.provenance
    assert prov["kind"] == "local" and prov["model_type"] == "llama"
    assert prov["weight_files"] == ["model.safetensors"] and len(prov["weights_sha256"]) == 64
    assert loaded.tokenizer.pad_token_id is not None


def test_models_run_their_own_modules_never_kernels_from_the_hub(tiny_dir, tmp_path, monkeypatch):
    # transformers turns hub kernels on by default: on a GPU it then fetches code from the hub at load
    # time (found on an H200 with no network: every CUDA load failed). The load and the reload check
    # both turn them off; tests/engine/test_gpu.py runs both on CUDA.
    loaded = load_model(str(tiny_dir), device="cpu", dtype="float32")
    assert loaded.model.use_kernels is False
    asked: list[object] = []
    real = AutoModelForCausalLM.from_pretrained

    def recorded(*args, **kwargs):
        asked.append(kwargs.get("use_kernels"))
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", recorded)
    out = save_pruned(loaded.model, loaded.tokenizer, tmp_path / "saved")
    verify_reload(out, loaded.model, torch.tensor([[1, 2, 3, 4]]))
    assert asked == [False]


def test_dtype_is_applied(tiny_dir):
    loaded = load_model(str(tiny_dir), device="cpu", dtype="bfloat16")
    assert next(loaded.model.parameters()).dtype == torch.bfloat16


def test_missing_weights_are_refused_not_randomly_initialised(tiny_dir):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    cfg["num_hidden_layers"] = 5  # the checkpoint holds 3 blocks
    (tiny_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError) as err:
        load_model(str(tiny_dir), device="cpu")
    assert "missing" in err.value.message and err.value.field == "model.id"


def test_remote_code_is_refused_by_default(tiny_dir):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    cfg["model_type"] = "my_custom_lm"
    cfg["auto_map"] = {"AutoConfig": "modeling_custom.CustomConfig", "AutoModelForCausalLM": "modeling_custom.CustomLM"}
    (tiny_dir / "config.json").write_text(json.dumps(cfg))
    (tiny_dir / "modeling_custom.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(ModelLoadError) as err:
        load_model(str(tiny_dir), device="cpu")
    assert "trust_remote_code" in err.value.message


@pytest.mark.parametrize(
    ("source", "needle"),
    [("/nonexistent/model/dir", "not found"), ("./also-missing", "not found")],
)
def test_missing_paths_are_clear(source, needle):
    with pytest.raises(ModelLoadError) as err:
        load_model(source, device="cpu")
    assert needle in err.value.message


def test_directory_without_weights_or_config(tmp_path):
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        load_model(str(tmp_path), device="cpu")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="no model weights"):
        load_model(str(tmp_path), device="cpu")
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        load_model(str(tmp_path / "x.gguf"), device="cpu")


def test_device_and_dtype_resolution():
    assert resolve_device("cpu") == (torch.device("cpu"), None)
    dev, _ = resolve_device("auto")
    assert dev.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(InvalidRequestError) as err:
        resolve_dtype("int8", torch.device("cpu"))
    assert err.value.field == "model.dtype"
    if not torch.cuda.is_available():
        with pytest.raises(InvalidRequestError) as err:
            resolve_device("cuda")
        assert err.value.field == "model.device"


@pytest.mark.slow
def test_gguf_file_loads_dequantized_and_saves(tmp_path):
    """A .gguf path (the real SmolLM2 file): dequantized, quantizer state dropped, savable as safetensors."""
    from lorp.assets import demo_gguf_path

    path = demo_gguf_path()
    loaded = load_model(str(path), device="cpu", dtype="float32")
    assert loaded.provenance["kind"] == "gguf" and len(loaded.provenance["file_sha256"]) == 64
    assert loaded.model.config.num_hidden_layers == 30
    assert getattr(loaded.model, "hf_quantizer", None) is None
    loaded.model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
