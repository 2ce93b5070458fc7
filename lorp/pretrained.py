"""How the engine uses transformers' ``from_pretrained``: the options every load passes
(:data:`PLAIN_MODULES`, :func:`load_options`), the state a loaded model is cleaned of before it is
saved (:func:`drop_leftover_quantization`), and the quantization its checkpoint stores when the load
dequantized it (:func:`remember_stored_quantization`). Used by loading, the demo model's conversion
and the reload check, so that each load of a model is the same load.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from lorp.errors import InvalidRequestError
from lorp.quantization import MXFP4, quant_method

logger = logging.getLogger(__name__)

# Passed to every ``from_pretrained``: the model runs its own modules. transformers (with the
# ``kernels`` package it depends on) otherwise swaps layers for kernels fetched from the hub when a
# model lands on a GPU, which is remote code, needs the network, and would make the reload check
# compare different code.
PLAIN_MODULES: dict[str, Any] = {"use_kernels": False}


def _is_plain_float_model(model: torch.nn.Module) -> bool:
    # A model whose every parameter is a plain floating-point Parameter holds no packed/quantized
    # weights, so its state dict is what a dense checkpoint stores (e.g. a GGUF file dequantized at
    # load time, which keeps hf_quantizer and config.quantization_config around).
    return all(type(p) is torch.nn.Parameter and p.dtype.is_floating_point for p in model.parameters())


def drop_leftover_quantization(model: Any) -> None:
    """Forget the quantizer of a model whose weights are dense by now, so that it saves as a plain one.

    A GGUF checkpoint loads dequantized but keeps its quantizer attached (``hf_quantizer``, the
    ``is_quantized`` marks, ``config.quantization_config``), and ``save_pretrained`` then refuses
    the model. Models that really hold quantized weights keep their state (saved with their config
    where transformers can, refused here where it cannot).
    """
    hf_quantizer = getattr(model, "hf_quantizer", None)
    has_qconfig = getattr(model.config, "quantization_config", None) is not None
    if hf_quantizer is None and not has_qconfig:
        return
    if not _is_plain_float_model(model):
        if hf_quantizer is not None and not hf_quantizer.is_serializable():
            raise InvalidRequestError(
                "the model holds quantized weights that transformers cannot serialize "
                f"({type(hf_quantizer).__name__}); load it unquantized (or dequantized) to save it",
                field="model.id",
            )
        # Serializable quantized weights: let save_pretrained write them with their config.
        return
    logger.info("dropping leftover quantization state (%s): the weights are dense", type(hf_quantizer).__name__)
    model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _stored_config(source: Path) -> Any:
    """The ``quantization_config`` in ``source``'s ``config.json``, or None (none, or no such file)."""
    try:
        return json.loads((source / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None


def load_options(source: Path) -> dict[str, Any]:
    """What every ``from_pretrained`` of the checkpoint in ``source`` passes: :data:`PLAIN_MODULES`,
    and for experts stored in MXFP4 (gpt-oss) a config that dequantizes them. transformers otherwise
    fetches MXFP4 kernels from the hub where a GPU can run them (remote code, the network); the engine
    runs the weights dequantized, as sequential execution does, wherever it runs."""
    options = dict(PLAIN_MODULES)
    if quant_method(_stored_config(source)) == MXFP4:
        from transformers import Mxfp4Config  # type: ignore[attr-defined]

        options["quantization_config"] = Mxfp4Config(dequantize=True)
    return options


_STORED_QUANTIZATION = "lorp_stored_quantization"


def remember_stored_quantization(model: Any, source: Path) -> None:
    """Keep on ``model`` the ``quantization_config`` of the checkpoint in ``source`` when the load left
    the model without one (transformers dequantizes MXFP4 experts where it has no kernels for them, and
    then forgets the config): the weights that ship are the stored ones, which a heal map cannot be
    folded into (``lorp.foldable.fold_refusal``)."""
    if getattr(model.config, "quantization_config", None) is not None:
        return
    stored = _stored_config(source)
    if stored:
        setattr(model, _STORED_QUANTIZATION, stored)


def stored_quantization(model: Any) -> Any:
    """The quantization config of the weights ``model`` was loaded from: its own, or the one
    :func:`remember_stored_quantization` kept; None for weights stored unquantized."""
    own = getattr(model.config, "quantization_config", None)
    return own if own is not None else getattr(model, _STORED_QUANTIZATION, None)
