"""Training-free healing of a cut: a linear map folded into the block before each removed span.

For a removed contiguous span of blocks [s, e), the last kept block before it is b = s - 1. That
block returns ``h_s = Y + M``: its post-attention residual ``Y`` plus its MLP output ``M``. With the
span gone, its output feeds block e directly, where the dense model had ``h_e``. Healing fits

    T = argmin ||M T - (h_e - Y)||^2 + lam ||T - I||^2

on the calibration tokens (a ridge pulled toward the identity, so a span that adds nothing gets
exactly T = I) and folds it into block b's MLP output projection: ``W <- T^T W`` and ``b <- T^T b``
for a linear layer (``y = x W^T + b``), ``W <- W T`` for GPT-2's Conv1D (``y = x W + b``). The model
keeps its architecture and costs nothing more at inference (docs/algorithm.md §8a).

The statistics ``M^T M`` and ``M^T (h_e - Y)`` are accumulated in float64 over the real (unpadded)
tokens, d x d each, whatever the number of calibration windows. Spans are healed in depth order,
each fitted on the model as already pruned and healed before it (``sequential``), or all fitted on
the dense model in one pass (``dense``).

Architectures whose MLP output passes a norm before the residual add (Gemma 2/3 and OLMo 2/3's
post-feedforward norms, OPT with post-layer-norm) cannot take a folded linear map: they are refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch

from lorp.blocks import (
    block_input_hidden,
    block_layout,
    block_output_hidden,
    decoder_blocks,
    input_device,
    pruned_view,
    resolve_path,
)
from lorp.calibration import TokenWindows
from lorp.errors import InvalidRequestError, JobCancelled
from lorp.foldable import PROJECTIONS, fold_refusal

HealMode = Literal["sequential", "dense"]

DEFAULT_RIDGE = 1e-4


class _Stop(Exception):
    """Raised by a hook once everything a batch needs has been recorded."""


@dataclass(frozen=True)
class SpanFit:
    """One healed span [start, end), folded into block ``anchor`` = start - 1.

    ``residual_before`` and ``residual_after`` are ``||h_e - h_s|| / ||h_e - Y||`` without and with
    the map: how far block ``anchor``'s output is from what block ``end`` received in the dense model,
    relative to the part the MLP must supply.
    """

    start: int
    end: int
    anchor: int
    num_tokens: int
    residual_before: float
    residual_after: float


def contiguous_spans(pruned: Sequence[int]) -> list[tuple[int, int]]:
    """The removed blocks as maximal runs [start, end), in depth order."""
    spans: list[tuple[int, int]] = []
    for block in sorted(set(pruned)):
        if spans and spans[-1][1] == block:
            spans[-1] = (spans[-1][0], block + 1)
        else:
            spans.append((block, block + 1))
    return spans


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

    The in-memory fold and the checkpoint writer both call it, so a weight stored folded equals the one
    the engine measured. Computed a slice of input features at a time (a column of ``T^T W`` needs
    only the same column of ``W``), holding a slice in float64, never the whole weight.
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


class FitStatistics:
    """M^T M, M^T Z and the sums of squares a fit and its residuals need (Z = h_e - Y), in float64."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mtm = torch.zeros(0, 0, dtype=torch.float64)
        self.mtz = torch.zeros(0, 0, dtype=torch.float64)
        self.zz = 0.0
        self.tokens = 0

    def add(self, m: torch.Tensor, z: torch.Tensor, *, gram: bool = True) -> None:
        """Accumulate one batch's rows; ``gram=False`` leaves ``mtm`` alone (set from a cache)."""
        m64, z64 = m.to(self.device, torch.float64), z.to(self.device, torch.float64)
        if self.tokens == 0:
            width = m64.shape[-1]
            if gram:
                self.mtm = torch.zeros(width, width, dtype=torch.float64, device=self.device)
            self.mtz = torch.zeros(width, width, dtype=torch.float64, device=self.device)
        if gram:
            self.mtm += m64.T @ m64
        self.mtz += m64.T @ z64
        self.zz += float((z64 * z64).sum())
        self.tokens += m64.shape[0]

    def squared_error(self, T: torch.Tensor | None) -> float:
        """||M T - Z||^2 (``T=None``: the identity) from the statistics alone."""
        if T is None:
            return float(torch.trace(self.mtm) - 2 * torch.trace(self.mtz)) + self.zz
        return float(torch.sum(T * (self.mtm @ T)) - 2 * torch.sum(T * self.mtz)) + self.zz

    def solve(self, ridge: float) -> torch.Tensor:
        width = self.mtm.shape[0]
        lam = ridge * float(torch.trace(self.mtm)) / width or ridge
        eye = torch.eye(width, dtype=torch.float64, device=self.mtm.device)
        return torch.linalg.solve(self.mtm + lam * eye, self.mtz + lam * eye)

    def relative(self, squared: float) -> float:
        return math.sqrt(max(squared, 0.0) / self.zz) if self.zz > 0 else 0.0


