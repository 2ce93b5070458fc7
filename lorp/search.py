"""Method ``search``: plans grown block by block, every step validated, seeded by the one-pass plans.

A greedy removal in the manner of SLEB (Song et al., 2024): from the best plan of ``n`` blocks, try
adding one more block and keep the addition whose validation score (perplexity, or mean KL from
the dense model with ``options.selection_metric`` kl; healed, when healing is on) is lowest,
compared on the scorer's screening windows (``PlanScorer.score(screen=True)``).
Trying every block at every step costs ``N`` evaluations a step; this search tries a shortlist:
the ``width`` blocks the dense similarity ranks most redundant (ShortGPT's score) and the blocks
adjacent to the plan's spans (a span one block longer keeps its anchor, and its healed map often
absorbs the extra block). At the target budget the one-pass plans (``lorp.selection``'s
candidates) are screened too, the best of them and the searched plan are measured on every
validation window, and the best is kept (``lorp.planner``). Scores come from
``lorp.scoring.PlanScorer`` (cached prefix states).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from lorp.errors import JobCancelled
from lorp.scoring import PlanScorer

DEFAULT_WIDTH = 3


@dataclass(frozen=True)
class Step:
    """The best plan the search found at one budget, its screening perplexity (and mean KL from the
    dense model, where the scorer measures it), and how many candidates it tried."""

    num_layers: int
    pruned_layers: list[int]
    validation_perplexity: float
    tried: int
    validation_kl: float | None = None


@dataclass
class GreedySearch:
    """Grows a plan one block at a time; ``step()`` returns the best plan one block larger.

    Args:
        scorer: scores plans (healed when it heals).
        S: the dense (N+1) x (N+1) similarity matrix (its first off-diagonal ranks single blocks).
        eligible: the blocks that may be removed.
        width: how many of the most redundant remaining blocks each step tries, besides the
            blocks adjacent to the plan's spans.
    """

    scorer: PlanScorer
    S: np.ndarray
    eligible: Sequence[int]
    width: int = DEFAULT_WIDTH
    should_cancel: Callable[[], bool] | None = None
    plan: list[int] = field(default_factory=list)
    path: list[Step] = field(default_factory=list)

    def shortlist(self) -> list[int]:
        """The blocks the next step tries, most redundant first."""
        taken = set(self.plan)
        remaining = [b for b in self.eligible if b not in taken]
        redundant = sorted(remaining, key=lambda b: (-float(self.S[b, b + 1]), b))[: self.width]
        allowed = set(remaining)
        neighbours = [b for p in self.plan for b in (p - 1, p + 1) if b in allowed]
        return list(dict.fromkeys([*redundant, *neighbours]))

    def step(self) -> Step:
        if self.should_cancel is not None and self.should_cancel():
            raise JobCancelled("the job was cancelled during the search")
        options = self.shortlist()
        if not options:
            raise ValueError("no eligible block is left to remove")
        grown = self.scorer.score_many([[*self.plan, b] for b in options], screen=True)
        scored = list(zip(grown, options, strict=True))
        _, best = min(scored)
        self.plan = sorted([*self.plan, best])
        perplexity, kl = self.scorer.figures(self.plan, screen=True)  # measured already: read, not run
        step = Step(len(self.plan), list(self.plan), perplexity, len(options), kl)
        self.path.append(step)
        return step
