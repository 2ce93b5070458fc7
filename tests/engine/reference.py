"""Independent references for the tests: the plain, uncached way to compute what jobs compute.

Not what jobs run. A job chooses its plan through ``lorp.planner.choose_plan``: candidates scored
from cached dense states (``lorp.scoring.PlanScorer``) and heal maps fitted from cached states
(``lorp.scoring.CachedHealer``). The references here reach the same quantities directly, with no
cache: each candidate measured by a perplexity pass over a pruned view, each heal map fitted by
passes over the windows and folded in place; S and D are written out longhand per token and pair
from the model's own hidden states (``brute_force``). Tests hold the jobs' code to their answers;
nothing in ``lorp/`` imports this module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lorp.blocks import pruned_view
from lorp.calibration import TokenWindows
from lorp.divergence import next_token_valid, token_divergence
from lorp.evaluation import perplexity
from lorp.execution import Batch, Runner, as_runner
from lorp.execution.runner import real_tokens
from lorp.heal import (
    DEFAULT_RIDGE,
    Fit,
    FitStatistics,
    HealMode,
    SpanFit,
    contiguous_spans,
    fold,
    fold_weights,
    mlp_output,
)
from lorp.selection import Selection, SelectionOptions, candidate_plans


@dataclass
class ReferenceAuto:
    """Every candidate plan, its held-out score (perplexity, or mean KL) measured in full, and the lowest one's name."""

    chosen: str
    candidates: dict[str, Selection]
    scores: dict[str, float]


def reference_auto_select(
    model: Any,
    S: np.ndarray,
    D: np.ndarray | None,
    n: int,
    validation: TokenWindows,
    *,
    options: SelectionOptions | None = None,
    batch_size: int = 4,
    metric: str = "perplexity",
) -> ReferenceAuto:
    """``auto``'s choice the direct way: every plan of ``candidate_plans(S, D, n)`` measured unhealed on
    ``validation`` by a perplexity pass over a pruned view of ``model`` (``metric="kl"``: by
    :func:`reference_kl`) (identical plans once), the lowest kept (ties: the earlier candidate).
    Independent reference, not what jobs run."""
    candidates = candidate_plans(S, D, n, options or SelectionOptions())
    measured: dict[tuple[int, ...], float] = {}
    scores: dict[str, float] = {}
    for name, plan in candidates.items():
        key = tuple(sorted(plan.pruned_layers))
        if key not in measured and metric == "kl":
            measured[key] = reference_kl(model, key, validation)
        elif key not in measured:
            with pruned_view(model, key):
                measured[key] = perplexity(model, validation, batch_size=batch_size)
        scores[name] = measured[key]
    chosen = min(candidates, key=lambda name: scores[name])
    return ReferenceAuto(chosen=chosen, candidates=candidates, scores=scores)


def reference_kl(model: Any, pruned_layers: Sequence[int], validation: TokenWindows) -> float:
    """The mean KL(dense || pruned) of the next-token distributions over ``validation``'s counted
    positions, from transformers' own forward of ``model`` and of a pruned view of it (no cached state)."""
    ids, mask = validation.input_ids, validation.attention_mask
    with torch.no_grad():
        dense = model(input_ids=ids, attention_mask=mask).logits
        with pruned_view(model, pruned_layers):
            pruned = model(input_ids=ids, attention_mask=mask).logits
    kl, _ = token_divergence(dense, pruned, next_token_valid(mask))
    return float(kl.mean())


