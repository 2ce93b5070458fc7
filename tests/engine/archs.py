"""Tiny random models of every supported architecture, built from configs, for the engine's tests."""

from __future__ import annotations

from typing import Any

import torch
import transformers
from transformers import PreTrainedModel

from lorp.blocks import decoder_blocks

VOCAB = 384
# Short enough to be fast, longer than the sliding windows below so that a misassigned layer type
# (sliding vs full attention) changes the logits.
PROBE_LEN = 12
WINDOW = 4

_COMMON = {"vocab_size": VOCAB, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 0}
_LLAMA_LIKE = {
    **_COMMON,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}

# name -> (config class, kwargs, expected family, expected block path, expected count attribute)
ARCHS: dict[str, tuple[str, dict[str, Any], str, str, str]] = {
    "llama": ("LlamaConfig", _LLAMA_LIKE, "llama", "model.layers", "num_hidden_layers"),
    "mistral": (
        "MistralConfig",
        {**_LLAMA_LIKE, "sliding_window": WINDOW},
        "mistral",
        "model.layers",
        "num_hidden_layers",
    ),
    "qwen2": (
        "Qwen2Config",
        {**_LLAMA_LIKE, "use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 2},
        "qwen2",
        "model.layers",
        "num_hidden_layers",
    ),
    "qwen3": (
        "Qwen3Config",
        {
            **_LLAMA_LIKE,
            "head_dim": 8,
            "use_sliding_window": True,
            "sliding_window": WINDOW,
            "max_window_layers": 2,
        },
        "qwen3",
        "model.layers",
        "num_hidden_layers",
    ),
    "gemma": ("GemmaConfig", {**_LLAMA_LIKE, "head_dim": 8}, "gemma", "model.layers", "num_hidden_layers"),
    "gemma2": (
        "Gemma2Config",
        {**_LLAMA_LIKE, "head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": WINDOW},
        "gemma2",
        "model.layers",
        "num_hidden_layers",
    ),
    "gemma3_text": (
        "Gemma3TextConfig",
        {
            **_LLAMA_LIKE,
            "head_dim": 8,
            "query_pre_attn_scalar": 8,
            "sliding_window": WINDOW,
            # Explicit and irregular, so that trimming must follow the kept blocks exactly.
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        },
        "gemma3",
        "model.layers",
        "num_hidden_layers",
    ),
    "phi3": ("Phi3Config", _LLAMA_LIKE, "phi3", "model.layers", "num_hidden_layers"),
    "olmo": ("OlmoConfig", _LLAMA_LIKE, "olmo", "model.layers", "num_hidden_layers"),
    "olmo2": ("Olmo2Config", _LLAMA_LIKE, "olmo2", "model.layers", "num_hidden_layers"),
    "olmo3": (
        "Olmo3Config",
        {**_LLAMA_LIKE, "sliding_window": WINDOW},
        "olmo3",
        "model.layers",
        "num_hidden_layers",
    ),
    "smollm3": (
        "SmolLM3Config",
        {**_LLAMA_LIKE, "no_rope_layers": [1, 0, 1, 1]},
        "smollm3",
        "model.layers",
        "num_hidden_layers",
    ),
    "gpt2": (
        "GPT2Config",
        {**_COMMON, "n_embd": 32, "n_layer": 4, "n_head": 4, "n_positions": 64},
        "gpt2",
        "transformer.h",
        "n_layer",
    ),
    "gpt_neox": (
        "GPTNeoXConfig",
        {
            **_COMMON,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "max_position_embeddings": 64,
        },
        "gpt_neox",
        "gpt_neox.layers",
        "num_hidden_layers",
    ),
    "opt": (
        "OPTConfig",
        {
            **_COMMON,
            "hidden_size": 32,
            "ffn_dim": 64,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "word_embed_proj_dim": 32,
            "max_position_embeddings": 64,
        },
        "opt",
        "model.decoder.layers",
        "num_hidden_layers",
    ),
    "falcon": (
        "FalconConfig",
        {**_COMMON, "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4},
        "falcon",
        "transformer.h",
        "num_hidden_layers",
    ),
    # Granite scales what each block adds, its embeddings, attention and logits (Granite 3's values):
    # a heal map acts on the scaled MLP output.
    "granite": (
        "GraniteConfig",
        {
            **_LLAMA_LIKE,
            "residual_multiplier": 0.22,
            "embedding_multiplier": 12.0,
            "attention_multiplier": 0.0078125,
            "logits_scaling": 8.0,
        },
        "granite",
        "model.layers",
        "num_hidden_layers",
    ),
    "glm": ("GlmConfig", {**_LLAMA_LIKE, "head_dim": 8}, "glm", "model.layers", "num_hidden_layers"),
    "glm4": ("Glm4Config", {**_LLAMA_LIKE, "head_dim": 8}, "glm4", "model.layers", "num_hidden_layers"),
    "cohere": ("CohereConfig", _LLAMA_LIKE, "cohere", "model.layers", "num_hidden_layers"),
    "cohere2": (
        "Cohere2Config",
        {**_LLAMA_LIKE, "sliding_window": WINDOW, "layer_types": ["sliding_attention", "full_attention"] * 2},
        "cohere2",
        "model.layers",
        "num_hidden_layers",
    ),
    "exaone4": (
        "Exaone4Config",
        {
            **_LLAMA_LIKE,
            "head_dim": 8,
            "sliding_window": WINDOW,
            "layer_types": ["sliding_attention", "full_attention"] * 2,
        },
        "exaone4",
        "model.layers",
        "num_hidden_layers",
    ),
    "seed_oss": ("SeedOssConfig", {**_LLAMA_LIKE, "head_dim": 8}, "seed_oss", "model.layers", "num_hidden_layers"),
    "apertus": ("ApertusConfig", _LLAMA_LIKE, "apertus", "model.layers", "num_hidden_layers"),
    "nemotron": ("NemotronConfig", {**_LLAMA_LIKE, "head_dim": 8}, "nemotron", "model.layers", "num_hidden_layers"),
    "arcee": ("ArceeConfig", _LLAMA_LIKE, "arcee", "model.layers", "num_hidden_layers"),
    "hunyuan_v1_dense": (
        "HunYuanDenseV1Config",
        {**_LLAMA_LIKE, "head_dim": 8},
        "hunyuan_v1_dense",
        "model.layers",
        "num_hidden_layers",
    ),
    "ministral": (
        "MinistralConfig",
        {
            **_LLAMA_LIKE,
            "head_dim": 8,
            "sliding_window": WINDOW,
            "layer_types": ["sliding_attention", "full_attention"] * 2,
        },
        "ministral",
        "model.layers",
        "num_hidden_layers",
    ),
    "starcoder2": (
        "Starcoder2Config",
        {**_LLAMA_LIKE, "sliding_window": WINDOW},
        "starcoder2",
        "model.layers",
        "num_hidden_layers",
    ),
    "stablelm": ("StableLmConfig", _LLAMA_LIKE, "stablelm", "model.layers", "num_hidden_layers"),
    "phi": ("PhiConfig", _LLAMA_LIKE, "phi", "model.layers", "num_hidden_layers"),
    "ernie4_5": ("Ernie4_5Config", {**_LLAMA_LIKE, "head_dim": 8}, "ernie4_5", "model.layers", "num_hidden_layers"),
    "mixtral": (
        "MixtralConfig",
        {**_LLAMA_LIKE, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": WINDOW},
        "mixtral",
        "model.layers",
        "num_hidden_layers",
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        {
            **_LLAMA_LIKE,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 16,
            "shared_expert_intermediate_size": 32,
        },
        "qwen2_moe",
        "model.layers",
        "num_hidden_layers",
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        {
            **_LLAMA_LIKE,
            "head_dim": 8,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 16,
            # Every second block sparse, block 3 dense too: which blocks are dense depends on their
            # index, which pruning changes.
            "decoder_sparse_step": 2,
            "mlp_only_layers": [3],
        },
        "qwen3_moe",
        "model.layers",
        "num_hidden_layers",
    ),
    "olmoe": (
        "OlmoeConfig",
        {**_LLAMA_LIKE, "num_experts": 4, "num_experts_per_tok": 2},
        "olmoe",
        "model.layers",
        "num_hidden_layers",
    ),
    "gpt_oss": (
        "GptOssConfig",
        {
            **_LLAMA_LIKE,
            "head_dim": 8,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "sliding_window": WINDOW,
            "layer_types": ["sliding_attention", "full_attention"] * 2,
        },
        "gpt_oss",
        "model.layers",
        "num_hidden_layers",
    ),
}


def build(name: str, **overrides: Any) -> PreTrainedModel:
    """A tiny random causal LM of architecture ``name`` in eval mode (seeded, so deterministic)."""
    config_cls, kwargs, _, _, _ = ARCHS[name]
    config = getattr(transformers, config_cls)(**{**kwargs, **overrides})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    return model.eval()


def six_blocks(name: str) -> PreTrainedModel:
    """``build(name)`` with six blocks, per-layer config lists lengthened to match."""
    overrides: dict[str, Any] = {ARCHS[name][4]: 6}
    if "layer_types" in ARCHS[name][1]:
        overrides["layer_types"] = ["sliding_attention", "full_attention"] * 3
    if "no_rope_layers" in ARCHS[name][1]:
        overrides["no_rope_layers"] = [1, 0, 1, 1, 0, 1]
    return build(name, **overrides)


def write_mxfp4_gpt_oss(path: Any, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
    """A six-block gpt-oss checkpoint whose experts are stored as OpenAI ships them, in MXFP4: per
    weight, random 4-bit values packed two to a byte (``_blocks``) and an exponent per 32 (``_scales``,
    around 2^-6), with ``quantization_config`` in its config. transformers dequantizes them on load
    where it has no MXFP4 kernels (here). The other weights in ``dtype`` (gpt-oss's own: bfloat16)."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    path = Path(path)
    six_blocks("gpt_oss").to(dtype).save_pretrained(path)
    g = torch.Generator().manual_seed(seed)
    file = path / "model.safetensors"
    tensors = load_file(file)
    for name in [n for n in tensors if n.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))]:
        experts, n_in, n_out = tensors.pop(name).shape  # the model's [experts, in, out]
        tensors[f"{name}_blocks"] = torch.randint(
            0, 256, (experts, n_out, n_in // 32, 16), generator=g, dtype=torch.uint8
        )
        tensors[f"{name}_scales"] = torch.randint(
            120, 124, (experts, n_out, n_in // 32), generator=g, dtype=torch.uint8
        )
    save_file(tensors, file, metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))


def upcycled_mixtral(dense: Any, experts: int = 4) -> PreTrainedModel:
    """A Mixtral made from the Llama ``dense``: its attention, norms and embeddings, and every expert a
    copy of the block's MLP under a random router (seeded). Top-2 routing weights sum to one, so it
    computes what the Llama computes (to float rounding), through experts."""
    c = dense.config
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    keys += ("num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings")
    keys += ("bos_token_id", "eos_token_id", "pad_token_id")
    config = transformers.MixtralConfig(
        **{key: getattr(c, key) for key in keys},
        rope_parameters=dict(c.rope_parameters),
        sliding_window=None,
        num_local_experts=experts,
        num_experts_per_tok=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        moe = transformers.MixtralForCausalLM(config).to(dense.dtype).eval()
    own = moe.state_dict()
    with torch.no_grad():
        for name, value in dense.state_dict().items():
            if ".mlp." not in name:
                own[name].copy_(value)
        for layer, block in zip(dense.model.layers, moe.model.layers, strict=True):
            gate_up = torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight])
            down = layer.mlp.down_proj.weight
            block.mlp.experts.gate_up_proj.copy_(gate_up.expand(experts, *gate_up.shape))
            block.mlp.experts.down_proj.copy_(down.expand(experts, *down.shape))
    return moe


def write_wide_llama(path: Any, num_hidden_layers: int) -> None:
    """A float32 Llama with blocks of 16 MiB (hidden 512, MLP 2048, untied head), saved to ``path``: large
    enough that a process holding it whole shows in its peak memory."""
    config = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(path)


def probe(batch: int = 2) -> torch.LongTensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(2, VOCAB, (batch, PROBE_LEN), generator=g)  # type: ignore[return-value]


def layer_indices(model: PreTrainedModel) -> list[list[int]]:
    """Every int ``layer_idx`` found in each block, block by block."""
    return [
        sorted({m.layer_idx for m in b.modules() if isinstance(getattr(m, "layer_idx", None), int)})
        for b in decoder_blocks(model)
    ]


def block_types(model: PreTrainedModel) -> list[str]:
    """The layer type each block's attention was built with, where the family records one."""
    types = []
    for block in decoder_blocks(model):
        for module in block.modules():
            value = getattr(module, "layer_type", None) or getattr(module, "attention_type", None)
            if isinstance(value, str):
                types.append(value)
                break
    return types


def greedy(model: PreTrainedModel, ids: torch.Tensor, n: int = 4, use_cache: bool = True) -> list[int]:
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        use_cache=use_cache,
        pad_token_id=1,
    )
    return out[0, ids.shape[1] :].tolist()
