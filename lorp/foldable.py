"""Which architectures can take a linear map folded into a block's MLP output (torch-free).

``lorp.heal`` folds with it; the service reads it to refuse ``options.heal: "linear"`` at
submission where the model's ``config.json`` already says the map cannot be folded.
"""

from __future__ import annotations

from typing import Any

# Where each family's MLP output projection sits inside a decoder block, and its kind.
PROJECTIONS: dict[str, tuple[str, str]] = {
    **{
        family: ("mlp.down_proj", "linear")
        for family in (
            "llama",
            "mistral",
            "qwen2",
            "qwen3",
            "gemma",
            "phi3",
            "olmo",
            "smollm3",
            "granite",
            "glm",
            "cohere",
            "cohere2",
            "seed_oss",
            "apertus",
            "nemotron",
            "arcee",
            "hunyuan_v1_dense",
            "ministral",
            "stablelm",
            "ernie4_5",
        )
    },
    "gpt2": ("mlp.c_proj", "conv1d"),
    "starcoder2": ("mlp.c_proj", "linear"),
    "phi": ("mlp.fc2", "linear"),
    "gpt_neox": ("mlp.dense_4h_to_h", "linear"),
    "falcon": ("mlp.dense_4h_to_h", "linear"),
    "opt": ("fc2", "linear"),
}
# Families whose MLP output is normalised before it joins the residual stream.
POST_NORM = {
    "gemma2": "Gemma 2 normalises the MLP output (post_feedforward_layernorm) before the residual add",
    "gemma3": "Gemma 3 normalises the MLP output (post_feedforward_layernorm) before the residual add",
    "gemma3_text": "Gemma 3 normalises the MLP output (post_feedforward_layernorm) before the residual add",
    "olmo2": "OLMo 2 normalises the MLP output (post_feedforward_layernorm) before the residual add",
    "olmo3": "OLMo 3 normalises the MLP output (post_feedforward_layernorm) before the residual add",
    "glm4": "GLM-4 normalises the MLP output (post_mlp_layernorm) before the residual add",
    "exaone4": "EXAONE 4 normalises the MLP output (post_feedforward_layernorm) before the residual add",
}
# Mixtures of experts: the MLP output is a routed sum over experts held as one stacked tensor, not
# one projection a map can fold into.
EXPERTS = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss"}


def fold_refusal(family: str | None, config: dict[str, Any] | None = None) -> str | None:
    """Why a model of this family (``model_type``) cannot take a folded map, or None when it can."""
    if family in POST_NORM:
        return POST_NORM[family]
    if family in EXPERTS:
        return f"the {family} family routes each token through a mixture of experts; a map folds into one projection"
    if family == "opt" and not (config or {}).get("do_layer_norm_before", True):
        return "this OPT model normalises after the residual add (do_layer_norm_before is false)"
    multiplier = (config or {}).get("residual_multiplier", 1.0)
    if family == "granite" and multiplier != 1.0:
        # The fit takes the block's output less the projection's as what the map adds to; Granite
        # scales the projection's output first, so that difference is not the rest of the block.
        return f"this Granite model scales the MLP output (residual_multiplier {multiplier}) before the residual add"
    if family not in PROJECTIONS:
        return f"no MLP output projection is known for the {family} family"
    return None
