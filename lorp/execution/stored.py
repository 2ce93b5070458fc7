"""How a checkpoint stores a model's weights: for each of the model's names, the stored tensor it is
read from, or the pieces it is assembled from.

A weight is stored under its own name, under a shorter one (a checkpoint saved from the base model), under
the name transformers renames it from (GPT-NeoX's ``embed_out``), or under the weight a tied one shares.
A mixture of experts' stacked weight may be stored one piece per expert (Mixtral, Qwen-MoE, OLMoE):
:class:`Stacked` assembles it as transformers' own load-time conversion does, and splits a changed one
back into its pieces. gpt-oss's experts as OpenAI ships them are stored in MXFP4 (:class:`Mxfp4`), and
dequantized when read.

:class:`StoredLayout` answers for one model and one checkpoint, and is the one place that decides how a
weight is stored: the onloader reads through it (``lorp.execution.onload``), and the checkpoint writer
writes changed weights back through it and asks it which stored tensors are MXFP4 halves
(``lorp.surgery``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from lorp.errors import ModelLoadError
from lorp.pretrained import stored_quantization
from lorp.quantization import MXFP4, mxfp4_halves, quant_method
from lorp.shards import DTYPES, Checkpoint, TensorInfo


def _model_names(model: Any, stored: Any) -> dict[str, str]:
    """Model tensor name -> stored name, for stored names transformers renames on load (GPT-NeoX's
    ``embed_out`` is the model's ``lm_head``); only plain renamings, which are all these families use."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming

        renamings = [t for t in get_model_conversion_mapping(model) if type(t) is WeightRenaming]
    except (ImportError, AttributeError, TypeError):
        return {}
    names: dict[str, str] = {}
    for name in stored:
        renamed = name
        for renaming in renamings:
            for source, target in zip(renaming.source_patterns, renaming.target_patterns, strict=False):
                renamed = re.sub(source, target, renamed)
        if renamed != name:
            names[renamed] = name
    return names


@dataclass(frozen=True)
class Stacked:
    """A weight the model holds as one tensor and the checkpoint stores in pieces, one per expert
    (Mixtral's, Qwen-MoE's and OLMoE's experts): per source, the stored tensors of experts 0..E-1
    stacked along a new first dimension; several sources' stacks then joined along ``join`` (gate and
    up into ``gate_up_proj``). What transformers' ``MergeModulelist(dim=0)`` and ``Concatenate`` do when
    it loads the whole model."""

    parts: tuple[tuple[str, ...], ...]  # per source, the stored names, expert by expert
    join: int | None

    @property
    def names(self) -> list[str]:
        return [name for part in self.parts for name in part]

    def shape(self, stored: dict[str, TensorInfo]) -> tuple[int, ...] | None:
        """The assembled tensor's shape from the pieces' stored shapes (None: they do not fit together)."""
        stacks = []
        for part in self.parts:
            shapes = {tuple(stored[name].shape) for name in part}
            if len(shapes) != 1:
                return None
            stacks.append((len(part), *shapes.pop()))
        if self.join is None:
            return stacks[0] if len(stacks) == 1 else None
        join = self.join
        if not 0 <= join < len(stacks[0]) or len({(*stack[:join], *stack[join + 1 :]) for stack in stacks}) != 1:
            return None
        return (*stacks[0][:join], sum(stack[join] for stack in stacks), *stacks[0][join + 1 :])

    def assemble(self, pieces: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        stacks = [torch.stack([pieces[name] for name in part]) for part in self.parts]
        return stacks[0] if self.join is None else torch.cat(stacks, dim=self.join)

    def split(self, weight: torch.Tensor, stored: dict[str, TensorInfo]) -> dict[str, torch.Tensor]:
        """The stored pieces ``weight`` is assembled from, by name (what :meth:`assemble` undoes): each
        source's stack cut out along ``join`` (its size from the pieces' stored shapes), then one piece
        per expert."""
        stacks = [weight]
        if self.join is not None:
            sizes = [(len(part), *stored[part[0]].shape)[self.join] for part in self.parts]
            stacks = list(weight.split(sizes, dim=self.join))
        return {
            name: piece
            for part, stack in zip(self.parts, stacks, strict=True)
            for name, piece in zip(part, stack.unbind(0), strict=True)
        }


@dataclass(frozen=True)
class Mxfp4:
    """A weight the checkpoint stores in MXFP4 (gpt-oss's experts, as OpenAI ships them): 4-bit values
    packed two to a byte (``<name>_blocks``, [experts, out, groups, 16]) and a power-of-two scale per
    group of 32 (``<name>_scales``, [experts, out, groups]). Dequantized as the block loads by
    transformers' own conversion (what it does when it loads the whole model without MXFP4 kernels),
    to [experts, in, out]; exact in bfloat16 and float32."""

    weight: str  # the stored name the two halves are named after

    @property
    def blocks(self) -> str:
        return mxfp4_halves(self.weight)[0]

    @property
    def scales(self) -> str:
        return mxfp4_halves(self.weight)[1]

    @property
    def names(self) -> list[str]:
        return [self.blocks, self.scales]

    def shape(self, stored: dict[str, TensorInfo]) -> tuple[int, ...] | None:
        blocks, scales = tuple(stored[self.blocks].shape), tuple(stored[self.scales].shape)
        if len(blocks) != 4 or blocks[:3] != scales or stored[self.blocks].dtype != "U8":
            return None
        experts, out, groups, width = blocks
        return (experts, groups * width * 2, out)

    def assemble(self, pieces: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        from transformers.integrations.mxfp4 import convert_moe_packed_tensors

        return convert_moe_packed_tensors(pieces[self.blocks], pieces[self.scales], dtype=dtype)

    def written_dtype(self, stored: dict[str, TensorInfo]) -> str:
        """The dtype (safetensors' name) this weight is written in once changed (a folded heal map makes
        the anchor block's experts unquantized, ``lorp.surgery``): its bias's, as stored (gpt-oss
        stores its experts' biases unquantized), else the checkpoint's first floating-point tensor's."""
        bias = stored.get(f"{self.weight}_bias")
        if bias is not None and DTYPES[bias.dtype].is_floating_point:
            return bias.dtype
        return next((info.dtype for info in stored.values() if DTYPES[info.dtype].is_floating_point), "BF16")


Assembly = Stacked | Mxfp4  # how a weight is made from the stored tensors it is read from


def _stacking_rules(model: Any) -> list[tuple[tuple[str, ...], str, int | None]]:
    """(source patterns, target suffix, join dimension) of the model's load-time conversions that stack
    experts: transformers' ``MergeModulelist(dim=0)``, alone or followed by one ``Concatenate``, from
    patterns with one ``*`` (the expert's index). Any other conversion is not read piece by piece."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter

        conversions = get_model_conversion_mapping(model)
    except (ImportError, AttributeError, TypeError):
        return []
    rules: list[tuple[tuple[str, ...], str, int | None]] = []
    for conversion in conversions:
        if type(conversion) is not WeightConverter or len(conversion.target_patterns) != 1:
            continue
        ops, sources = list(conversion.operations), tuple(conversion.source_patterns)
        if not ops or type(ops[0]) is not MergeModulelist or ops[0].dim != 0:
            continue
        if any(pattern.count("*") != 1 for pattern in sources):
            continue
        if len(ops) == 1 and len(sources) == 1:
            rules.append((sources, conversion.target_patterns[0], None))
        elif len(ops) == 2 and type(ops[1]) is Concatenate:
            rules.append((sources, conversion.target_patterns[0], int(ops[1].dim)))
    return rules


class StoredLayout:
    """Where ``checkpoint`` stores each weight of ``model`` (a skeleton of the checkpoint's config, or the
    model loaded from it). Names are resolved once each: a block is loaded many times in a job, and a
    stacked weight names one piece per expert."""

    def __init__(self, model: Any, checkpoint: Checkpoint) -> None:
        self.model = model
        self.checkpoint = checkpoint
        self.names = _model_names(model, checkpoint.tensors)
        self._rules = _stacking_rules(model)
        self._shapes = {name: tuple(t.shape) for name, t in [*model.named_parameters(), *model.named_buffers()]}
        self._resolved: dict[str, tuple[list[str], Assembly | None]] = {}  # see sources
        # the checkpoint's quantization, also for a model loaded from it dequantized
        self._mxfp4 = quant_method(stored_quantization(model)) == MXFP4
        self._halves: dict[str, Mxfp4] | None = None  # see packed

    def stored(self, name: str) -> str:
        """The checkpoint's name for the model's tensor ``name`` (saved from the base model: fewer parts;
        a tied head: the tensor it is tied to)."""
        tied = getattr(self.model, "all_tied_weights_keys", None) or {}
        for candidate in (name, tied.get(name)):
            if candidate is not None and candidate in self.names:
                return self.names[candidate]
            if candidate is None:
                continue
            parts = candidate.split(".")
            for start in range(len(parts)):
                stored = ".".join(parts[start:])
                if stored in self.checkpoint.tensors:
                    return stored
        raise ModelLoadError(f"the checkpoint holds no tensor for {name!r}", field="model.id")

    def _stacked(self, name: str) -> Stacked | None:
        """How the model's weight ``name`` is assembled from stored pieces, one per expert, or None when
        it is not: no conversion names it, or the checkpoint lacks a piece, or the pieces do not make
        the weight's shape."""
        shape = self._shapes.get(name, ())
        experts = shape[0] if shape else 0
        for sources, target, join in self._rules:
            if not name.endswith(target) or not experts:
                continue
            prefix = name[: len(name) - len(target)]
            parts = []
            for pattern in sources:
                pieces = [prefix + pattern.replace("*", str(expert)) for expert in range(experts)]
                part = tuple(self.names.get(piece, piece) for piece in pieces)
                if any(stored not in self.checkpoint.tensors for stored in part):
                    break
                parts.append(part)
            else:
                stacked = Stacked(tuple(parts), join)
                if stacked.shape(self.checkpoint.tensors) == shape:
                    return stacked
        return None

    def _packed(self, name: str) -> Mxfp4 | None:
        """How the model's weight ``name`` is dequantized from MXFP4 blocks and scales, or None when the
        checkpoint does not store it so (or not in the weight's shape)."""
        if not self._mxfp4:
            return None
        parts = name.split(".")
        for start in range(len(parts)):
            packed = Mxfp4(".".join(parts[start:]))
            if all(half in self.checkpoint.tensors for half in packed.names):
                return packed if packed.shape(self.checkpoint.tensors) == self._shapes.get(name) else None
        return None

    def sources(self, name: str) -> tuple[list[str], Assembly | None]:
        """The stored tensors the model's weight ``name`` is read from: the one it is stored as, or the
        pieces it is assembled from (:class:`Stacked` experts, :class:`Mxfp4` blocks and scales).
        Resolved once per name: a block is loaded many times in a job, and a stacked weight names one
        piece per expert."""
        known = self._resolved.get(name)
        if known is not None:
            return known
        try:
            found: tuple[list[str], Assembly | None] = ([self.stored(name)], None)
        except ModelLoadError:
            assembly = self._stacked(name) or self._packed(name)
            if assembly is None:
                raise
            found = (assembly.names, assembly)
        self._resolved[name] = found
        return found

    def packed(self, stored: str) -> Mxfp4 | None:
        """The MXFP4 weight of the model that the stored tensor ``stored`` is one half of (its blocks or
        its scales), or None: the checkpoint stores no weight of the model in MXFP4 with that half."""
        if not self._mxfp4:
            return None
        if self._halves is None:
            self._halves = {}
            for name, _ in self.model.named_parameters():
                try:
                    assembly = self.sources(name)[1]
                except ModelLoadError:
                    continue
                if isinstance(assembly, Mxfp4):
                    self._halves.update(dict.fromkeys(assembly.names, assembly))
        return self._halves.get(stored)

    def written_dtype(self, name: str) -> torch.dtype:
        """The dtype a changed value of the model's weight ``name`` is written in: the one it is stored in
        (a stacked weight's pieces share one); an MXFP4 weight's, :meth:`Mxfp4.written_dtype`.

        Raises:
            ValueError: the weight is stored quantized otherwise, and a changed value cannot be stored.
        """
        names, assembly = self.sources(name)
        stored = DTYPES[self.checkpoint.tensors[names[0]].dtype]
        if isinstance(assembly, Mxfp4):
            stored = DTYPES[assembly.written_dtype(self.checkpoint.tensors)]
        if not stored.is_floating_point:
            raise ValueError(f"{name} is stored quantized ({stored}): a changed value cannot be stored as it was")
        return stored

    def missing(self) -> list[str]:
        """The model's weights still on the meta device that the checkpoint holds no tensor (nor every
        piece) for, sorted (checked from the names and stored shapes alone, before a pass finds the gap)."""
        gaps = []
        for name, tensor in [*self.model.named_parameters(), *self.model.named_buffers()]:
            if tensor.device.type != "meta":
                continue
            try:
                self.sources(name)
            except ModelLoadError:
                gaps.append(name)
        return sorted(gaps)

    def unclaimed(self) -> list[str]:
        """The checkpoint's tensors that no weight of the model reads, sorted."""
        claimed = set()
        for name, _ in [*self.model.named_parameters(), *self.model.named_buffers()]:
            try:
                claimed.update(self.sources(name)[0])
            except ModelLoadError:
                continue
        return sorted(set(self.checkpoint.tensors) - claimed)
