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
"""

from __future__ import annotations

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
            torch.manual_seed(seed)
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
