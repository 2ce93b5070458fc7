"""Training-free healing of a cut: a linear map folded into the block before each removed span.

For a removed contiguous span of blocks [s, e), the last kept block before it is b = s - 1. That
block returns ``h_s = Y + M``: its post-attention residual ``Y`` plus its MLP output ``M`` (a
mixture of experts' routed sum; Granite's scaled by its ``residual_multiplier``). With the
span gone, its output feeds block e directly, where the dense model had ``h_e``. Healing fits

    T = argmin ||M T - (h_e - Y)||^2 + lam ||T - I||^2

on the calibration tokens (a ridge pulled toward the identity, so a span that adds nothing gets
exactly T = I) and folds it into block b's MLP output projection: ``W <- T^T W`` and ``b <- T^T b``
for a linear layer (``y = x W^T + b``), ``W <- W T`` for GPT-2's Conv1D (``y = x W + b``); in a
mixture of experts into every expert's down projection and any shared expert's (``lorp.foldable``). The model
keeps its architecture and costs nothing more at inference (docs/algorithm.md §8a).

The statistics ``M^T M`` and ``M^T (h_e - Y)`` are accumulated in float64 over the real (unpadded)
tokens, d x d each, whatever the number of calibration windows (``FitStatistics``). Spans are healed
in depth order, each fitted on the model as already pruned and healed before it (``sequential``), or
all fitted on the dense model (``dense``): ``lorp.scoring.CachedHealer`` fits them from cached
dense states. This module holds what a fit is (``SpanFit``, ``Fit``, ``FitStatistics``, the spans of
a plan) and the fold.

Architectures whose MLP output passes a norm before the residual add (Gemma 2/3, OLMo 2/3, GLM-4 and
EXAONE 4's post-MLP norms, OPT with post-layer-norm) cannot take a folded linear map: they are refused.
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
    fold_weights,
    folded_weight,
    heal_refusal,
    mlp_output,
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
    """M^T M, M^T Z and the sums of squares a fit and its residuals need (Z = h_e - Y), in float64.

    ``mtm`` is formed here (``add``) or given (:meth:`use_gram`, from a cache); the solve factors it in
    place when it is the statistics' own, so a fit holds at most four d x d float64 matrices at once
    (three when it owns ``mtm``): 32 MB each at width 2,048, 512 MB at 8,192.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mtm = torch.zeros(0, 0, dtype=torch.float64)
        self.mtz = torch.zeros(0, 0, dtype=torch.float64)
        self.zz = 0.0
        self.tokens = 0
        self._gram_shared = False

    def use_gram(self, mtm: torch.Tensor, *, shared: bool) -> None:
        """Take M^T M from elsewhere (then ``add(..., gram=False)``); ``shared``: others read it too,
        so the solve factors a copy of it rather than it."""
        self.mtm, self._gram_shared = mtm, shared

    def add(self, m: torch.Tensor, z: torch.Tensor, *, gram: bool = True) -> None:
        """Accumulate one batch's rows; ``gram=False`` leaves ``mtm`` alone (set by :meth:`use_gram`)."""
        m64, z64 = m.to(self.device, torch.float64), z.to(self.device, torch.float64)
        if self.tokens == 0:
            width = m64.shape[-1]
            if gram:
                self.mtm = torch.zeros(width, width, dtype=torch.float64, device=self.device)
            self.mtz = torch.zeros(width, width, dtype=torch.float64, device=self.device)
        if gram:
            self.mtm.addmm_(m64.T, m64)  # into the sum: no d x d product beside it
        self.mtz.addmm_(m64.T, z64)
        self.zz += float((z64 * z64).sum())
        self.tokens += m64.shape[0]

    def solve(self, ridge: float) -> tuple[torch.Tensor, float, float]:
        """``T`` solving (M^T M + lam I) T = M^T Z + lam I, with lam = ``ridge`` x the mean of M^T M's
        diagonal, and the relative residuals without and with it (:class:`SpanFit`'s).

        By a Cholesky factor (the matrix is symmetric positive definite for lam > 0) formed in place, in
        ``mtm`` itself when it is the statistics' own (it is then spent: the statistics solve once), and
        two triangular solves in place in a copy of ``mtz``. The residual with ``T`` comes from the
        system it solves, M^T M T = M^T Z + lam (I - T), rather than from another d x d product.
        """
        if self.tokens == 0 or self.mtm.numel() == 0:
            raise ValueError("no statistics to solve: none were added, or their M^T M was spent by a solve")
        width = self.mtm.shape[0]
        trace = float(torch.trace(self.mtm))
        lam = ridge * trace / width or ridge
        before = trace - 2 * float(torch.trace(self.mtz)) + self.zz  # ||M - Z||^2: T = I
        factor = self.mtm.clone() if self._gram_shared else self.mtm
        factor.diagonal().add_(lam)
        info = torch.zeros((), dtype=torch.int32, device=factor.device)
        torch.linalg.cholesky_ex(factor, out=(factor, info))
        if int(info):
            raise ValueError(f"a heal fit's statistics are not positive definite (minor {int(info)}): non-finite?")
        if not self._gram_shared:
            self.mtm = torch.zeros(0, 0, dtype=torch.float64)  # spent: it holds the factor
        T = self.mtz.clone()
        T.diagonal().add_(lam)
        torch.linalg.solve_triangular(factor, T, upper=False, out=T)
        torch.linalg.solve_triangular(factor.mT, T, upper=True, out=T)
        del factor
        # ||M T - Z||^2 = <T, M^T M T> - 2 <T, M^T Z> + Z.Z, with M^T M T = M^T Z + lam (I - T):
        flat = T.reshape(-1)
        cross = float(torch.vdot(flat, self.mtz.reshape(-1)))
        after = self.zz - cross + lam * (float(torch.trace(T)) - float(flat @ flat))
        return T, self.relative(before), self.relative(after)

    def relative(self, squared: float) -> float:
        return math.sqrt(max(squared, 0.0) / self.zz) if self.zz > 0 else 0.0
