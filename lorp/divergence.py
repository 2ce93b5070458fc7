"""How far the pruned model's predictions are from the dense model's, token by token (docs/algorithm.md §9).

Perplexity says how well a model predicts the text; it does not say whether the pruned model still
predicts what the dense one did. Here, on the same held-out windows and positions as the perplexity
(a position counts when it and the next are real tokens):

- ``kl_mean``: the mean over positions of KL(dense || pruned) of the next-token distributions, in nats;
- ``kl_p99``: its 99th percentile over positions (where the pruned model goes worst);
- ``top1_agreement``: the share of positions where both models' most likely next token is the same.

The dense side costs no second pass over the dense model: its pass for the perplexity keeps the
states leaving its last block (:class:`DenseFinals`, ``[windows, tokens, d]`` in the run's dtype, on the
host), and the pruned pass turns them into the dense logits with the same final norm and head, which
depth pruning leaves unchanged. Logits are taken a window at a time, as the perplexity takes them, and
reduced :data:`LOGIT_ROWS` positions at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lorp.errors import InvalidRequestError

DIVERGENCE_METRICS = ("kl_mean", "kl_p99", "top1_agreement")
PERCENTILE = 99.0


def next_token_valid(mask: torch.Tensor) -> torch.Tensor:
    """The positions whose next-token prediction counts, ``[windows, tokens - 1]``: it and the next token are real."""
    return (mask[:, 1:] * mask[:, :-1]).bool()


LOGIT_ROWS = 64
"""Positions whose logits a reduction turns into float32 at once. A window's log-probabilities are
``[tokens, vocabulary]`` float32, 50 MB for 256 tokens of a 49,152-word vocabulary, and a KL writes
several such temporaries: taken whole, they set a sequential job's peak (docs/benchmarks.md)."""


def logit_rows(logits: torch.Tensor) -> list[torch.Tensor]:
    """``[windows, tokens, vocabulary]`` logits as ``[positions, vocabulary]`` parts of at most
    :data:`LOGIT_ROWS` positions, window by window, in order: views, not copies."""
    return [part for window in logits for part in window.split(LOGIT_ROWS)]


