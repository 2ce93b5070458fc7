"""Method ``auto``: validate every candidate plan on held-out calibration text and keep the best.

Selection criteria disagree badly on some models (docs/algorithm.md §7: on SmolLM2-135M LoRP's published plan
at 4/30 blocks gives perplexity ~3100 where ShortGPT's gives ~37), so no plan reaches a user
without being measured. Candidates run as temporary views of the one loaded model: blocks are
dropped and restored in place, never copied, so validation needs no extra weight memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lorp.blocks import pruned_view
from lorp.calibration import TokenWindows
from lorp.evaluation import perplexity
from lorp.selection import Selection, SelectionOptions, candidate_plans


@dataclass
class AutoResult:
    """The winning plan and how every candidate scored (held-out perplexity, lower is better)."""

    chosen: Selection
    candidates: dict[str, Selection]
    scores: dict[str, float]
    duplicates: dict[str, str] = field(default_factory=dict)  # candidate -> the one with the same plan


def score_candidates(
    model: Any,
    candidates: dict[str, Selection],
    validation: TokenWindows,
    *,
    batch_size: int = 4,
    progress: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> tuple[dict[str, float], dict[str, str]]:
    """Held-out perplexity of each candidate plan; identical plans are measured once.

    Returns:
        (scores by candidate name, {candidate: earlier candidate with the same blocks}).
    """
    measured: dict[tuple[int, ...], str] = {}
    scores: dict[str, float] = {}
    duplicates: dict[str, str] = {}
    unique = {tuple(sel.pruned_layers) for sel in candidates.values()}
    done = 0
    for name, sel in candidates.items():
        key = tuple(sel.pruned_layers)
        if key in measured:
            scores[name] = scores[measured[key]]
            duplicates[name] = measured[key]
            continue
        with pruned_view(model, key):
            scores[name] = perplexity(model, validation, batch_size=batch_size, should_cancel=should_cancel)
        measured[key] = name
        done += 1
        if progress is not None:
            progress(done, len(unique))
    return scores, duplicates


def choose_best(scores: dict[str, float], order: Sequence[str]) -> str:
    """The candidate with the lowest finite score; ties go to the earlier name in ``order``."""
    best = min(order, key=lambda name: (scores[name] if math.isfinite(scores[name]) else math.inf, order.index(name)))
    return best


def auto_select(
    model: Any,
    S: np.ndarray,
    D: np.ndarray | None,
    n: int,
    validation: TokenWindows,
    *,
    options: SelectionOptions | None = None,
    batch_size: int = 4,
    progress: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> AutoResult:
    """Build every candidate plan from (S, D, n), score each on ``validation`` and keep the best.

    Args:
        model: The dense model the statistics came from (left unchanged on return).
        S: (N+1)x(N+1) similarity matrix.
        D: (N+1)x(N+1) angular distances, or None (the angular baseline is then skipped).
        n: Number of blocks to remove.
        validation: Held-out calibration windows (never the evaluation text).
        options: Selection options shared by all candidates (protected blocks, K override, seed).
        batch_size: Sequences per forward pass while scoring.
        progress: Called as ``progress(plans_done, plans_total)``.
        should_cancel: Checked between batches.

    Jobs choose through ``lorp.planner`` (the same candidates, scored from cached states and healed
    as they ship); this is the plain, uncached form.
    """
    opts = options or SelectionOptions()
    candidates = candidate_plans(S, D, n, opts)
    scores, duplicates = score_candidates(
        model, candidates, validation, batch_size=batch_size, progress=progress, should_cancel=should_cancel
    )
    best = choose_best(scores, list(candidates))
    return AutoResult(chosen=candidates[best], candidates=candidates, scores=scores, duplicates=duplicates)
