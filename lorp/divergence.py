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
depth pruning leaves unchanged. Logits are taken a window at a time, as the perplexity takes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from lorp.errors import InvalidRequestError

DIVERGENCE_METRICS = ("kl_mean", "kl_p99", "top1_agreement")
PERCENTILE = 99.0


def next_token_valid(mask: torch.Tensor) -> torch.Tensor:
    """The positions whose next-token prediction counts, ``[windows, tokens - 1]``: it and the next token are real."""
    return (mask[:, 1:] * mask[:, :-1]).bool()


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
    p_log = torch.log_softmax(dense_logits[:, :-1].float(), dim=-1)[valid]
    q_log = torch.log_softmax(pruned_logits[:, :-1].to(dense_logits.device).float(), dim=-1)[valid]
    kl = (p_log.exp() * (p_log - q_log)).sum(dim=-1, dtype=torch.float64).clamp_(min=0.0)
    agree = p_log.argmax(dim=-1) == q_log.argmax(dim=-1)
    return kl, agree


@dataclass
class DenseFinals:
    """The dense model's states leaving its last block, per evaluation batch, kept on the host by the
    dense pass (:meth:`keep`) for the pruned pass to compare against (:meth:`get`)."""

    finals: list[torch.Tensor] = field(default_factory=list)

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
