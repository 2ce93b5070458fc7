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
        for family in ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "olmo", "smollm3")
    },
    "gpt2": ("mlp.c_proj", "conv1d"),
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
}


def fold_refusal(family: str | None, config: dict[str, Any] | None = None) -> str | None:
    """Why a model of this family (``model_type``) cannot take a folded map, or None when it can."""
    if family in POST_NORM:
        return POST_NORM[family]
    if family == "opt" and not (config or {}).get("do_layer_norm_before", True):
        return "this OPT model normalises after the residual add (do_layer_norm_before is false)"
    if family not in PROJECTIONS:
        return f"no MLP output projection is known for the {family} family"
    return None
