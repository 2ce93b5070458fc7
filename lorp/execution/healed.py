"""Heal maps folded into a block's MLP output projection: for a pass, or for good.

A heal map ``T`` (d x d, ``lorp.heal``) acts on a block's MLP output; folding it into the weights
that compute that output linearly (``lorp.foldable``: ``W <- T^T W``, ``b <- b T`` for a linear layer,
``W <- W T`` for a Conv1D; each expert's down projection in a mixture of experts) makes the block
compute it at no extra cost. Passes that score a healed plan fold its maps for their length
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
from lorp.foldable import OUTLETS, Outlet, fold_refusal, outlet_scale
from lorp.pretrained import stored_quantization


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
    """Why this model's cuts cannot be healed by a folded linear map, or None when it can (its family,
    its config, and the quantization its checkpoint stores its weights in)."""
    return fold_refusal(
        block_layout(model).family, {**vars(model.config), "quantization_config": stored_quantization(model)}
    )


def outlet(model: Any) -> Outlet:
    """Where the model's blocks' MLP output leaves them (``lorp.foldable``); refuses what cannot fold."""
    why = heal_refusal(model)
    if why is not None:
        raise InvalidRequestError(f"healing cannot be applied: {why}", field="options.heal")
    return OUTLETS[block_layout(model).family]


def mlp_output(model: Any, block: torch.nn.Module) -> tuple[torch.nn.Module, float]:
    """The module of ``block`` whose output is its MLP output M (a heal map acts on it), and the number
    the block multiplies that output by before the residual add (Granite's ``residual_multiplier``)."""
    return resolve_path(block, outlet(model).watch), outlet_scale(block_layout(model).family, vars(model.config))


def fold_weights(model: Any, block: torch.nn.Module) -> dict[str, str]:
    """The weights of ``block`` (by name inside it) a map folds into, with their kinds: its MLP output
    projection and bias, or every expert's down projection (stacked), a shared expert's and their
    biases. Refuses what cannot fold."""
    where = outlet(model)
    found = {name: kind for name, _ in block.named_parameters() if (kind := where.kind(name)) is not None}
    if not any(kind != "bias" for kind in found.values()):
        raise InvalidRequestError(
            f"a block has no MLP output projection ({where.watch}) to fold a heal map into", field="options.heal"
        )
    return found


# Columns (rows for Conv1D) folded at a time: the float64 copies a fold makes are d x this, not the
# whole projection (a 70B model's down projection is 8192 x 28672: 1.9 GB in float64).
_FOLD_CHUNK = 1024


def folded_weight(weight: torch.Tensor, kind: str, T: torch.Tensor) -> torch.Tensor:
    """A weight with ``T`` folded into its output features (``kind``: ``lorp.foldable.KINDS``; leading
    dimensions are experts, folded one by one), computed in float64, in the weight's dtype.

    Computed a slice of input features at a time (a column of ``T^T W`` needs only the same column of
    ``W``), holding a slice in float64, never the whole weight.
    """
    t = T.to(device=weight.device, dtype=torch.float64)  # once: every expert's fold reads it
    if kind == "bias":
        return (weight.to(torch.float64) @ t).to(weight.dtype)
    if weight.dim() > 2:
        out = torch.empty_like(weight)
        for e in range(weight.shape[0]):
            out[e] = folded_weight(weight[e], kind, t)
        return out
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


def fold(model: Any, block: torch.nn.Module, T: torch.Tensor) -> list[str]:
    """Make ``block`` (one of ``model``'s) add ``M @ T`` where it added its MLP output ``M`` (T is d x d):
    ``T`` folded into each of :func:`fold_weights`. Returns the names of the weights changed."""
    weights = fold_weights(model, block)
    with torch.no_grad():
        for name, kind in weights.items():
            parameter = block.get_parameter(name)
            parameter.copy_(folded_weight(parameter, kind, T))
    return list(weights)


@contextmanager
def folded(model: Any, fits: Sequence[FoldedMap]) -> Iterator[None]:
    """The fits folded into their anchor blocks (and a :class:`TrainedFold`'s weights put in after its
    fold) for the length of the block, then the weights restored."""
    blocks = decoder_blocks(model)
    saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    try:
        for fit in fits:
            block = blocks[fit.anchor]
            names = [*fold_weights(model, block), *trained_weights(fit)]
            saved += [(block.get_parameter(name), block.get_parameter(name).detach().clone()) for name in names]
            fold(model, block, fit.T)
            put_weights(block, trained_weights(fit))
        yield
    finally:
        with torch.no_grad():
            for parameter, value in reversed(saved):
                parameter.copy_(value)
