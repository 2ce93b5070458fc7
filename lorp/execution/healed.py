"""Heal maps folded into a block's MLP output projection: for a pass, or for good.

A heal map ``T`` (d x d, ``lorp.heal``) acts on a block's MLP output; folding it into the output
projection (``W <- T^T W``, ``b <- b T`` for a linear layer, ``W <- W T`` for GPT-2's Conv1D) makes
the block compute it at no extra cost. Passes that score a healed plan fold its maps for their length
(:func:`folded`); the checkpoint writer folds the stored weights with the same :func:`folded_weight`,
so a weight stored folded equals the one the engine measured.

A map may come with the anchor block's weights trained on top of it (:class:`TrainedFold`, block-local
distillation, ``lorp.local_distill``): those weights, the fold already in them, replace the block's
own after the fold, for a pass or for good (:func:`put_weights`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from lorp.blocks import block_layout, decoder_blocks, resolve_path
from lorp.errors import InvalidRequestError
from lorp.foldable import PROJECTIONS, fold_refusal


class FoldedMap(Protocol):
    """What a fold needs of a fit: the block it folds into and its map."""

    @property
    def anchor(self) -> int: ...

    @property
    def T(self) -> torch.Tensor: ...


@dataclass(frozen=True)
class TrainedFold:
    """A heal map (``fit``, read when folded: maps kept in files stay there), and the weights its anchor
    block learned on top of it (by name inside the block, the fold already in them): what block-local
    distillation ships for a cut."""

    fit: FoldedMap
    weights: Mapping[str, torch.Tensor] = field(default_factory=dict)

    @property
    def anchor(self) -> int:
        return self.fit.anchor

    @property
    def T(self) -> torch.Tensor:
        return self.fit.T


def trained_weights(fit: FoldedMap) -> Mapping[str, torch.Tensor]:
    """The block weights a fit replaces after its fold (a :class:`TrainedFold`'s), or none."""
    return getattr(fit, "weights", None) or {}


def put_weights(block: torch.nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Copy ``weights`` (by name inside ``block``) into the block's parameters, cast to theirs."""
    with torch.no_grad():
        for name, value in weights.items():
            parameter = block.get_parameter(name)
            parameter.copy_(value.to(device=parameter.device, dtype=parameter.dtype))


def heal_refusal(model: Any) -> str | None:
    """Why this model's cuts cannot be healed by a folded linear map, or None when they can."""
    return fold_refusal(block_layout(model).family, vars(model.config))


def output_projection(model: Any, block: torch.nn.Module) -> tuple[Any, str]:
    """A block's MLP output projection and its kind (``linear`` or ``conv1d``); refuses what cannot fold."""
    why = heal_refusal(model)
    if why is not None:
        raise InvalidRequestError(f"healing cannot be applied: {why}", field="options.heal")
    path, kind = PROJECTIONS[block_layout(model).family]
    return resolve_path(block, path), kind


# Columns (rows for Conv1D) folded at a time: the float64 copies a fold makes are d x this, not the
# whole projection (a 70B model's down projection is 8192 x 28672: 1.9 GB in float64).
_FOLD_CHUNK = 1024


def folded_weight(weight: torch.Tensor, kind: str, T: torch.Tensor) -> torch.Tensor:
    """A projection's weight with ``T`` folded into its output, computed in float64, in the weight's dtype.

    Computed a slice of input features at a time (a column of ``T^T W`` needs only the same column of
    ``W``), holding a slice in float64, never the whole weight.
    """
    t = T.to(device=weight.device, dtype=torch.float64)
    out = torch.empty_like(weight)
    with torch.no_grad():
        if kind == "conv1d":  # y = x W + b, W: [in, out]
            for i in range(0, weight.shape[0], _FOLD_CHUNK):
                out[i : i + _FOLD_CHUNK] = (weight[i : i + _FOLD_CHUNK].to(torch.float64) @ t).to(weight.dtype)
        else:  # y = x W^T + b, W: [out, in]
            tt = t.T
            for j in range(0, weight.shape[1], _FOLD_CHUNK):
                out[:, j : j + _FOLD_CHUNK] = (tt @ weight[:, j : j + _FOLD_CHUNK].to(torch.float64)).to(weight.dtype)
    return out


def folded_bias(bias: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """A projection's bias with ``T`` folded into its output (``b <- b T``), in the bias's dtype."""
    return (bias.to(torch.float64) @ T.to(device=bias.device, dtype=torch.float64)).to(bias.dtype)


def fold(projection: Any, kind: str, T: torch.Tensor) -> None:
    """Make ``projection`` compute ``old_output @ T`` (T is d x d, applied to the output features)."""
    with torch.no_grad():
        projection.weight.copy_(folded_weight(projection.weight, kind, T))
        bias = getattr(projection, "bias", None)
        if bias is not None:
            bias.copy_(folded_bias(bias, T))


@contextmanager
def folded(model: Any, fits: Sequence[FoldedMap]) -> Iterator[None]:
    """The fits folded into their anchor blocks (and a :class:`TrainedFold`'s weights put in after its
    fold) for the length of the block, then the weights restored."""
    blocks = decoder_blocks(model)
    saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    try:
        for fit in fits:
            block = blocks[fit.anchor]
            projection, kind = output_projection(model, block)
            touched = [projection.weight, *([projection.bias] if getattr(projection, "bias", None) is not None else [])]
            touched += [block.get_parameter(name) for name in trained_weights(fit)]
            saved += [(parameter, parameter.detach().clone()) for parameter in touched]
            fold(projection, kind, fit.T)
            put_weights(block, trained_weights(fit))
        yield
    finally:
        with torch.no_grad():
            for parameter, value in reversed(saved):
                parameter.copy_(value)
