"""Where a block's MLP output leaves it, and which weights a linear map folds into (torch-free).

A heal map ``T`` acts on what a block's MLP adds to the residual stream. Each family's
:class:`Outlet` says which module's output that is (the MLP output projection; a mixture of experts'
whole MLP, its routed sum over the experts and any shared expert) and which weights of the block
compute it linearly, so that folding ``T`` into every one of them makes the block add ``M T``: a
linear output projection, each expert's down projection (one per expert in a checkpoint, one stacked
tensor in the model), a shared expert's, and their biases. Routing weights and gates scale each
expert's output by a number, which commutes with ``T``.

``lorp.heal`` folds with it, the checkpoint writer matches the stored tensors' names against it, and
the service reads :func:`fold_refusal` to refuse ``options.heal: "linear"`` at submission where the
model's ``config.json`` already says the map cannot be folded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from lorp.quantization import MXFP4, quant_method

# How a weight's output features are laid out: ``linear`` [..., out, in] (``y = x W^T + b``),
# ``conv1d`` [..., in, out] (GPT-2's Conv1D, gpt-oss's stacked experts: ``y = x W + b``), ``bias``
# [..., out]. Leading dimensions are experts.
KINDS = ("linear", "conv1d", "bias")


@dataclass(frozen=True)
class Outlet:
    """A family's MLP output: the module inside a block whose output it is (``watch``), and the
    patterns of the weights' names inside a block that a map folds into, with their kinds. The
    patterns cover the names the model holds and those a checkpoint stores (experts apart)."""

    watch: str
    weights: tuple[tuple[str, str], ...]

    def kind(self, name: str) -> str | None:
        """The kind of the weight ``name`` (inside a block) when a map folds into it, else None."""
        for pattern, kind in self.weights:
            if re.fullmatch(pattern, name):
                return kind
        return None


def _projection(path: str, kind: str = "linear") -> Outlet:
    escaped = re.escape(path)
    return Outlet(watch=path, weights=((rf"{escaped}\.weight", kind), (rf"{escaped}\.bias", "bias")))


def _experts(*, stacked: str = "linear", pieces: tuple[str, ...] = (), extra: tuple[str, ...] = ()) -> Outlet:
    """A mixture of experts under ``mlp``: the stacked down projection the model holds (of kind
    ``stacked``), the per-expert pieces a checkpoint stores (``pieces``, linear), and ``extra`` linear
    projections whose outputs the MLP adds in (a shared expert; the dense MLP of a block that has no
    experts)."""
    weights = [(r"mlp\.experts\.down_proj", stacked), (r"mlp\.experts\.down_proj_bias", "bias")]
    for pattern in (*pieces, *extra):
        weights += [(rf"{pattern}\.weight", "linear"), (rf"{pattern}\.bias", "bias")]
    return Outlet(watch="mlp", weights=tuple(weights))


_QWEN_MOE_DENSE = r"mlp\.down_proj"  # a block of a Qwen-MoE model listed as dense (mlp_only_layers)

OUTLETS: dict[str, Outlet] = {
    **{
        family: _projection("mlp.down_proj")
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
    "gpt2": _projection("mlp.c_proj", "conv1d"),
    "starcoder2": _projection("mlp.c_proj"),
    "phi": _projection("mlp.fc2"),
    "gpt_neox": _projection("mlp.dense_4h_to_h"),
    "falcon": _projection("mlp.dense_4h_to_h"),
    "opt": _projection("fc2"),
    # Mixtral's checkpoints name the MLP block_sparse_moe and an expert's down projection w2.
    "mixtral": _experts(pieces=(r"block_sparse_moe\.experts\.\d+\.w2",)),
    "qwen2_moe": _experts(
        pieces=(r"mlp\.experts\.\d+\.down_proj",), extra=(r"mlp\.shared_expert\.down_proj", _QWEN_MOE_DENSE)
    ),
    "qwen3_moe": _experts(pieces=(r"mlp\.experts\.\d+\.down_proj",), extra=(_QWEN_MOE_DENSE,)),
    "olmoe": _experts(pieces=(r"mlp\.experts\.\d+\.down_proj",)),
    # gpt-oss holds its experts stacked as [experts, in, out] with a bias per expert.
    "gpt_oss": _experts(stacked="conv1d"),
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


def outlet_scale(family: str | None, config: dict[str, Any] | None = None) -> float:
    """The number the block multiplies its watched MLP output by before the residual add: Granite's
    ``residual_multiplier``; 1 elsewhere. A map folded into the projection commutes with it."""
    if family == "granite":
        return float((config or {}).get("residual_multiplier", 1.0))
    return 1.0


def fold_refusal(family: str | None, config: dict[str, Any] | None = None) -> str | None:
    """Why a model of this family (``model_type``) and ``config`` (``config.json``'s keys) cannot take
    a folded map, or None when it can."""
    if family in POST_NORM:
        return POST_NORM[family]
    method = quant_method((config or {}).get("quantization_config"))
    # gpt-oss's MXFP4 experts: the anchor block's are written unquantized with the map folded in.
    if method is not None and not (family == "gpt_oss" and method == MXFP4):
        return (
            f"the checkpoint stores its weights quantized ({method}); a map folded into them would have to "
            "be quantized again, which is not the map that was fitted"
        )
    if family == "opt" and not (config or {}).get("do_layer_norm_before", True):
        return "this OPT model normalises after the residual add (do_layer_norm_before is false)"
    if family not in OUTLETS:
        return f"no MLP output projection is known for the {family} family"
    return None
