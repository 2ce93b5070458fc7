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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from lorp.calibration import TokenWindows
from lorp.execution import Batch, Runner, as_runner
from lorp.execution.healed import (  # noqa: F401 (re-exported: the fold is part of what a heal is)
    fold,
    folded_bias,
    folded_weight,
    heal_refusal,
    output_projection,
)
from lorp.execution.runner import real_tokens

HealMode = Literal["sequential", "dense"]

DEFAULT_RIDGE = 1e-4


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


@dataclass(frozen=True)
class Fit:
    """A span's fitted map ``T`` (d x d, float64) and how well it fits.

    ``T`` is held in memory (``held``) or in a file (``file``, :meth:`spilled`) read back each time a
    fold asks for it: a job that scores many candidates keeps every fit for reuse, d^2 x 8 bytes each
    (32 MB at width 2,048, 512 MB at 8,192), and a pass folds one at a time.
    """

    span: SpanFit
    held: torch.Tensor | None = None
    file: Path | None = None

    @property
    def anchor(self) -> int:
        return self.span.anchor

    @property
    def T(self) -> torch.Tensor:
        if self.held is not None:
            return self.held
        if self.file is None:
            raise ValueError("a fit holds its map in memory or in a file")
        return torch.load(self.file, weights_only=True)

    def spilled(self, file: Path) -> Fit:
        """This fit with its map written to ``file`` and no longer held (the same fit when not held)."""
        if self.held is None:
            return self
        torch.save(self.held, file)
        return Fit(span=self.span, file=file)

    def loaded(self) -> Fit:
        """This fit with its map held in memory (for use after its file is gone)."""
        return self if self.held is not None else Fit(span=self.span, held=self.T)


def contiguous_spans(pruned: Sequence[int]) -> list[tuple[int, int]]:
    """The removed blocks as maximal runs [start, end), in depth order."""
    spans: list[tuple[int, int]] = []
    for block in sorted(set(pruned)):
        if spans and spans[-1][1] == block:
            spans[-1] = (spans[-1][0], block + 1)
        else:
            spans.append((block, block + 1))
    return spans


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
        quadratic = float(torch.vdot(T.reshape(-1), (self.mtm @ T).reshape(-1)))  # one d x d temporary
        return quadratic - 2 * float(torch.vdot(T.reshape(-1), self.mtz.reshape(-1))) + self.zz

    def solve(self, ridge: float) -> torch.Tensor:
        width = self.mtm.shape[0]
        lam = ridge * float(torch.trace(self.mtm)) / width or ridge
        eye = torch.eye(width, dtype=torch.float64, device=self.mtm.device)
        return torch.linalg.solve(self.mtm + lam * eye, self.mtz + lam * eye)

    def relative(self, squared: float) -> float:
        return math.sqrt(max(squared, 0.0) / self.zz) if self.zz > 0 else 0.0


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
    runner = as_runner(model)
    for start, _ in spans:
        output_projection(runner.model, runner.blocks[start - 1])  # refuses unfoldable architectures before any pass
    groups = [spans] if mode == "dense" else [[span] for span in spans]
    total = len(groups) * math.ceil(windows.num_windows / batch_size)
    done = 0
    fits: list[Fit] = []
    spans_fitted: list[SpanFit] = []
    for group in groups:
        stats = [FitStatistics(runner.device) for _ in group]
        # Fitted on the model pruned and healed by the earlier groups (none in dense mode).
        removed = [b for fit in fits for b in range(fit.span.start, fit.span.end)]
        for batch in runner.batches(windows, batch_size, should_cancel=should_cancel, doing="healing"):
            targets = _dense_targets(runner, batch, [end for _, end in group])
            with runner.pruned(removed, fits):
                outputs = _anchor_outputs(runner, batch, [start - 1 for start, _ in group])
            for (_, end), stat, (m, h) in zip(group, stats, outputs, strict=True):
                stat.add(m, targets[end] - (h - m))
            done += 1
            if progress is not None:
                progress(done, total)
        for (start, end), stat in zip(group, stats, strict=True):
            T = stat.solve(ridge)
            span = SpanFit(
                start=start,
                end=end,
                anchor=start - 1,
                num_tokens=stat.tokens,
                residual_before=stat.relative(stat.squared_error(None)),
                residual_after=stat.relative(stat.squared_error(T)),
            )
            fits.append(Fit(span=span, held=T))
            spans_fitted.append(span)
    for fit in fits:
        projection, kind = output_projection(runner.model, runner.blocks[fit.anchor])
        fold(projection, kind, fit.T)
    return spans_fitted


def _dense_targets(runner: Runner, batch: Batch, ends: Sequence[int]) -> dict[int, torch.Tensor]:
    """The dense state entering each block in ``ends`` (``N``: leaving the last block), real tokens only."""
    found: dict[int, torch.Tensor] = {}
    wanted = set(ends)

    def keep(j: int, hidden: torch.Tensor) -> None:
        if j in wanted:
            found[j] = real_tokens(hidden, batch.real)

    top = max(ends)
    found[top] = real_tokens(runner.run(batch, stop=top, on_input=keep), batch.real)
    return found


def _anchor_outputs(runner: Runner, batch: Batch, anchors: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(M, h_s) of each anchor block in the model as the runner's view has it, real tokens only."""
    outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
    state: torch.Tensor | None = None
    at = 0
    for anchor in anchors:
        projection, _ = output_projection(runner.model, runner.blocks[anchor])
        with runner.watch(projection) as m:
            state = runner.run(batch, start=at, state=state, stop=anchor + 1)
        outputs.append((real_tokens(m[0], batch.real), real_tokens(state, batch.real)))
        at = anchor + 1
    return outputs
