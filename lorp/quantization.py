"""What a checkpoint's ``quantization_config`` says (torch-free: the service reads it from ``config.json``).

A checkpoint that stores weights quantized names the method in ``config.json``; the engine reads it
here to refuse a heal map that would have to be quantized again (``lorp.foldable``), to dequantize
gpt-oss's MXFP4 experts as a block loads (``lorp.execution.onload``) and to ask transformers for the
same on a whole load (``lorp.pretrained``).
"""

from __future__ import annotations

from typing import Any

MXFP4 = "mxfp4"  # gpt-oss's experts as OpenAI ships them


def quant_method(quantization: Any) -> str | None:
    """The ``quant_method`` of a ``quantization_config`` (a dict from ``config.json``, or transformers'
    config object); None when there is none, ``"unknown"`` when it names no method."""
    if not quantization:
        return None
    method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    method = method or getattr(quantization, "quant_method", None)
    return "unknown" if method is None else str(getattr(method, "value", method))


# An MXFP4 weight is stored as two tensors beside each other: its 4-bit values packed two to a byte,
# and a power-of-two scale per group of 32 values.
MXFP4_HALVES = ("blocks", "scales")


def mxfp4_halves(weight: str) -> tuple[str, str]:
    """The names of the two stored tensors of the MXFP4 weight ``weight``: its packed values, its scales."""
    return f"{weight}_blocks", f"{weight}_scales"


def mxfp4_half(stored: str) -> tuple[str, str] | None:
    """The weight whose MXFP4 half ``stored`` is named as, and which half (``blocks`` or ``scales``);
    None for any other name."""
    weight, _, half = stored.rpartition("_")
    return (weight, half) if weight and half in MXFP4_HALVES else None
