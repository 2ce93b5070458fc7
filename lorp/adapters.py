"""LoRA adapters (peft) on decoder blocks: what both distillations train, and how they end.

:func:`targets` says what in a block gets an adapter: every linear layer (``nn.Linear``, GPT-2's
``Conv1D``) and, in a mixture of experts, the experts' stacked weights (the 3-D parameters of Mixtral's,
Qwen-MoE's, OLMoE's and gpt-oss's expert modules; peft's ``ParamWrapper`` gives each expert its own
rank-r update). Routers, norms and biases stay as they are. Without the experts an MoE block would
learn in its attention alone: its MLP, most of its weights, would stay frozen.

:class:`Adapters` puts them on the blocks themselves, one peft tuner per block, rather than through
peft's wrapper of the whole model: before peft 0.22, that wrapper read a target list on a transformers
MoE model as transformers v4 names (a dense layer's ``down_proj`` taken for every block's experts) and
adapted weights outside the blocks asked for. Per block, nothing is added that was not named, under
every peft the project admits.

Each adapter starts where peft up to 0.21 started it from the seed (B zero, A kaiming-uniform), but
drawn here (:func:`_start`), not left to peft: 0.22 builds a block's adapters in another order, and the
same seed gave a mixture of experts other adapters and other distilled figures. Here every peft gives
the adapters, and the figures, that the seed gave before.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

ALPHA = 16
"""The adapters' LoRA alpha (their update is scaled by alpha / rank), in both distillations."""


@dataclass(frozen=True)
class Targets:
    """What in one block gets adapters, by name inside the block: its linear layers (modules) and its
    stacked expert weights (parameters)."""

    modules: list[str]
    parameters: list[str]

    @property
    def weights(self) -> list[str]:
        """The weights the adapters change, by name inside the block."""
        return [f"{name}.weight" for name in self.modules] + list(self.parameters)


def targets(block: torch.nn.Module, *, experts: bool = True) -> Targets:
    """The weights of ``block`` that get adapters (see the module); its experts' only with ``experts``."""
    modules = [
        name
        for name, sub in block.named_modules()
        if name and (isinstance(sub, torch.nn.Linear) or type(sub).__name__ == "Conv1D")
    ]
    parameters = [
        name
        for name, parameter in block.named_parameters()
        if experts and parameter.ndim == 3 and parameter.is_floating_point()
    ]
    return Targets(modules, parameters)


class Adapters:
    """LoRA adapters of rank ``rank`` on ``blocks`` (name -> the block and its :func:`targets`; the name
    prefixes the weights' names that :meth:`end` returns, "" for none), their initialisation drawn from
    ``seed``; the blocks' own weights frozen. Ended with :meth:`end`: merged into the weights, or
    dropped."""

    def __init__(
        self, blocks: Mapping[str, tuple[torch.nn.Module, Targets]], *, rank: int, alpha: int, seed: int
    ) -> None:
        from peft import LoraConfig, LoraModel  # the worker's dependency, imported where it is used

        self._tuners: dict[str, Any] = {}
        self._weights: dict[str, list[str]] = {}
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module="peft")
            for prefix, (block, wanted) in blocks.items():
                for parameter in block.parameters():
                    parameter.requires_grad_(False)
                config = LoraConfig(
                    r=rank,
                    lora_alpha=alpha,
                    lora_dropout=0.0,
                    target_modules=wanted.modules,
                    target_parameters=wanted.parameters or None,
                )
                self._tuners[prefix] = LoraModel(block, config, "default")
                self._weights[prefix] = wanted.weights
            torch.manual_seed(seed)  # what peft drew is drawn again here, in the order _start gives
            for block, wanted in blocks.values():
                _start(block, wanted)

    def parameters(self) -> list[torch.nn.Parameter]:
        """The adapters' parameters: what the optimiser steps."""
        return [p for tuner in self._tuners.values() for p in tuner.model.parameters() if p.requires_grad]

    def end(self, *, merge: bool) -> dict[str, torch.Tensor]:
        """Take the adapters off the blocks: merged into the weights they adapt (returned, by
        ``prefix.name``), or dropped (the blocks as they were; nothing returned). Ending them again does
        nothing."""
        merged: dict[str, torch.Tensor] = {}
        for prefix, tuner in self._tuners.items():
            block = tuner.merge_and_unload() if merge else tuner.unload()
            for parameter in block.parameters():
                parameter.requires_grad_(False)
            if merge:
                for name in self._weights[prefix]:
                    merged[f"{prefix}.{name}" if prefix else name] = block.get_parameter(name)
        self._tuners.clear()
        return merged


def pairs(block: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every adapter's A and B weights in ``block``, by the name of the weight it adapts inside the
    block (peft nests the wrappers of one module's several parameters in the order it built them: the
    name comes from the wrapper's parameter, not from where it sits)."""
    found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for path, module in block.named_modules():
        lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if not isinstance(lora_a, torch.nn.ModuleDict) or "default" not in lora_a or lora_b is None:
            continue
        owner = ".".join(part for part in path.split(".") if part != "base_layer")
        weight = getattr(module, "parameter_name", None) or "weight"  # a ParamWrapper names its parameter
        a, b = lora_a["default"].weight, lora_b["default"].weight
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
        found[f"{owner}.{weight}" if owner else weight] = (a, b)
    return found


def _start(block: torch.nn.Module, wanted: Targets) -> None:
    """Draw the adapters' A of ``block`` from the global generator as peft up to 0.21 did, B left at
    zero: weight by weight in :attr:`Targets.weights`' order (its linear layers, then its experts'), three
    kaiming-uniform draws (a = sqrt(5): uniform within 1/sqrt(fan in)) each, an A-shaped and a B-shaped
    one (what building the two ``nn.Linear`` drew) and then A's own. Drawn on the CPU in float32, then
    copied to A's device and dtype."""
    found = pairs(block)
    for name in wanted.weights:
        lora_a, lora_b = found[name]
        for shape in (lora_a.shape, lora_b.shape, lora_a.shape):
            drawn = torch.nn.init.kaiming_uniform_(torch.empty(shape, dtype=torch.float32), a=math.sqrt(5))
        with torch.no_grad():
            lora_a.copy_(drawn)
