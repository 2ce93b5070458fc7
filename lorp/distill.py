"""Distillation heal (``options.heal: distill``, docs/algorithm.md §8c): after the linear maps are folded
and the blocks removed, a short training of low-rank adapters on the kept blocks toward the dense
model's next-token distributions on the calibration windows, merged into the weights.

- The teacher is the dense model's final states on the windows (:class:`DenseFinals`, kept by a dense
  pass before the cut): depth pruning leaves the final norm and head unchanged, so the dense logits
  come from those states through the pruned model's own head, a window at a time.
- The student is the pruned model with LoRA adapters on its kept blocks (:data:`SCOPES`; on their linear
  layers, and on their experts in a mixture of experts: ``lorp.adapters``): the loss is the mean over
  counted positions of KL(dense || pruned), the measure the job reports (``lorp.divergence``). Each step is
  one batch of windows, in an order drawn from the seed, through the blocks together and through the head
  and the loss a window at a time; adapters start as zero updates.
- The steps start from the linear heal with each healed cut's anchor block first trained alone toward
  the dense span's output (:data:`WARM_STEPS`, ``lorp.anchor_training``), on the dense states the
  teacher's pass kept around the cut on the first windows (:func:`plan_teacher`): a head start no step
  of the whole model finds as cheaply.
- Where the model computes in float32 on a device with native bfloat16 arithmetic (an AMX or
  AVX512-BF16 CPU, a CUDA GPU that has it), the teacher's pass over the training windows and every step
  run under bfloat16 autocast (:func:`training_autocast`): the adapters and their optimiser stay in
  float32, and the validation passes that decide what ships stay in the model's own precision.
- The validation windows decide what ships (never the held-out text, never the training windows):
  the distilled model only where it scores better than the linear heal it started from, by the job's
  selection metric; otherwise the adapters are dropped unmerged, the anchors put back, and the model is
  the linear heal, bit for bit. :class:`DistillSummary` says which shipped and why.

Resident only: a backward pass needs the blocks it runs held with their activations. Sequential
execution distils block-locally instead (``lorp.local_distill``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from lorp.adapters import ALPHA, Adapters, Targets, targets
from lorp.anchor_training import train_anchor
from lorp.blocks import block_layout, decoder_blocks, input_device, pruned_view
from lorp.calibration import TokenWindows
from lorp.divergence import CutStates, DenseFinals, Divergence, next_token_valid, position_kl
from lorp.errors import JobCancelled
from lorp.evaluation import mean_to_perplexity, negative_log_likelihood
from lorp.execution import Runner, folded
from lorp.execution.healed import FoldedMap
from lorp.heal import contiguous_spans
from lorp.options import DEFAULT_HEAL_STEPS, DEFAULT_LOCAL_HEAL_STEPS, SelectionMetric
from lorp.pretrained import stored_quantization
from lorp.quantization import MXFP4, quant_method

LEARNING_RATE = 5e-3
RANK = 32
"""The adapters' rank. On fresh windows more rank keeps paying: at 8 of 30 blocks on the demo model,
100 steps at ranks 8, 16, 32 and 64 reach held-out perplexities of 22.22, 21.95, 21.78 and 21.69 for
about the same time (the adapters' products are small beside the blocks'; docs/benchmarks.md)."""
Scope = Literal["all", "tail", "cuts"]
SCOPES: tuple[Scope, ...] = ("all", "tail", "cuts")
"""Which kept blocks get adapters: every one; every one from the first cut's anchor on (the blocks
before it are frozen, so their output is computed once per window and each step runs only the rest);
or the two after each cut (the anchor the map is folded into and the block after it). Jobs use every
one: on fresh windows the blocks before the cut learn too (at 8 of 30 blocks on the demo model, 80
steps reach a held-out perplexity of 22.31 against 23.11 for the tail; docs/benchmarks.md)."""
DEFAULT_SCOPE: Scope = "all"
CE_WEIGHT = 0.1
"""The weight of the student's cross-entropy on the training windows' own next tokens beside the KL (the
loss is KL + CE_WEIGHT x cross-entropy, both means over the counted positions). With each cut's anchor
first (:data:`WARM_STEPS`), at 8 of 30 blocks on the demo model weights 0 / 0.1 / 0.2 give a held-out
perplexity of 21.38 / 21.09 / 20.88 and mean KL 0.448 / 0.448 / 0.452; at 4 blocks 17.38 / 17.04 /
16.80 and 0.2054 / 0.2051 / 0.208, the built-in task 0.555 / 0.550 / 0.555. Of the weights tried, 0.1
is the largest the KL does not pay for; larger weights pull the student toward the text and away from
the dense model (0.494 at 1.0; docs/benchmarks.md)."""
WARM_STEPS = DEFAULT_LOCAL_HEAL_STEPS
"""Steps each healed cut's anchor block trains toward the dense span's output (``lorp.anchor_training``,
block-local distillation's defaults) before the whole model's steps start; 0 starts them from the linear
heal. At 8 of 30 blocks on the demo model this start takes 100 steps from a held-out perplexity of 21.77
/ mean KL 0.462 to 21.38 / 0.448, for 0.6 of a capture more (side by side, docs/benchmarks.md)."""
WARM_WINDOWS = 64
"""The training windows (the first ones: the capture's) whose dense states around each cut the teacher's
pass keeps for the anchors' start: two states per cut and token, at most :data:`WARM_STATE_BYTES` in all
(fewer windows where they would be more)."""
WARM_STATE_BYTES = 2 * 1024**3
"""The most host memory the states kept for the anchors' start take (float32 counted): 75 MB on the demo
model at 64 windows of 256 tokens; a model of width 8,192 on 2,048-token windows keeps 16 windows a cut."""
READS_PER_WINDOW = 1
"""How many times a distillation reads each training window, at most where the calibration text has
enough: a job draws ``steps x batch_size / READS_PER_WINDOW`` windows (:func:`windows_to_read`), the
capture's and more. Read more often, the adapters learn the windows rather than the model: at 8 of 30
blocks on the demo model, 80 steps of 4 on 320 windows read once reach a held-out perplexity of 23.11
where the same steps on 80 windows read 4 times reach 23.76 (tail scope, docs/benchmarks.md). Each
window costs the teacher a pass through the dense blocks (not the head)."""


@dataclass(frozen=True)
class DistillSummary:
    """What a distillation did and which model shipped.

    ``shipped``: ``distill`` or ``linear``; ``reason`` says why. Scores are on the validation windows:
    perplexity, and mean KL from the dense model, before (the linear heal) and after distillation.
    """

    steps: int
    tokens: int
    seconds: float
    learning_rate: float
    rank: int
    scope: str
    blocks: list[int]
    metric: str
    linear_perplexity: float
    linear_kl: float
    distilled_perplexity: float | None
    distilled_kl: float | None
    first_loss: float | None
    last_loss: float | None
    shipped: str
    reason: str
    loss: str = "kl"
    """What was learned: ``kl``, the whole pruned model's next-token distributions against the dense
    model's (resident); ``state``, each cut's anchor block's output against the dense span's output,
    relative squared error (block-local, ``lorp.local_distill``: sequential execution); ``kl+ce``, the
    KL and the student's cross-entropy on the windows' next tokens (:data:`CE_WEIGHT`, ``ce_weight``)."""
    ce_weight: float = 0.0
    """The cross-entropy's weight beside the KL (``kl+ce``); 0 for the KL alone."""
    precision: str = "float32"
    """What the training passes computed in: ``bfloat16`` under autocast (:func:`training_autocast`), else
    the model's own dtype."""
    warm_steps: int = 0
    """Steps each healed cut's anchor block trained toward the dense span's output before the whole
    model's steps (:data:`WARM_STEPS`; whole-model distillation only)."""
    windows: int = 0
    """The distinct windows trained on: :func:`windows_to_read` of the steps where the calibration text
    has them, fewer where it ran out; the capture's where those are more."""

    @property
    def shipped_perplexity(self) -> float:
        """The validation perplexity of the model that shipped (distilled, or the linear heal)."""
        if self.shipped == "distill" and self.distilled_perplexity is not None:
            return self.distilled_perplexity
        return self.linear_perplexity


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware: a CUDA GPU that says so, or a CPU with
    AMX tiles or AVX512-BF16 (elsewhere bfloat16 is emulated, slower than float32)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        cpu = getattr(torch, "cpu", None)
        checks = [getattr(cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
        return any(bool(check()) for check in checks if check is not None)
    return False


def training_autocast(model: Any) -> torch.dtype | None:
    """The dtype a distillation's training passes compute in under autocast: bfloat16 where the model
    is in float32 on a device with native bfloat16 (:func:`native_bfloat16`), else None (the model's own
    dtype; a bfloat16 or float16 model already computes in half precision). On the demo model on an AMX
    CPU, a training step takes 0.61 and the teacher's pass 0.38 of their float32 time, and the
    distilled model's held-out figures are the same to three digits (docs/benchmarks.md)."""
    if next(model.parameters()).dtype != torch.float32:
        return None
    return torch.bfloat16 if native_bfloat16(torch.device(input_device(model))) else None


def _autocast(model: Any, dtype: torch.dtype | None) -> Any:
    """A context computing in ``dtype`` under autocast on the model's device; nothing where None."""
    return torch.autocast(torch.device(input_device(model)).type, dtype=dtype, enabled=dtype is not None)


def dense_finals(
    model: Any,
    windows: TokenWindows,
    batch_size: int,
    should_cancel: Callable[[], bool] | None,
    entering_block: int = 0,
    autocast: torch.dtype | None = None,
    keep: dict[int, list[torch.Tensor]] | None = None,
    keep_windows: int = 0,
) -> DenseFinals:
    """The dense model's states leaving its last block on ``windows`` (one pass through the blocks, not
    the head: the logits are taken from these states a window at a time as the steps read them), the
    teacher's; and, for ``entering_block`` > 0, the states entering that block on the way: the first
    block a distillation trains (:func:`first_trained_block`), whose frozen blocks before it the
    student would otherwise run once more on every window. ``autocast``: the dtype the pass computes in
    (the training windows' teacher, :func:`training_autocast`); None for the model's own (the validation
    windows', which decide what ships). ``keep``: lists by block, filled with the states entering each
    (the number of blocks: the states leaving the last) on the batches of the first ``keep_windows``
    windows (:func:`plan_teacher`)."""
    runner = Runner(model)
    finals = DenseFinals(entering_block=entering_block)
    kept = {} if keep is None else keep
    batches = runner.batches(windows, batch_size, should_cancel=should_cancel, doing="distilling")
    seen = 0

    def collect(_: int, block: int, state: torch.Tensor) -> None:
        if block in kept:
            kept[block].append(state.detach().to("cpu"))

    with torch.inference_mode(), _autocast(model, autocast):
        for group in runner.groups(batches):
            wanted = collect if seen < keep_windows else None
            states = runner.run_all(group, stop=entering_block, on_input=wanted) if entering_block else None
            if states is not None:
                finals.entering += [state.detach().to("cpu") for state in states]
            for final in runner.run_all(group, start=entering_block, states=states, on_input=wanted):
                finals.keep(final)
                if wanted is not None and runner.num_blocks in kept:
                    kept[runner.num_blocks].append(finals.finals[-1])
            seen += sum(batch.num_windows for batch in group)
    return finals


def first_trained_block(
    num_blocks: int, removed: Sequence[int], anchors: Sequence[int], scope: Scope = DEFAULT_SCOPE
) -> int:
    """The first block (dense numbering) a distillation of the plan (``removed``, each cut's ``anchors``
    in dense numbering) puts adapters on, where the pruned model's state entering it is the dense
    model's (no block before it is removed); else 0."""
    kept = [b for b in range(num_blocks) if b not in set(removed)]
    blocks = adapted_blocks(len(kept), pruned_anchors(list(anchors), sorted(removed)), scope)
    first = kept[min(blocks)] if blocks else 0
    return first if all(r > first for r in removed) else 0


def plan_teacher(
    model: Any,
    windows: TokenWindows,
    batch_size: int,
    removed: Sequence[int],
    anchors: Sequence[int],
    *,
    scope: Scope = DEFAULT_SCOPE,
    autocast: torch.dtype | None = None,
    warm_windows: int = WARM_WINDOWS,
    should_cancel: Callable[[], bool] | None = None,
) -> DenseFinals:
    """The teacher for distilling one plan (``removed``, each cut's ``anchors`` in dense numbering) on the
    training ``windows``: the dense ``model``'s final states, the states entering the first block the
    plan's student trains (:func:`first_trained_block`), and around each healed cut the states entering
    its anchor and leaving its span on the first ``warm_windows`` windows (the anchor's warm start,
    :func:`distill`), computed as the steps compute (``autocast``, :func:`training_autocast` in a job)."""
    num_blocks = len(decoder_blocks(model))
    gone = sorted(int(b) for b in removed)
    first = first_trained_block(num_blocks, gone, anchors, scope)
    healed = set(anchors)
    spans = [(start - 1, end) for start, end in contiguous_spans(gone) if start - 1 in healed]
    keep_at = sorted({block for span in spans for block in span}) if warm_windows else []
    if keep_at:  # within the memory bound, at least one batch
        width = int(model.get_input_embeddings().embedding_dim)
        per_window = len(keep_at) * windows.input_ids.shape[1] * width * 4
        warm_windows = max(1, min(warm_windows, WARM_STATE_BYTES // per_window))
    kept: dict[int, list[torch.Tensor]] = {block: [] for block in keep_at}
    finals = dense_finals(
        model, windows, batch_size, should_cancel, entering_block=first, autocast=autocast, keep=kept,
        keep_windows=warm_windows,
    )  # fmt: skip
    finals.plan = tuple(gone)
    finals.cuts = [
        CutStates(pruned_anchors([anchor], gone)[0], kept[anchor], kept[end])
        for anchor, end in spans
        if kept.get(anchor)
    ]
    return finals


def _validation(model: Any, windows: TokenWindows, finals: DenseFinals, batch_size: int) -> tuple[float, float]:
    """Validation perplexity and mean KL from the dense model of the model as it stands."""
    divergence = Divergence()
    nll, tokens = negative_log_likelihood(model, windows, batch_size=batch_size, against=finals, divergence=divergence)
    return mean_to_perplexity(nll, tokens), divergence.summary()["kl_mean"]


MAX_TRAINING_WINDOWS = 1024
"""The most training windows a distillation draws, whatever its steps: the teacher keeps two states
per token of them (0.6 GB for 1,024 windows of 256 tokens at width 576 in float32, 4.3 GB at 4,096 in
bfloat16); a longer run reads them more often."""


def windows_to_read(steps: int, batch_size: int) -> int:
    """The training windows ``steps`` of ``batch_size`` windows read, each :data:`READS_PER_WINDOW`
    times, at most :data:`MAX_TRAINING_WINDOWS`."""
    return min(math.ceil(steps * batch_size / READS_PER_WINDOW), MAX_TRAINING_WINDOWS)


def pruned_anchors(anchors: list[int], removed: list[int]) -> list[int]:
    """Each anchor block's index in the pruned model (the kept blocks renumbered after ``removed``)."""
    return [a - sum(1 for r in removed if r < a) for a in anchors]


def adapted_blocks(num_kept: int, anchors: list[int], scope: Scope) -> list[int]:
    """The kept blocks (pruned model's numbering) that get adapters (:data:`SCOPES`; ``anchors``: the
    kept block before each cut, in the pruned numbering)."""
    if scope == "all" or not anchors:
        return list(range(num_kept))
    if scope == "tail":
        return list(range(max(0, min(anchors)), num_kept))
    return sorted({b for a in anchors for b in (a, a + 1) if 0 <= b < num_kept})


def trains_experts(model: Any, block: int, anchors: Sequence[int]) -> bool:
    """Whether the experts of the pruned ``model``'s kept ``block`` get adapters (in a mixture of
    experts): yes, but where the checkpoint stores them in MXFP4 (gpt-oss as OpenAI ships it) only in
    the cuts' ``anchors``, which the folded map makes unquantized anyway; adapted elsewhere they would
    be written unquantized too, four times their stored bytes, so there they stay as stored."""
    return block in anchors or quant_method(stored_quantization(model)) != MXFP4


def _adapted(model: Any, blocks: list[int], anchors: Sequence[int]) -> dict[str, tuple[torch.nn.Module, Targets]]:
    """The decoder blocks ``blocks`` of ``model`` with what in each gets adapters, by their names."""
    path, kept = block_layout(model).path, decoder_blocks(model)
    return {f"{path}.{b}": (kept[b], targets(kept[b], experts=trains_experts(model, b, anchors))) for b in blocks}


def distilled_weights(model: Any, blocks: list[int], anchors: Sequence[int]) -> dict[str, torch.Tensor]:
    """The weights distillation changed (merged into the adapted weights of ``blocks``; ``anchors``: the
    cuts' anchors, pruned numbering), by name."""
    return {
        f"{prefix}.{name}": block.get_parameter(name)
        for prefix, (block, wanted) in _adapted(model, blocks, anchors).items()
        for name in wanted.weights
    }


def loss_positions(mask: torch.Tensor, positions: int | None, order: torch.Generator) -> torch.Tensor | None:
    """The positions of one window whose next-token predictions a step's loss reads: None for every
    counted one, else ``positions`` of them drawn from ``order``, in order."""
    counted = next_token_valid(mask)[0].nonzero().squeeze(1)
    if positions is None or positions >= counted.numel():
        return None if positions is None else counted
    return counted[torch.randperm(counted.numel(), generator=order)[:positions]].sort().values


def distill(
    model: Any,
    train: TokenWindows,
    train_finals: DenseFinals,
    validation: TokenWindows,
    validation_finals: DenseFinals,
    *,
    anchors: list[int],
    steps: int = DEFAULT_HEAL_STEPS,
    batch_size: int = 4,
    seed: int = 0,
    metric: SelectionMetric = "perplexity",
    learning_rate: float = LEARNING_RATE,
    rank: int = RANK,
    scope: Scope = DEFAULT_SCOPE,
    positions: int | None = None,
    autocast: torch.dtype | None = None,
    ce_weight: float = CE_WEIGHT,
    warm_steps: int = WARM_STEPS,
    position_weights: Sequence[torch.Tensor] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    progress: Callable[[int, int], None] | None = None,
    merge: bool = True,
) -> DistillSummary:
    """Distil the pruned ``model`` (resident, changed in place) toward the dense model; see the module.

    Args:
        model: the pruned model, linear maps folded, blocks removed.
        train, train_finals: calibration windows and the dense model's final states on them
            (:func:`dense_finals`, batched by ``batch_size``); where it kept the states entering a block,
            they must be this plan's (:func:`first_trained_block`), and the student starts from them.
        validation, validation_finals: the validation windows and the dense final states there.
        anchors: each cut's anchor block in the pruned model's numbering (``scope`` cuts).
        steps: optimiser steps, each ``batch_size`` windows; 0 ships the linear heal.
        seed: the adapters' initialisation and the window order.
        metric: what decides between the distilled and the linear model on the validation windows.
        positions: the positions of each window the loss reads, drawn anew each time from the seed
            (the head and the KL then run on those alone); None reads every counted position.
        autocast: the dtype the steps compute in (:func:`training_autocast`); None for the model's own.
            The validation passes that decide what ships always run in the model's own.
        ce_weight: the weight of the student's cross-entropy on the windows' next tokens beside the KL
            (:data:`CE_WEIGHT`); 0 learns the KL alone.
        position_weights: per training window, a weight for each position's prediction (``[tokens - 1]``,
            in window order): its KL counts that many times in the loss (``scripts/bench_distill.py``'s
            ``--context-weight`` weights by how much a prediction depends on distant context; it did not
            help, docs/benchmarks.md). None weighs every position alike.
        warm_steps: steps each cut's anchor block first trains toward the dense span's output, on the
            states the teacher kept around the cut (``train_finals.cuts``, :func:`plan_teacher`); none
            where it kept none. Where the linear heal ships, the anchors are put back as they were.
        merge: False measures only: the adapters are dropped whichever way the guard decides, and the
            model is left as it came (:func:`trial`).
    """
    started = time.perf_counter()
    linear_ppl, linear_kl = _validation(model, validation, validation_finals, batch_size)
    kept = len(decoder_blocks(model))
    blocks = adapted_blocks(kept, anchors, scope)
    base = DistillSummary(
        steps=0, tokens=0, seconds=0.0, learning_rate=learning_rate, rank=rank, scope=scope, blocks=blocks,
        metric=metric, linear_perplexity=linear_ppl, linear_kl=linear_kl, distilled_perplexity=None,
        distilled_kl=None, first_loss=None, last_loss=None, shipped="linear", reason="options.heal_steps is 0",
        windows=train.num_windows, precision=str(autocast or next(model.parameters()).dtype).removeprefix("torch."),
        loss="kl+ce" if ce_weight else "kl", ce_weight=ce_weight,
    )  # fmt: skip
    if steps == 0:
        return dataclasses.replace(base, seconds=time.perf_counter() - started)
    warm = train_finals.cuts if warm_steps else []
    warmed = _warm_start(model, train, warm, warm_steps, seed, should_cancel)
    adapters = Adapters(_adapted(model, blocks, anchors), rank=rank, alpha=ALPHA, seed=seed)
    try:
        losses, tokens = _train(
            model, adapters, train, train_finals, min(blocks), steps, batch_size, seed, learning_rate, positions,
            autocast, ce_weight, should_cancel, progress, position_weights,
        )  # fmt: skip
    except BaseException:  # a cancel: the model as it came
        adapters.end(merge=False)
        _put_back(warmed)
        raise
    distilled_ppl, distilled_kl = _validation(model, validation, validation_finals, batch_size)
    before, after = (linear_ppl, distilled_ppl) if metric == "perplexity" else (linear_kl, distilled_kl)
    better = math.isfinite(after) and after < before
    what = "validation perplexity" if metric == "perplexity" else "validation KL"
    adapters.end(merge=better and merge)
    if not (better and merge):  # the adapters dropped unmerged and the anchors put back: the linear heal as it was
        _put_back(warmed)
    if better:
        reason = f"distillation lowered the {what} from {before:.4g} to {after:.4g}"
    else:
        reason = f"distillation did not lower the {what} ({before:.4g} linear, {after:.4g} distilled): "
        reason += "the linear heal ships"
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return dataclasses.replace(
        base, steps=steps, tokens=tokens, seconds=time.perf_counter() - started, distilled_perplexity=distilled_ppl,
        distilled_kl=distilled_kl, first_loss=losses[0], last_loss=losses[-1],
        shipped="distill" if better else "linear", reason=reason, warm_steps=warm_steps if warm else 0,
    )  # fmt: skip


def _warm_start(
    model: Any,
    train: TokenWindows,
    cuts: Sequence[CutStates],
    steps: int,
    seed: int,
    should_cancel: Callable[[], bool] | None,
) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """Each cut's anchor block (pruned numbering) trained ``steps`` toward the dense span's output from the
    dense state entering it, on the first windows (``cuts``: the states the teacher kept), in depth
    order; its linear weights replaced by the trained ones in place. Returns each replaced parameter with
    its values as they were (:func:`_put_back`; the parameters stay the same objects under the adapters)."""
    if not cuts or steps == 0:
        return []
    runner = Runner(model)
    ends = list(itertools.accumulate(state.shape[0] for state in cuts[0].entering))  # the teacher's batches
    batches = [
        runner.batch(train.input_ids[begin:end], train.attention_mask[begin:end])
        for begin, end in zip([0, *ends], ends, strict=False)
    ]
    blocks = decoder_blocks(model)

    def step_done() -> None:
        if should_cancel is not None and should_cancel():
            raise JobCancelled("the job was cancelled while distilling the pruned model")

    originals: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    try:
        for cut in cuts:
            block = blocks[cut.anchor]
            trained = train_anchor(
                block, cut.anchor, batches, cut.entering, cut.leaving, steps=steps, seed=seed,
                device=runner.device, keep=runner.device, step_done=step_done,
                experts=trains_experts(model, cut.anchor, [c.anchor for c in cuts]),
            )  # fmt: skip
            for name, weight in trained.weights.items():
                target = block.get_parameter(name)
                originals.append((target, target.detach().clone()))
                with torch.no_grad():
                    target.copy_(weight)
    except BaseException:  # a cancel: the anchors trained so far put back
        _put_back(originals)
        raise
    return originals


def _put_back(originals: Sequence[tuple[torch.nn.Parameter, torch.Tensor]]) -> None:
    """The weights :func:`_warm_start` replaced, as they were (the first cut's first)."""
    with torch.no_grad():
        for parameter, values in reversed(originals):
            parameter.copy_(values)


def trial(
    model: Any,
    removed: Sequence[int],
    fits: Sequence[FoldedMap],
    train: TokenWindows,
    train_finals: DenseFinals,
    validation: TokenWindows,
    validation_finals: DenseFinals,
    **training: Any,
) -> DistillSummary:
    """What distilling a plan would ship, measured on the dense resident ``model`` and undone: its
    maps folded and its blocks cut for the length of the call, distilled and scored, the adapters
    dropped (the budget curve drawn distilled, ``evaluation.curve_distill``). ``training``: as
    :func:`distill` takes it."""
    removed = sorted(int(b) for b in removed)
    first = first_trained_block(
        len(decoder_blocks(model)), removed, [fit.anchor for fit in fits], training.get("scope", DEFAULT_SCOPE)
    )
    if train_finals.entering and train_finals.entering_block != first:  # kept for another plan's student
        train_finals = dataclasses.replace(train_finals, entering=[], entering_block=0)
    if train_finals.cuts and train_finals.plan != tuple(removed):  # around another plan's cuts
        train_finals = dataclasses.replace(train_finals, cuts=[])
    with folded(model, fits), pruned_view(model, removed):
        anchors = pruned_anchors([fit.anchor for fit in fits], removed)
        return distill(
            model, train, train_finals, validation, validation_finals, anchors=anchors, merge=False, **training
        )


def _per_window(states: list[torch.Tensor]) -> list[torch.Tensor]:
    """Batches' states as one ``[1, tokens, d]`` view per window, in order (no copy)."""
    return [row for state in states for row in state.split(1)]


def _train(
    model: Any,
    adapters: Adapters,
    train: TokenWindows,
    train_finals: DenseFinals,
    first: int,
    steps: int,
    batch_size: int,
    seed: int,
    learning_rate: float,
    positions: int | None,
    autocast: torch.dtype | None,
    ce_weight: float,
    should_cancel: Callable[[], bool] | None,
    progress: Callable[[int, int], None] | None,
    position_weights: Sequence[torch.Tensor] | None = None,
) -> tuple[list[float], int]:
    """The optimiser loop: per step, one batch of windows, through the blocks together and through the
    head and the loss a window at a time (their gradients gathered on the state leaving the last block,
    then sent back through the blocks once); returns each step's mean KL (nats) and the tokens trained
    on. Blocks before ``first`` (the first adapted one) never change: the state entering ``first`` is
    computed once per window, and each step runs from there."""
    runner = Runner(model)
    finals = _per_window(train_finals.finals)
    if len(finals) != train.num_windows:
        raise ValueError("the teacher's final states do not match the training windows")
    masks = list(train.attention_mask.to(runner.device).split(1))  # each window's, as its step batch holds it
    entering: list[torch.Tensor] = []  # per window, where the steps start after block 0
    if first > 0 and train_finals.entering_block == first and train_finals.entering:  # the teacher kept them
        entering = _per_window(train_finals.entering)
    elif first > 0:  # a batch per window: its calls fit its own mask
        with _autocast(model, autocast):
            entering = list(runner.run_all(list(runner.batches(train, 1)), stop=first))
    trained = adapters.parameters()
    optimiser = torch.optim.AdamW(trained, lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: 1.0 - step / steps)
    order = torch.Generator().manual_seed(seed)
    queue: list[int] = []
    losses: list[float] = []
    seen = 0
    model.train(False)  # no dropout: the adapters learn the deterministic model
    for step in range(steps):
        if should_cancel is not None and should_cancel():
            raise JobCancelled("the job was cancelled while distilling the pruned model")
        picked: list[int] = []
        while len(picked) < min(batch_size, len(finals)):
            if not queue:
                queue = torch.randperm(len(finals), generator=order).tolist()
            picked.append(queue.pop())
        keep = [loss_positions(masks[w], positions, order) for w in picked]
        counted = [
            int(next_token_valid(masks[w]).sum()) if k is None else k.numel() for w, k in zip(picked, keep, strict=True)
        ]
        total = max(1, sum(counted))
        step_loss = 0.0
        with torch.enable_grad(), _autocast(model, autocast):
            batch = runner.batch(train.input_ids[picked], train.attention_mask[picked])
            state = torch.cat([entering[w] for w in picked]).to(runner.device) if entering else None  # from the host
            final = runner.run_with_grad(batch, start=first, state=state)  # the blocks: the batch at once
            leaf = final.detach().requires_grad_()  # the head: a window at a time, into the leaf's gradient
            for row, (w, k) in enumerate(zip(picked, keep, strict=True)):
                rows = slice(row, row + 1)
                teacher = runner.logits(batch, finals[w], keep=k, rows=rows)
                student = runner.head_with_grad(batch, leaf[rows], rows=rows, keep=k)
                valid = next_token_valid(masks[w])[0]
                weights = None if position_weights is None else position_weights[w].to(student.device)
                if k is None:  # every position: the last predicts past the window, the padded ones nothing
                    kl = position_kl(teacher[:, :-1], student[:, :-1])[0]
                    loss = (kl if weights is None else kl * weights)[valid].sum()
                else:
                    kl = position_kl(teacher, student)[0]
                    loss = (kl if weights is None else kl * weights[k]).sum()
                if ce_weight:  # the student's own loss on the window's next tokens, beside the KL
                    ids = train.input_ids[w].to(student.device)
                    predicted, following = (
                        (student[0, :-1][valid], ids[1:][valid]) if k is None else (student[0], ids[k + 1])
                    )
                    loss = loss + ce_weight * torch.nn.functional.cross_entropy(
                        predicted.float(), following, reduction="sum"
                    )
                (loss / total).backward()
                step_loss += float(loss.detach()) / total
            final.backward(leaf.grad)
        optimiser.step()
        schedule.step()
        optimiser.zero_grad(set_to_none=True)
        losses.append(step_loss)
        seen += sum(counted)
        if progress is not None:
            progress(step + 1, steps)
    return losses, seen