def token_divergence(
    dense_logits: torch.Tensor, pruned_logits: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per counted position: KL(dense || pruned) of the next-token distributions (nats, float64) and
    whether the two argmaxes agree.

    Args:
        dense_logits, pruned_logits: ``[windows, tokens, vocabulary]`` logits of the same windows; the
            last position predicts past the window and is not used.
        valid: ``[windows, tokens - 1]`` booleans, the positions that count (:func:`next_token_valid`).

    Returns:
        (kl, agree), each of the counted positions only, in window order.
    """
    if dense_logits.shape != pruned_logits.shape:
        raise ValueError(f"logits differ in shape: {tuple(dense_logits.shape)} vs {tuple(pruned_logits.shape)}")
    valid = valid.to(dense_logits.device)
    # Every position reduced first, the counted ones picked after: picking rows of the [tokens, vocabulary]
    # log-probabilities first would copy them twice over for nothing. :data:`LOGIT_ROWS` at a time.
    kls, agrees = [], []
    dense_rows = logit_rows(dense_logits[:, :-1])
    pruned_rows = logit_rows(pruned_logits[:, :-1].to(dense_logits.device))
    for dense, pruned in zip(dense_rows, pruned_rows, strict=True):
        p_log = torch.log_softmax(dense.float(), dim=-1)
        q_log = torch.log_softmax(pruned.float(), dim=-1)
        agrees.append(p_log.argmax(dim=-1) == q_log.argmax(dim=-1))
        p = p_log.exp()
        kls.append((p * p_log.sub_(q_log)).sum(dim=-1, dtype=torch.float64))
    kl = torch.cat(kls).reshape(valid.shape)[valid].clamp_(min=0.0)
    agree = torch.cat(agrees).reshape(valid.shape)[valid]
    return kl, agree


class _PositionKL(torch.autograd.Function):
    """KL(p || q) per position from logits, with its gradient in the student's logits written out:
    ``softmax(student) - p`` (the rows of p sum to 1). Autograd through ``log_softmax`` and the product
    keeps and walks several more ``[tokens, vocabulary]`` tensors: over a 49,152-word vocabulary on a
    CPU, a distillation step takes 0.86 of the time with this (docs/benchmarks.md). The backward pass
    turns the saved log-probabilities into the gradient in place, so it runs once (no
    ``retain_graph``), as a training step's does."""

    @staticmethod
    def forward(ctx: Any, teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
        p_log = torch.log_softmax(teacher.detach().float(), dim=-1)
        q_log = torch.log_softmax(student.detach().float(), dim=-1)
        p = p_log.exp()
        ctx.save_for_backward(q_log, p)
        ctx.student_dtype = student.dtype
        return (p * (p_log - q_log)).sum(dim=-1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        q_log, p = ctx.saved_tensors
        return None, q_log.exp_().sub_(p).mul_(grad.unsqueeze(-1)).to(ctx.student_dtype)


def position_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of each position's next-token distribution, ``[...]`` from ``[..., vocabulary]``
    logits of one shape (float32 whatever their dtype), differentiable in ``student_logits``: a
    distillation's loss (``lorp.distill``). The values are :func:`token_divergence`'s, summed in float32."""
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"logits differ in shape: {tuple(teacher_logits.shape)} vs {tuple(student_logits.shape)}")
    result: torch.Tensor = _PositionKL.apply(teacher_logits, student_logits)
    return result


@dataclass(frozen=True)
class CutStates:
    """The dense states around one cut on a distillation's first windows, per batch: ``entering`` its
    anchor block (the kept block before the removed span; ``anchor`` is its index in the pruned model)
    and ``leaving`` the span (entering the first block after it, or leaving the last block)."""

    anchor: int
    entering: list[torch.Tensor]
    leaving: list[torch.Tensor]


@dataclass
class DenseFinals:
    """The dense model's states leaving its last block, per evaluation batch, kept on the host by the
    dense pass (:meth:`keep`) for the pruned pass to compare against (:meth:`get`)."""

    finals: list[torch.Tensor] = field(default_factory=list)
    entering: list[torch.Tensor] = field(default_factory=list)
    """Where the pass was asked for them (a distillation's teacher, ``lorp.distill.dense_finals``): the
    states entering block :attr:`entering_block`, per batch, which the student's frozen blocks give too."""
    entering_block: int = 0
    cuts: list[CutStates] = field(default_factory=list)
    """Where the pass was asked for them (a distillation's teacher, ``lorp.distill.plan_teacher``): for each
    healed cut of the plan, the dense states entering its anchor and leaving its span on the first
    windows, from which the anchor learns what the span did before the whole model's steps."""
    plan: tuple[int, ...] = ()
    """The removed blocks of the plan :attr:`entering_block` and :attr:`cuts` were kept for."""

    def keep(self, final: torch.Tensor) -> None:
        self.finals.append(final.detach().to("cpu"))

    def get(self, index: int, shape: torch.Size) -> torch.Tensor:
        """Batch ``index``'s dense final state, which must have the pruned pass's ``shape``."""
        if index >= len(self.finals) or self.finals[index].shape != shape:
            raise InvalidRequestError(
                "the pruned model was evaluated on other windows than the dense one, so their predictions "
                "cannot be compared",
                field="evaluation",
            )
        return self.finals[index]


@dataclass
class Divergence:
    """Per-position divergences gathered over the batches, then summarised (:meth:`summary`)."""

    kl: list[torch.Tensor] = field(default_factory=list)
    agree: int = 0
    count: int = 0

    def add(self, kl: torch.Tensor, agree: torch.Tensor) -> None:
        self.kl.append(kl.detach().to("cpu", torch.float64))
        self.agree += int(agree.sum())
        self.count += int(agree.numel())

    @property
    def kl_sum(self) -> float:
        """The KL summed over every position added (nats): a plan scorer's per-batch sum."""
        return float(sum(float(kl.sum()) for kl in self.kl))

    def summary(self) -> dict[str, float]:
        """``kl_mean``, ``kl_p99`` and ``top1_agreement`` over every position added."""
        if self.count == 0:
            raise InvalidRequestError(
                "no tokens to compare the pruned model's predictions on", field="evaluation.dataset"
            )
        values = torch.cat(self.kl).numpy()
        return {
            "kl_mean": float(values.mean()),
            "kl_p99": float(np.percentile(values, PERCENTILE)),
            "top1_agreement": self.agree / self.count,
        }
