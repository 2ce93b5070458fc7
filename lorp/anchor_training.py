"""One anchor block's adapters trained toward the dense span's output: the step both distillations share.

For a cut that removes the span [s, e), the anchor is the kept block a = s - 1 (its linear map is folded
into it). :func:`train_anchor` puts LoRA adapters on a copy of the anchor's weights (``lorp.adapters``: its
linear layers, and its experts in a mixture of experts) and trains them so that the anchor, run on a state
entering it, returns the dense state entering e; the copy's weights with the adapters merged come back by
name, and the block itself is never changed.

- Block-local distillation (``lorp.local_distill``, sequential execution) does this for every healed
  cut and ships it.
- Whole-model distillation (``lorp.distill``) does it first, on the states its teacher's pass kept, as
  the start of its steps: a cut's anchor learns what the span did before the whole model learns the
  dense model's predictions.

The loss is each real token's squared error relative to what the anchor and the span add to that token
(:func:`token_scale`), averaged over the tokens of a batch.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence

import torch

from lorp.adapters import ALPHA, Adapters
from lorp.adapters import targets as adapted
from lorp.execution import Batch

LOCAL_LEARNING_RATE = 1e-2  # chosen with bench_distill.py --explore (docs/benchmarks.md)
LOCAL_RANK = 8  # the anchor's adapters' rank, measured at it (whole-model distillation: lorp.distill.RANK)


def token_scale(entering: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per real token, what its squared error is divided by: what the anchor and the span add to that
    token, ``||h_e - x_a||^2`` (floored at 1e-6 of the mean squared state, for a token they barely move).

    Per token, not per batch: the states of these models carry a few dimensions, and the first token,
    far larger than the rest (on the demo model 5 dimensions hold 99% of what a span adds, the first
    token 79%); summed over a batch those would be nearly all the loss, and they are the part the linear
    map already gets right (0.2% of the batch's sum left, 34% of the mean token's)."""
    floor = 1e-6 * float(target.float().pow(2).sum(-1).mean())
    return (target - entering).float().pow(2).sum(-1).clamp_min(floor)


@dataclasses.dataclass
class TrainedAnchor:
    """An anchor's adapted weights with its adapters merged, by name inside the block; its first and last
    step's loss, and the real tokens its steps read."""

    weights: dict[str, torch.Tensor]
    first_loss: float
    last_loss: float
    tokens: int


def train_anchor(
    block: torch.nn.Module,
    index: int,
    batches: Sequence[Batch],
    inputs: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    *,
    steps: int,
    seed: int,
    learning_rate: float = LOCAL_LEARNING_RATE,
    rank: int = LOCAL_RANK,
    device: torch.device,
    keep: torch.device,
    step_done: Callable[[], None],
    experts: bool = True,
) -> TrainedAnchor:
    """LoRA adapters on a copy of the (folded) anchor block ``index``, trained ``steps`` batches so that
    it maps ``inputs`` to ``targets`` (one state per batch, ``batches``' windows); the copy's adapted
    weights with the adapters merged, by name, on ``keep``. ``step_done`` runs after each step (cancel
    and progress); ``experts``: whether a mixture of experts' experts get adapters too
    (``lorp.adapters.targets``)."""
    student = copy.deepcopy(block)
    dtype = next(student.parameters()).dtype
    adapters = Adapters({"": (student, adapted(student, experts=experts))}, rank=rank, alpha=ALPHA, seed=seed + index)
    trained = adapters.parameters()
    optimiser = torch.optim.AdamW(trained, lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: 1.0 - step / steps)
    scales = [
        token_scale(x.to(device, dtype)[b.real], t.to(device, dtype)[b.real])
        for b, x, t in zip(batches, inputs, targets, strict=True)
    ]
    order = torch.Generator().manual_seed(seed + index)
    queue: list[int] = []
    losses: list[float] = []
    tokens = 0
    student.train(False)
    for _ in range(steps):
        if not queue:
            queue = torch.randperm(len(batches), generator=order).tolist()
        b = queue.pop()
        batch = batches[b]
        with torch.enable_grad():
            out = batch.calls[index](student, inputs[b].to(device, dtype))
            error = (out - targets[b].to(device, dtype))[batch.real]
            loss = (error.float().pow(2).sum(-1) / scales[b]).mean()
            loss.backward()
        optimiser.step()
        schedule.step()
        optimiser.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        tokens += batch.real_count
        step_done()
    weights = {name: value.detach().to(keep) for name, value in adapters.end(merge=True).items()}
    return TrainedAnchor(weights, losses[0], losses[-1], tokens)
