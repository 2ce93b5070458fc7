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
tokens, d x d each, whatever the number of calibration windows (``FitStatistics``). Spans are healed
in depth order, each fitted on the model as already pruned and healed before it (``sequential``), or
all fitted on the dense model (``dense``): ``lorp.scoring.CachedHealer`` fits them from cached
dense states. This module holds what a fit is (``SpanFit``, ``Fit``, ``FitStatistics``, the spans of
a plan) and the fold.

Architectures whose MLP output passes a norm before the residual add (Gemma 2/3 and OLMo 2/3's
post-feedforward norms, OPT with post-layer-norm) cannot take a folded linear map: they are refused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from lorp.execution.healed import (  # noqa: F401 (re-exported: the fold is part of what a heal is)
    fold,
    folded_bias,
    folded_weight,
    heal_refusal,
    output_projection,
)

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
        # (M^T M + lam I) T = M^T Z + lam I, with lam added to copies' diagonals: no identity matrix and
        # no lam * I beside them (two fewer d x d float64 temporaries, 32 MB each at width 2,048).
        a, b = self.mtm.clone(), self.mtz.clone()
        a.diagonal().add_(lam)
        b.diagonal().add_(lam)
        return torch.linalg.solve(a, b)

    def relative(self, squared: float) -> float:
        return math.sqrt(max(squared, 0.0) / self.zz) if self.zz > 0 else 0.0