def reference_heal_cuts(
    model: Any,
    pruned_layers: Sequence[int],
    windows: TokenWindows,
    *,
    batch_size: int = 4,
    mode: HealMode = "sequential",
    ridge: float = DEFAULT_RIDGE,
) -> list[SpanFit]:
    """Fit and fold one linear map per removed span of the dense ``model`` (its blocks still present),
    streaming passes over ``windows``. Independent reference, not what jobs run.

    The blocks in ``pruned_layers`` are not removed here; each span's anchor block gets its map folded
    in. A span starting at block 0 has no block before it and is left as it is. ``sequential`` fits
    each span on the model pruned and healed so far; ``dense`` fits every span on the dense model.

    Returns:
        One ``SpanFit`` per healed span, in depth order.
    """
    spans = [(s, e) for s, e in contiguous_spans(pruned_layers) if s > 0]
    if not spans:
        return []
    runner = as_runner(model)
    for start, _ in spans:
        fold_weights(runner.model, runner.blocks[start - 1])  # refuses unfoldable architectures before any pass
    groups = [spans] if mode == "dense" else [[span] for span in spans]
    fits: list[Fit] = []
    for group in groups:
        stats = [FitStatistics(runner.device) for _ in group]
        # Fitted on the model pruned and healed by the earlier groups (none in dense mode).
        removed = [b for fit in fits for b in range(fit.span.start, fit.span.end)]
        for batch in runner.batches(windows, batch_size):
            targets = _dense_targets(runner, batch, [end for _, end in group])
            with runner.pruned(removed, fits):
                outputs = anchor_outputs(runner, batch, [start - 1 for start, _ in group])
            for (_, end), stat, (m, h) in zip(group, stats, outputs, strict=True):
                stat.add(m, targets[end] - (h - m))
        for (start, end), stat in zip(group, stats, strict=True):
            T, before, after = stat.solve(ridge)
            span = SpanFit(start, end, start - 1, stat.tokens, residual_before=before, residual_after=after)
            fits.append(Fit(span=span, held=T))
    for fit in fits:
        fold(runner.model, runner.blocks[fit.anchor], fit.T)
    return [fit.span for fit in fits]


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


def anchor_outputs(runner: Runner, batch: Batch, anchors: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(M, h_s) of each anchor block in the model as the runner's view has it, real tokens only."""
    outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
    state: torch.Tensor | None = None
    at = 0
    for anchor in anchors:
        with runner.watch(*mlp_output(runner.model, runner.blocks[anchor])) as m:
            state = runner.run(batch, start=at, state=state, stop=anchor + 1)
        outputs.append((real_tokens(m[0], batch.real), real_tokens(state, batch.real)))
        at = anchor + 1
    return outputs


def brute_force(model: torch.nn.Module, states_fn, windows: TokenWindows, last_token_only: bool = False):
    """Per sequence, per real token, per pair: the definition of S and D written out longhand."""
    seqs = []
    with torch.no_grad():
        for row in range(windows.input_ids.shape[0]):
            length = int(windows.attention_mask[row].sum())
            ids = windows.input_ids[row : row + 1, :length]
            seqs.append([h[0].double() for h in states_fn(model, ids)])  # L x [length, d]
    n_states = len(seqs[0])
    s_tot = np.zeros((n_states, n_states))
    d_tot = np.zeros((n_states, n_states))
    count = d_count = 0
    for states in seqs:
        length = states[0].shape[0]
        for t in range(length):
            xs = [h[t] / (h[t].norm() + 1e-8) for h in states]
            for i in range(n_states):
                for j in range(n_states):
                    dot = float(xs[i] @ xs[j])
                    s_tot[i, j] += dot
                    if not last_token_only or t == length - 1:
                        d_tot[i, j] += math.acos(max(-1.0, min(1.0, dot))) / math.pi
            count += 1
            d_count += 1 if (not last_token_only or t == length - 1) else 0
    S, D = s_tot / count, d_tot / d_count
    np.fill_diagonal(S, 1.0)
    np.fill_diagonal(D, 0.0)
    return S, D


def llama_states(model, ids):
    # hidden_states[0..N-1] are the block inputs; the last entry has the final norm applied, so
    # take h_N with the norm bypassed: an independent path from the capture's hooks.
    norm = model.model.norm
    model.model.norm = torch.nn.Identity()
    try:
        out = model(input_ids=ids, output_hidden_states=True)
    finally:
        model.model.norm = norm
    return list(out.hidden_states)
