"""Scoring plans as they will ship, from cached dense states: healed or not, each computation done once.

``CachedHealer`` fits the linear map of every removed span (``lorp.heal``'s fit) from a
``StateCache`` of the heal windows: a dense fit reads its anchor's MLP output from the cache where the
capture kept it (no block runs), else runs the anchor block on its cached state; a fit on a model
already cut (``sequential`` mode) runs the blocks from its first anchor to its own; a fit any
candidate shares with an earlier one (the same span, and in ``sequential`` mode the same spans
before it) is reused. ``PlanScorer`` measures a plan's perplexity on a
``StateCache`` of the validation windows, running only the blocks from the plan's first change
onward, and when asked its mean KL from the dense model's predictions there (from the cached
dense final states, through the same head); a plan already scored is not measured again, and one
measured in full after its screening reads only the windows the screening did not. Both say how
much they did (fits, evaluations, seconds) for the report.
"""

from __future__ import annotations

import shutil
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lorp.blocks import decoder_blocks
from lorp.divergence import Divergence
from lorp.errors import InvalidRequestError, JobCancelled
from lorp.evaluation import mean_to_perplexity, state_nll
from lorp.execution import PlanPass, as_runner
from lorp.execution.healed import fold
from lorp.execution.onload import trim_heap
from lorp.execution.runner import real_tokens
from lorp.heal import DEFAULT_RIDGE, Fit, FitStatistics, HealMode, SpanFit, contiguous_spans
from lorp.options import SelectionMetric
from lorp.states import StateCache

# One batch's measure of one plan: the NLL sum, the real-token count (the positions both sums are
# over) and the KL sum from the dense predictions (None: this scorer does not measure KL).
BatchSums = tuple[float, int, float | None]


def healable_spans(plan: Sequence[int]) -> list[tuple[int, int]]:
    """The plan's removed spans that have a block before them to fold into."""
    return [(s, e) for s, e in contiguous_spans(plan) if s > 0]


def apply_fits(model: Any, fits: Sequence[Fit], stored: Mapping[int, torch.dtype] | None = None) -> None:
    """Fold the fits into the model for good (before its blocks are removed).

    ``stored`` maps an anchor block to the dtype its folded weights are written in; a folded weight is
    rounded to it, so that the model measured is the one the checkpoint holds.
    """
    blocks = decoder_blocks(model)
    for fit in fits:
        block = blocks[fit.anchor]
        changed = fold(model, block, fit.T)
        dtype = (stored or {}).get(fit.anchor)
        if dtype is None:
            continue
        with torch.no_grad():
            for name in changed:
                tensor = block.get_parameter(name)
                if tensor.dtype != dtype:
                    tensor.copy_(tensor.to(dtype).to(tensor.dtype))


def _check(should_cancel: Callable[[], bool] | None) -> None:
    if should_cancel is not None and should_cancel():
        raise JobCancelled("the job was cancelled")