@contextmanager
def _original_weights(saved: dict[int, tuple[torch.Tensor, torch.Tensor | None]], model: Any) -> Iterator[None]:
    """The dense model for the length of the block: projections folded so far get their weights back."""
    blocks = decoder_blocks(model)
    swapped: list[tuple[Any, torch.Tensor, torch.Tensor | None]] = []
    try:
        for anchor, (weight, bias) in saved.items():
            projection, _ = output_projection(model, blocks[anchor])
            current_bias = projection.bias.detach().clone() if getattr(projection, "bias", None) is not None else None
            swapped.append((projection, projection.weight.detach().clone(), current_bias))
            with torch.no_grad():
                projection.weight.copy_(weight)
                if bias is not None:
                    projection.bias.copy_(bias)
        yield
    finally:
        with torch.no_grad():
            for projection, weight, bias in swapped:
                projection.weight.copy_(weight)
                if bias is not None:
                    projection.bias.copy_(bias)


def real_tokens(hidden: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """The rows of the real (unpadded) tokens, ``[tokens, d]``, whether ``hidden`` is ``[B, T, d]`` or
    already flattened to ``[B*T, d]`` (OPT's MLP works on flattened tokens)."""
    return hidden.detach().reshape(-1, hidden.shape[-1])[real.reshape(-1).to(hidden.device)]


def _run_until(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> None:
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    except _Stop:
        pass


def _dense_targets(model: Any, ends: Sequence[int], ids: torch.Tensor, mask: torch.Tensor) -> dict[int, torch.Tensor]:
    """The state entering each block in ``ends`` (``N``: leaving the last block), real tokens only."""
    blocks = decoder_blocks(model)
    n_blocks = len(blocks)
    real = mask.bool()
    found: dict[int, torch.Tensor] = {}
    last = max(ends)
    handles = []

    def keep(end: int, hidden: torch.Tensor) -> None:
        found[end] = real_tokens(hidden, real)
        if end == last:
            raise _Stop

    for end in set(ends):
        if end < n_blocks:
            handles.append(
                blocks[end].register_forward_pre_hook(
                    lambda _m, args, kwargs, end=end: keep(end, block_input_hidden(args, kwargs)), with_kwargs=True
                )
            )
        else:
            handles.append(
                blocks[-1].register_forward_hook(lambda _m, _a, out: keep(n_blocks, block_output_hidden(out)))
            )
    try:
        _run_until(model, ids, mask)
    finally:
        for handle in handles:
            handle.remove()
    return found


def _anchor_outputs(
    model: Any, anchors: Sequence[torch.nn.Module], ids: torch.Tensor, mask: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(M, h_s) of each anchor block in the model as it stands, real tokens only, in depth order."""
    real = mask.bool()
    records: dict[int, dict[str, torch.Tensor]] = {i: {} for i in range(len(anchors))}
    handles = []
    for i, block in enumerate(anchors):
        projection, _ = output_projection(model, block)

        def on_projection(_m: Any, _a: Any, out: torch.Tensor, i: int = i) -> None:
            records[i]["m"] = real_tokens(out, real)

        def on_block(_m: Any, _a: Any, out: Any, i: int = i) -> None:
            records[i]["h"] = real_tokens(block_output_hidden(out), real)
            if i == len(anchors) - 1:
                raise _Stop

        handles.append(projection.register_forward_hook(on_projection))
        handles.append(block.register_forward_hook(on_block))
    try:
        _run_until(model, ids, mask)
    finally:
        for handle in handles:
            handle.remove()
    return [(records[i]["m"], records[i]["h"]) for i in range(len(anchors))]


def heal_cuts(
    model: Any,
    pruned_layers: Sequence[int],
    windows: TokenWindows,
    *,
    batch_size: int = 4,
    mode: HealMode = "sequential",
    ridge: float = DEFAULT_RIDGE,
    progress: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> list[SpanFit]:
    """Fit and fold one linear map per removed span of the dense ``model`` (blocks still present).

    The blocks in ``pruned_layers`` are not removed here (``lorp.blocks.remove_blocks`` does that
    afterwards); each span's anchor block gets its map folded in. A span starting at block 0 has no
    block before it and is left as it is.

    Args:
        model: the dense model, in eval mode.
        pruned_layers: the blocks the plan removes.
        windows: calibration windows (padding masked).
        batch_size: sequences per forward pass.
        mode: ``sequential`` (each span fitted on the model pruned and healed so far) or ``dense``.
        ridge: the pull toward the identity, relative to the mean eigenvalue of M^T M.
        progress: called as ``progress(passes_done, passes_total)``.
        should_cancel: checked between batches.

    Returns:
        One ``SpanFit`` per healed span, in depth order.
    """
    spans = [(s, e) for s, e in contiguous_spans(pruned_layers) if s > 0]
    if not spans:
        return []
    blocks = list(decoder_blocks(model))
    for start, _ in spans:
        output_projection(model, blocks[start - 1])  # refuses unfoldable architectures before any pass
    device = input_device(model)
    groups = [spans] if mode == "dense" else [[span] for span in spans]
    total = len(groups) * math.ceil(windows.num_windows / batch_size)
    done = 0
    saved: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
    fits: list[SpanFit] = []
    removed: list[int] = []
    for group in groups:
        stats = [FitStatistics(device) for _ in group]
        anchors = [blocks[start - 1] for start, _ in group]
        for begin in range(0, windows.num_windows, batch_size):
            if should_cancel is not None and should_cancel():
                raise JobCancelled("the job was cancelled while healing")
            ids = windows.input_ids[begin : begin + batch_size].to(device)
            mask = windows.attention_mask[begin : begin + batch_size].to(device)
            with _original_weights(saved, model):
                targets = _dense_targets(model, [end for _, end in group], ids, mask)
            with pruned_view(model, removed) if removed else nullcontext():
                outputs = _anchor_outputs(model, anchors, ids, mask)
            for (_, end), stat, (m, h) in zip(group, stats, outputs, strict=True):
                stat.add(m, targets[end] - (h - m))
            done += 1
            if progress is not None:
                progress(done, total)
        for (start, end), stat, anchor in zip(group, stats, anchors, strict=True):
            T = stat.solve(ridge)
            projection, kind = output_projection(model, anchor)
            weight = projection.weight.detach().clone()
            bias = projection.bias.detach().clone() if getattr(projection, "bias", None) is not None else None
            saved[start - 1] = (weight, bias)
            fold(projection, kind, T)
            fits.append(
                SpanFit(
                    start=start,
                    end=end,
                    anchor=start - 1,
                    num_tokens=stat.tokens,
                    residual_before=stat.relative(stat.squared_error(None)),
                    residual_after=stat.relative(stat.squared_error(T)),
                )
            )
            removed.extend(range(start, end))
    return fits
