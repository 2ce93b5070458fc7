"""Which way a job runs the model: resident (whole, where it lives) or sequential (one block at a time).

``options.execution`` asks for ``resident``, ``sequential`` or ``auto``. ``auto`` runs resident when
the weights plus the job's working set fit the device's memory budget, and sequential otherwise:

- the budget is ``LORP_DEVICE_MEMORY_GB`` when set, else what the device reports (a GPU's total
  memory, or the host's available memory for the CPU) less a margin of 10%;
- the weights are the checkpoint's tensors at the dtype the job runs in;
- the working set is what a resident run keeps beside them: the dense state caches (N + 1 states of
  every validation and heal token), and one batch's activations (a block's widest intermediate and
  the logits, a few times over for what the kernels hold); on the CPU also the blocks' MLP outputs on
  the heal tokens, which the capture keeps on the host (N of them per token, ``lorp.states.StateSink``);
  with ``heal: distill``, two states per training token (the dense model's final state, the teacher,
  and the state entering the first adapted block).

Sequential execution needs the weights in safetensors files (it reads them a block at a time); a GGUF
file or pickled weights run resident, and an explicit ``sequential`` for them is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from lorp.errors import InvalidRequestError
from lorp.host import available_memory, cpu_name, memory_setting

MARGIN = 0.10
GIB = 2**30

Mode = Literal["resident", "sequential"]


@dataclass(frozen=True)
class WorkingSet:
    """What a job keeps beside the weights, in tokens: the calibration passes' shape.

    ``heal_tokens(width)``: the heal tokens a model of that hidden size keeps (the planner's rule: it
    grows with the width, so the estimate needs the model's config).
    """

    validation_tokens: int  # validation tokens whose N+1 dense states are cached
    batch_tokens: int  # tokens in one batch (windows x length)
    heal_tokens: Callable[[int], int] = field(default=lambda width: 0)
    distill_tokens: int = 0  # whole-model distillation's training tokens: two states each (teacher, entering)

    def cached_tokens(self, width: int) -> int:
        """Tokens whose N+1 dense states a model of hidden size ``width`` caches: validation and heal."""
        return self.validation_tokens + self.heal_tokens(width)


@dataclass(frozen=True)
class ExecutionChoice:
    """The way a job runs, and why (the report's ``execution``)."""

    mode: Mode
    requested: str
    reason: str
    device: str
    device_name: str
    budget_bytes: int | None = None
    weights_bytes: int | None = None
    working_bytes: int | None = None


def device_name(device: torch.device) -> str:
    """The device's own name: a GPU's model, or the host's CPU model."""
    if device.type == "cuda":
        return str(torch.cuda.get_device_name(device))
    return cpu_name()


def device_memory(device: torch.device) -> int:
    """What the device reports: a GPU's total memory, or the host's available memory for the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return available_memory()


def memory_budget(device: torch.device) -> tuple[int, str]:
    """The bytes a resident run may use on ``device``, and where that figure came from."""
    setting = memory_setting()
    if setting is not None:
        return setting
    reported = device_memory(device)
    what = "total memory" if device.type == "cuda" else "available host memory"
    return int(reported * (1 - MARGIN)), f"{int(100 * (1 - MARGIN))}% of the {device.type} device's {what}"


def working_bytes(
    config: Any, dtype: torch.dtype, blocks: int, work: WorkingSet, device: torch.device | None = None
) -> int:
    """The estimate of what a resident run on ``device`` keeps there beside the weights (see the module's
    docstring; ``device`` None: the host's own memory, the CPU)."""
    width = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or 0)
    inner = int(getattr(config, "intermediate_size", 0) or getattr(config, "n_inner", 0) or 4 * width)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    size = torch.empty((), dtype=dtype).element_size()
    states = (blocks + 1) * work.cached_tokens(width) * size * width
    states += 2 * work.distill_tokens * size * width
    if device is None or device.type == "cpu":
        states += blocks * work.heal_tokens(width) * size * width
    activations = 4 * work.batch_tokens * max(inner, width) * size + work.batch_tokens * vocab * 4
    return states + activations


def choose_execution(
    requested: str,
    *,
    device: torch.device,
    weights_bytes: int,
    working: int,
    streamable: bool,
) -> ExecutionChoice:
    """Resolve ``options.execution`` for a model of ``weights_bytes`` whose run keeps ``working`` more.

    ``streamable``: the weights are safetensors files a block can be read from (else only resident).
    """
    where, name = str(device), device_name(device)
    if requested == "resident":
        return ExecutionChoice("resident", requested, "requested", where, name, None, weights_bytes, working)
    if requested == "sequential":
        if not streamable:
            raise InvalidRequestError(
                "options.execution 'sequential' reads the weights a block at a time from safetensors files, "
                "and this model has none (a GGUF file or pickled weights); use 'resident' or 'auto'",
                field="options.execution",
            )
        return ExecutionChoice("sequential", requested, "requested", where, name, None, weights_bytes, working)
    if requested != "auto":
        raise InvalidRequestError(
            f"unknown execution {requested!r}; use auto, resident or sequential", field="options.execution"
        )
    if not streamable:
        reason = "the weights are not in safetensors files (a GGUF file or pickled weights): only resident runs them"
        return ExecutionChoice("resident", requested, reason, where, name, None, weights_bytes, working)
    budget, source = memory_budget(device)
    sizes = f"{weights_bytes / GIB:.2f} GiB of weights + {working / GIB:.2f} GiB working set"
    if weights_bytes + working <= budget:
        reason = f"{sizes} fit the budget of {budget / GIB:.2f} GiB ({source})"
        return ExecutionChoice("resident", requested, reason, where, name, budget, weights_bytes, working)
    reason = f"{sizes} exceed the budget of {budget / GIB:.2f} GiB ({source})"
    return ExecutionChoice("sequential", requested, reason, where, name, budget, weights_bytes, working)
