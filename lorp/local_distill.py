"""Block-local distillation: ``options.heal: distill`` where the model runs one block at a time.

A sequential job never holds the pruned model, so it cannot take a backward pass through it (what
``lorp.distill`` does resident). Here each cut's anchor block (the kept block before a removed span,
the block its linear map is folded into) learns on its own what the dense model's span gave: for a
span [s, e) with anchor a = s - 1, LoRA adapters (peft, on the anchor's linear layers) are trained so
that the anchor, run on the state the *pruned* model gives it, returns the dense state entering e.
The loss is the squared error over the real tokens relative to what the anchor and the span add
(``||h_e - x_a||^2``), so that its figures read like the linear fit's residual. Cuts are trained in
depth order, each on the pruned model as distilled before it.

One block-major pass over the model does it all, each block loaded once (each anchor twice):
- the dense streams (calibration and validation windows) run every block: the targets, and the
  dense final states that the validation KL is measured against;
- the student stream (calibration windows) and two validation streams (the linear heal, and the
  distilled model) run the kept blocks, with the maps folded;
- an anchor waits until the dense stream has left its span, then is loaded again, trained on a copy
  (the block itself is never changed), and its merged weights run the student and distilled streams.

The validation windows decide, as resident: the distilled weights ship only where they score better
than the linear heal by the job's selection metric; otherwise the fits ship as they were.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lorp.anchor_training import LOCAL_LEARNING_RATE, LOCAL_RANK, TrainedAnchor, train_anchor
from lorp.blocks import block_layout
from lorp.calibration import TokenWindows
from lorp.distill import DistillSummary, pruned_anchors
from lorp.divergence import Divergence
from lorp.errors import JobCancelled
from lorp.evaluation import mean_to_perplexity, state_nll
from lorp.execution import Batch, Runner
from lorp.execution.healed import FoldedMap, TrainedFold
from lorp.heal import contiguous_spans
from lorp.options import DEFAULT_LOCAL_HEAL_STEPS, SelectionMetric


def _run(
    runner: Runner, block: torch.nn.Module, index: int, batches: Sequence[Batch], states: list[torch.Tensor]
) -> list[torch.Tensor]:
    """Block ``index`` run on each batch's state (no gradients), the states it returns kept where the
    runner keeps states."""
    with torch.no_grad():
        return [
            batch.calls[index](block, state.to(runner.device)).to(runner.state_device)
            for batch, state in zip(batches, states, strict=True)
        ]


def _scores(
    runner: Runner, batches: Sequence[Batch], finals: list[torch.Tensor], dense: list[torch.Tensor]
) -> tuple[float, float]:
    """Perplexity and mean KL from the dense predictions of the states ``finals`` leaving the last block."""
    divergence = Divergence()
    nll, tokens = 0.0, 0
    with runner.head():
        for batch, final, teacher in zip(batches, finals, dense, strict=True):
            part, count = state_nll(runner, batch, final, dense=teacher, divergence=divergence)
            nll, tokens = nll + part, tokens + count
    return mean_to_perplexity(nll, tokens), divergence.summary()["kl_mean"]


@dataclasses.dataclass
class _Streams:
    """The states a block-local pass carries, per batch: the dense model's and the student's on the
    calibration windows; the dense model's, the linear heal's and the distilled model's on the
    validation windows."""

    dense: list[torch.Tensor]
    student: list[torch.Tensor]
    dense_val: list[torch.Tensor]
    linear_val: list[torch.Tensor]
    distilled_val: list[torch.Tensor]

    @classmethod
    def entering(cls, train: Sequence[Batch], validation: Sequence[Batch]) -> _Streams:
        dense, dense_val = [b.entering for b in train], [b.entering for b in validation]
        return cls(dense, list(dense), dense_val, list(dense_val), list(dense_val))


class _LocalPass:
    """One block-major pass that distils each healed cut's anchor (see the module)."""

    def __init__(
        self, runner: Runner, train: Sequence[Batch], validation: Sequence[Batch], tick: Callable[[], None]
    ) -> None:
        self.runner, self.train, self.validation, self.tick = runner, train, validation, tick
        self.streams = _Streams.entering(train, validation)
        self.trained: list[TrainedAnchor] = []
        self.shipped: dict[int, TrainedFold] = {}

    def _student(self, block: torch.nn.Module, index: int, *, linear: bool = True) -> None:
        """The student and the distilled model (and, with ``linear``, the linear heal) through a block."""
        r, s = self.runner, self.streams
        s.student = _run(r, block, index, self.train, s.student)
        s.distilled_val = _run(r, block, index, self.validation, s.distilled_val)
        if linear:
            s.linear_val = _run(r, block, index, self.validation, s.linear_val)

    def run(self, gone: frozenset[int], fits: dict[int, FoldedMap], waiting: dict[int, int], **training: Any) -> None:
        """Every block in order: the dense streams through each, the other streams through the kept
        ones; each anchor once the dense streams have left its span (trained when ``steps`` > 0)."""
        r, s = self.runner, self.streams
        for j in range(r.num_blocks):
            self.tick()
            with r.block(j) as block:
                s.dense = _run(r, block, j, self.train, s.dense)
                s.dense_val = _run(r, block, j, self.validation, s.dense_val)
                if j not in gone and j not in fits:
                    self._student(block, j)
            if j + 1 in waiting:
                self._anchor(waiting[j + 1], fits[waiting[j + 1]], **training)

    def _anchor(self, anchor: int, fit: FoldedMap, *, steps: int, **training: Any) -> None:
        r, s = self.runner, self.streams
        with r.block(anchor) as block:
            with r.folded_in(anchor, block, fit):
                s.linear_val = _run(r, block, anchor, self.validation, s.linear_val)
                if steps == 0:
                    self._student(block, anchor, linear=False)
                    return
                learned = train_anchor(
                    block, anchor, self.train, s.student, s.dense, steps=steps, device=r.device,
                    keep=r.state_device, step_done=self.tick, **training,
                )  # fmt: skip
            self.shipped[anchor] = TrainedFold(fit, r.stored_weights(anchor, learned.weights))
            self.trained.append(dataclasses.replace(learned, weights={}))  # its figures
            del learned  # its weights are held once, as they ship
            with r.folded_in(anchor, block, self.shipped[anchor]):
                self._student(block, anchor, linear=False)

    def scores(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """(perplexity, mean KL) on the validation windows of the linear heal and of the distilled model."""
        s = self.streams
        return (
            _scores(self.runner, self.validation, s.linear_val, s.dense_val),
            _scores(self.runner, self.validation, s.distilled_val, s.dense_val),
        )


def _verdict(
    metric: SelectionMetric, linear: tuple[float, float], distilled: tuple[float, float], steps: int
) -> tuple[bool, str]:
    """Whether the distilled model ships, and why."""
    if steps == 0:
        return False, "options.heal_steps is 0"
    at = 0 if metric == "perplexity" else 1
    before, after = linear[at], distilled[at]
    what = "validation perplexity" if metric == "perplexity" else "validation KL"
    if math.isfinite(after) and after < before:
        return True, (
            f"block-local distillation (sequential execution: each cut's anchor block learned the dense span's "
            f"output) lowered the {what} from {before:.4g} to {after:.4g}"
        )
    return False, (
        f"block-local distillation did not lower the {what} ({before:.4g} linear, {after:.4g} distilled): "
        "the linear heal ships"
    )


def distill_locally(
    runner: Runner,
    train: TokenWindows,
    validation: TokenWindows,
    *,
    removed: Sequence[int],
    fits: Sequence[FoldedMap],
    steps: int = DEFAULT_LOCAL_HEAL_STEPS,
    batch_size: int = 4,
    seed: int = 0,
    metric: SelectionMetric = "perplexity",
    learning_rate: float = LOCAL_LEARNING_RATE,
    rank: int = LOCAL_RANK,
    should_cancel: Callable[[], bool] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[DistillSummary, list[FoldedMap]]:
    """Distil each cut's anchor block toward the dense span it replaces (see the module); the dense
    model behind ``runner`` is left as it was.

    Args:
        runner: the dense model's runner (sequential, or resident: both give the same result).
        train, validation: the calibration windows trained on, and the windows that decide.
        removed, fits: the chosen plan's removed blocks and its heal maps (one per healed cut).
        steps: optimiser steps per anchor, each one batch of ``batch_size`` windows; 0 trains nothing
            (the pass still scores the linear heal) and ships the fits.

    Returns:
        The summary (``loss`` ``state``, ``scope`` ``local``; ``blocks``: the anchors in the pruned
        model's numbering) and the fits that ship: :class:`TrainedFold` s where distillation won,
        else ``fits`` unchanged.
    """
    started = time.perf_counter()
    gone = frozenset(int(b) for b in removed)
    by_anchor = {fit.anchor: fit for fit in fits}
    waiting = {end: start - 1 for start, end in contiguous_spans(sorted(gone)) if start - 1 in by_anchor}
    total = runner.num_blocks + steps * len(waiting)
    done = 0

    def tick() -> None:
        nonlocal done
        if should_cancel is not None and should_cancel():
            raise JobCancelled("the job was cancelled while distilling the pruned model")
        done += 1
        if progress is not None:
            progress(done, total)

    doing = "distilling the pruned model"
    local = _LocalPass(
        runner,
        list(runner.batches(train, batch_size, should_cancel=should_cancel, doing=doing)),
        list(runner.batches(validation, batch_size, should_cancel=should_cancel, doing=doing)),
        tick,
    )
    local.run(gone, by_anchor, waiting, steps=steps, seed=seed, learning_rate=learning_rate, rank=rank)
    linear, distilled = local.scores()
    better, reason = _verdict(metric, linear, distilled, steps if waiting else 0)
    if not waiting:
        reason = "no cut has a kept block before it to train: the linear heal ships"
    trained = local.trained
    summary = DistillSummary(
        steps=steps if waiting else 0, tokens=sum(t.tokens for t in trained), seconds=time.perf_counter() - started,
        learning_rate=learning_rate, rank=rank, scope="local",
        blocks=pruned_anchors(sorted(waiting.values()), sorted(gone)),
        metric=metric, linear_perplexity=linear[0], linear_kl=linear[1],
        distilled_perplexity=distilled[0] if trained else None, distilled_kl=distilled[1] if trained else None,
        first_loss=sum(t.first_loss for t in trained) / len(trained) if trained else None,
        last_loss=sum(t.last_loss for t in trained) / len(trained) if trained else None,
        shipped="distill" if better else "linear", reason=reason, loss="state", windows=train.num_windows,
    )  # fmt: skip
    return summary, [local.shipped.get(fit.anchor, fit) for fit in fits] if better else list(fits)


def pruned_weight_names(model: Any, removed: Sequence[int], fits: Sequence[FoldedMap]) -> dict[str, torch.Tensor]:
    """The trained weights of ``fits`` by their names in the pruned checkpoint (kept blocks renumbered),
    what the checkpoint writer replaces (``lorp.surgery.write_pruned(replaced=)``)."""
    path = block_layout(model).path
    gone = sorted(set(removed))
    out: dict[str, torch.Tensor] = {}
    for fit in fits:
        if isinstance(fit, TrainedFold):
            (index,) = pruned_anchors([fit.anchor], gone)
            out.update({f"{path}.{index}.{name}": value for name, value in fit.weights.items()})
    return out