class CachedHealer:
    """The heal fits of any plan, from the dense states of the heal windows.

    Args:
        model: the dense model (left unchanged).
        cache: dense states on the heal windows (never the validation windows the plans are scored on).
        mode: ``sequential`` (each span fitted on the model pruned and healed before it) or ``dense``.
        ridge: the pull toward the identity (``lorp.heal``).
        max_cached_anchors: anchors whose dense outputs (M, h) and M^T M are kept for later fits.
        spill: a folder the fits' maps are written to and read back from when a fold needs them, rather
            than held (a sequential job's scratch: it scores many candidates of a wide model).
    """

    def __init__(
        self,
        model: Any,
        cache: StateCache,
        *,
        mode: HealMode = "sequential",
        ridge: float = DEFAULT_RIDGE,
        should_cancel: Callable[[], bool] | None = None,
        max_cached_anchors: int = 8,
        spill: Path | None = None,
    ) -> None:
        self.runner = as_runner(model)
        self.cache = cache
        self.mode = mode
        self.ridge = ridge
        self.should_cancel = should_cancel
        self._fits: dict[tuple[tuple[int, int], ...], Fit] = {}
        self._anchors: OrderedDict[int, tuple[list[tuple[torch.Tensor, torch.Tensor]] | None, torch.Tensor | Path]] = (
            OrderedDict()
        )
        self.max_cached_anchors = max_cached_anchors
        self.spill = spill
        if spill is not None:  # an earlier attempt's maps are not reused: the folder starts empty
            shutil.rmtree(spill, ignore_errors=True)
            spill.mkdir(parents=True)
        self.fits_computed = 0
        self.anchor_passes = 0  # anchors whose block ran again (their MLP outputs were not kept)
        self.seconds = 0.0

    def fits(self, plan: Sequence[int]) -> list[Fit]:
        """One fit per healable span of ``plan``, in depth order (computed now or reused)."""
        spans = healable_spans(plan)
        out: list[Fit] = []
        for k, span in enumerate(spans):
            key = (span,) if self.mode == "dense" or k == 0 else tuple(spans[: k + 1])
            if key not in self._fits:
                started = time.perf_counter()
                fit = self._fit(span, spans[:k], out)
                if self.spill is not None:
                    fit = fit.spilled(self.spill / f"fit-{len(self._fits):05d}-{span[0]}-{span[1]}.pt")
                    trim_heap()  # a fit's d x d float64 temporaries, freed, go back to the system
                self._fits[key] = fit
                self.fits_computed += 1
                self.seconds += time.perf_counter() - started
            out.append(self._fits[key])
        return out

    def _anchor_outputs(
        self, anchor: int, first: int, removed: list[int], applied: list[Fit]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per batch, the anchor's MLP output M and block output h on the real tokens, with the
        blocks before ``first`` and ``removed`` dropped and ``applied`` folded in."""
        runner = self.runner
        batches = self.cache.batches
        outputs: list[torch.Tensor] = [torch.empty(0)] * len(batches)

        def keep_m(i: int, j: int, _h: torch.Tensor) -> None:
            if j == anchor:
                outputs[i] = real_tokens(m[0], batches[i].real)

        _check(self.should_cancel)
        with runner.pruned(removed, applied), runner.watch_mlp([anchor]) as watched:
            m = watched[anchor]
            states = [self.cache.state(b, first) for b in range(len(batches))]
            finals = runner.run_all(batches, start=first, states=states, stop=anchor + 1, on_output=keep_m)
        return [
            (m_rows.to(h.device), real_tokens(h, batch.real))
            for m_rows, h, batch in zip(outputs, finals, batches, strict=True)
        ]

    def _kept_outputs(self, anchor: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """The anchor's dense (M, h) from the cache, when the pass that filled it kept the blocks' MLP
        outputs (h is the state entering the next block); None when it did not."""
        rows = []
        for b, batch in enumerate(self.cache.batches):
            m = self.cache.mlp_output(b, anchor)
            if m is None:
                return None
            h = real_tokens(self.cache.state(b, anchor + 1), batch.real)
            rows.append((m.to(h.device), h))
        return rows

    def _dense_anchor(self, anchor: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, bool]:
        """The anchor's (M, h) on the dense model, M^T M and whether that tensor is the one kept here
        (a fit must not write it), kept for the most recent anchors: every
        span that starts after this anchor reuses them (a search grows spans at their end). Rows the
        cache holds (a capture kept the MLP outputs) are read from it again rather than kept twice:
        only M^T M, the costly part, and the rows a pass had to compute are kept here; with ``spill``
        M^T M waits in a file too (d^2 x 8 bytes: 32 MB at width 2,048)."""
        if anchor in self._anchors:
            self._anchors.move_to_end(anchor)
            rows_kept, gram = self._anchors[anchor]
            rows = rows_kept if rows_kept is not None else self._kept_outputs(anchor)
            assert rows is not None
            stored = gram if isinstance(gram, torch.Tensor) else torch.load(gram, weights_only=True)
            mtm = stored.to(self.runner.device)
            return rows, mtm, mtm is gram
        rows = self._kept_outputs(anchor)
        in_cache = rows is not None
        if rows is None:
            rows = self._anchor_outputs(anchor, anchor, [], [])
            self.anchor_passes += 1
        m0 = rows[0][0]
        # On the runner's device: in sequential mode the rows wait on the host, and a GPU forms the
        # Gram matrix (tokens x d^2 in float64) far faster than the host does.
        mtm = torch.zeros(m0.shape[-1], m0.shape[-1], dtype=torch.float64, device=self.runner.device)
        for m, _ in rows:
            m64 = m.to(self.runner.device, torch.float64)
            mtm.addmm_(m64.T, m64)
        kept: torch.Tensor | Path
        if self.spill is not None:
            kept = self.spill / f"mtm-{anchor:05d}.pt"
            torch.save(mtm.cpu(), kept)
        else:
            kept = mtm.to(m0.device)  # kept where the rows are (the host in sequential mode)
        self._anchors[anchor] = (None if in_cache else rows, kept)
        while len(self._anchors) > self.max_cached_anchors:
            self._anchors.popitem(last=False)
        return rows, mtm, kept is mtm

    def _fit(self, span: tuple[int, int], earlier: list[tuple[int, int]], earlier_fits: list[Fit]) -> Fit:
        start, end = span
        anchor = start - 1
        stats = FitStatistics(self.runner.device)  # statistics and solve on the device (see _dense_anchor)
        if self.mode == "dense" or not earlier:
            rows, mtm, shared = self._dense_anchor(anchor)
            stats.use_gram(mtm, shared=shared)
        else:
            removed = [b for s, e in earlier for b in range(s, e)]
            rows = self._anchor_outputs(anchor, earlier_fits[0].anchor, removed, earlier_fits)
            mtm = None
        for batch, (m, h) in enumerate(rows):
            target = real_tokens(self.cache.state(batch, end), self.cache.batches[batch].real)
            stats.add(m, target - (h - m), gram=mtm is None)
        del mtm, rows
        T, before, after = stats.solve(self.ridge)
        return Fit(
            held=T,
            span=SpanFit(
                start=start,
                end=end,
                anchor=anchor,
                num_tokens=stats.tokens,
                residual_before=before,
                residual_after=after,
            ),
        )


GROUP_STATE_BYTES = 128 * 2**20
"""The most bytes of plans' states one block-major scoring pass holds at once. Every plan in a pass
carries its own state per validation batch from its first change to the end, so scoring a search's or
auto's dozens of plans in one pass would hold dozens of copies of the validation states; past this cap
the plans are scored in several passes (in sequential execution, each pass loads its blocks again: more
block loads for a bounded peak). The scores are the same either way."""


class PlanScorer:
    """Validation scores of plans, from the dense states of the validation windows.

    A plan's score is what ``metric`` says: its validation perplexity, or (``kl``) the mean over the
    same positions of KL(dense || pruned) of the next-token distributions (``lorp.divergence``), the
    dense predictions taken from the cached states leaving the dense model's last block through the
    same head. Perplexity is always measured; KL only when the metric or ``measure_kl`` asks for it
    (it costs a second head pass per window), and then for every plan. ``score(..., metric=)`` reads
    either one of what was measured.

    ``score(plan, screen=True)`` measures only the first ``screen_windows`` windows: a search
    compares closely related plans on the same tokens, where a few windows rank them well, and
    measures its finalists on all of them (the screened windows' sums are kept, not measured again).

    Args:
        model: the dense model (left unchanged).
        cache: dense states on the validation windows.
        healer: fits for healed scores (None: plans are scored unhealed only).
        screen_windows: windows a screening score reads (rounded up to whole batches).
        metric: what :meth:`score` returns unless told otherwise.
        measure_kl: measure KL beside perplexity even when ``metric`` is perplexity (a ``max_kl`` target).
        group_state_bytes: most bytes of plan states one pass holds (:data:`GROUP_STATE_BYTES`).
    """

    def __init__(
        self,
        model: Any,
        cache: StateCache,
        *,
        healer: CachedHealer | None = None,
        should_cancel: Callable[[], bool] | None = None,
        screen_windows: int = 4,
        metric: SelectionMetric = "perplexity",
        measure_kl: bool = False,
        group_state_bytes: int = GROUP_STATE_BYTES,
    ) -> None:
        self.runner = as_runner(model)
        self.cache = cache
        self.healer = healer
        self.should_cancel = should_cancel
        self.metric: SelectionMetric = metric
        self.measures_kl = measure_kl or metric == "kl"
        self.screen_batches = min(cache.num_batches, max(1, -(-screen_windows // cache.batch_size)))
        # Per plan (and healed or not), the BatchSums of each batch measured so far, from the first:
        # a full measure after a screening runs only the batches it did not read.
        self._nll: dict[tuple[tuple[int, ...], bool], list[BatchSums]] = {}
        # The dense final state of each batch a KL was taken on, read from the cache once: a resident
        # cache's own tensor; a sequential job's, read from disk, then held on the host (one of the
        # N + 1 states per batch).
        self._dense_finals: dict[int, torch.Tensor] = {}
        self.group_state_bytes = group_state_bytes
        self.evaluations = 0
        self.screenings = 0
        self.seconds = 0.0

    @property
    def heals(self) -> bool:
        return self.healer is not None

    def fits(self, plan: Sequence[int]) -> list[Fit]:
        return self.healer.fits(plan) if self.healer is not None else []

    def score(
        self,
        plan: Sequence[int],
        *,
        healed: bool | None = None,
        screen: bool = False,
        metric: SelectionMetric | None = None,
    ) -> float:
        """The plan's validation score, healed when this scorer heals (``healed=False``: as cut).

        ``screen``: on the first windows only (``screen_windows``). ``metric``: ``perplexity`` or
        ``kl`` (mean nats) rather than the scorer's own ``metric``; ``kl`` needs a scorer that
        measures it (``measures_kl``).
        """
        return self.score_many([plan], healed=healed, screen=screen, metric=metric)[0]

    def figures(
        self, plan: Sequence[int], *, healed: bool | None = None, screen: bool = False
    ) -> tuple[float, float | None]:
        """The plan's validation perplexity and mean KL (None where this scorer does not measure KL),
        from one measure: what a report shows of it."""
        perplexity = self.score(plan, healed=healed, screen=screen, metric="perplexity")
        return perplexity, self.score(plan, healed=healed, screen=screen, metric="kl") if self.measures_kl else None

    def score_many(
        self,
        plans: Sequence[Sequence[int]],
        *,
        healed: bool | None = None,
        screen: bool = False,
        metric: SelectionMetric | None = None,
    ) -> list[float]:
        """:meth:`score` of several plans, measured together: one pass over the blocks serves every
        plan not scored before (``Runner.run_plans``: in sequential mode each block is loaded once for
        all of them, not once per plan)."""
        metric = metric or self.metric
        if metric == "kl" and not self.measures_kl:
            raise ValueError("this scorer does not measure KL: give it metric='kl' or measure_kl=True")
        heal = self.heals if healed is None else healed and self.heals
        batches = self.screen_batches if screen else self.cache.num_batches
        keys = [(tuple(sorted(set(plan))), heal) for plan in plans]
        pending = [key for key in dict.fromkeys(keys) if len(self._nll.get(key, [])) < batches]
        if pending:
            fits = {key: self.fits(key[0]) if heal else [] for key in pending}  # the healer times its own fits
            started = time.perf_counter()
            by_done: dict[int, list[tuple[tuple[int, ...], bool]]] = {}
            for key in pending:
                by_done.setdefault(len(self._nll.get(key, [])), []).append(key)
            for done, group in by_done.items():
                sums = self._measure([key[0] for key in group], [fits[key] for key in group], done, batches)
                for key, plan_sums in zip(group, sums, strict=True):
                    self._nll.setdefault(key, []).extend(plan_sums)
            if batches == self.cache.num_batches:
                self.evaluations += len(pending)
            else:
                self.screenings += len(pending)
            self.seconds += time.perf_counter() - started
        return [self._reduce(key, batches, metric) for key in keys]

    def _reduce(self, key: tuple[tuple[int, ...], bool], batches: int, metric: SelectionMetric) -> float:
        """The plan's score over its first ``batches`` batches: the perplexity of the summed NLL, or
        the summed KL over the same token count."""
        nll, tokens, kl = 0.0, 0, 0.0
        for batch_nll, batch_tokens, batch_kl in self._nll[key][:batches]:
            nll += batch_nll
            tokens += batch_tokens
            kl += batch_kl or 0.0
        if metric == "perplexity":
            return mean_to_perplexity(nll, tokens)
        if tokens == 0:
            raise InvalidRequestError("no tokens to evaluate", field="evaluation.dataset")
        return kl / tokens

    def _start(self, plan: tuple[int, ...], fits: list[Fit]) -> int:
        """The first block a plan's pass runs: its first change (a removed block or an anchor); with
        every block from there on removed, the last kept block before it (the logits need a state
        leaving a block the pruned model keeps)."""
        n_blocks = self.cache.num_blocks
        changed = [*plan, *(fit.anchor for fit in fits)]
        start = min(changed) if changed else n_blocks - 1
        removed = set(plan)
        if all(b in removed for b in range(start, n_blocks)):
            start = max(b for b in range(start) if b not in removed)
        return start

    def _measure(
        self, plans: list[tuple[int, ...]], fits: list[list[Fit]], first: int, batches: int
    ) -> list[list[BatchSums]]:
        """Per plan, the :data:`BatchSums` of each batch ``first .. batches-1``: the plans in groups whose
        states in flight stay under ``group_state_bytes`` (one block-major pass per group)."""
        probe = self.cache.state(first, 0)
        tokens = sum(batch.ids.numel() for batch in self.cache.batches[first:batches])
        per_plan = tokens * probe.shape[-1] * probe.element_size()
        size = max(1, self.group_state_bytes // max(1, per_plan))
        sums: list[list[BatchSums]] = []
        for at in range(0, len(plans), size):
            sums.extend(self._measure_group(plans[at : at + size], fits[at : at + size], first, batches))
        return sums

    def _measure_group(
        self, plans: list[tuple[int, ...]], fits: list[list[Fit]], first: int, batches: int
    ) -> list[list[BatchSums]]:
        """:meth:`_measure` of one group, in one pass."""
        _check(self.should_cancel)
        cached = self.cache.batches[first:batches]
        passes = []
        for plan, plan_fits in zip(plans, fits, strict=True):
            start = self._start(plan, plan_fits)
            states = [self.cache.state(b, start) for b in range(first, batches)]
            passes.append(PlanPass(frozenset(plan), {fit.anchor: fit for fit in plan_fits}, start, states))
        finals = self.runner.run_plans(cached, passes, should_cancel=self.should_cancel)
        with self.runner.head():
            return [
                [self._sums(b, final) for b, final in zip(range(first, batches), plan_finals, strict=True)]
                for plan_finals in finals
            ]

    def _sums(self, b: int, final: torch.Tensor) -> BatchSums:
        """Batch ``b``'s sums for a plan whose pass left ``final``; the KL sum against the dense final
        state the cache holds for the batch (through the same head, a window at a time)."""
        batch = self.cache.batches[b]
        if not self.measures_kl:
            return (*state_nll(self.runner, batch, final), None)
        if b not in self._dense_finals:
            self._dense_finals[b] = self.cache.state(b, self.cache.num_blocks)
        divergence = Divergence()
        nll, tokens = state_nll(self.runner, batch, final, dense=self._dense_finals[b], divergence=divergence)
        return nll, tokens, divergence.kl_sum
