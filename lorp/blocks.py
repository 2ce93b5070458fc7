"""Decoder-block discovery per architecture, and block removal that leaves a consistent model.

docs/algorithm.md §8: the block list is found by architecture (never by assuming ``model.model.layers``), and
removing blocks means more than dropping modules. The kept blocks' per-layer indices are renumbered
(the KV cache is indexed by them), the config's block count is updated (a reload would otherwise
silently re-create the removed blocks with random weights), and every per-layer config list is trimmed
to the kept blocks (Qwen3 and friends refuse to save while ``layer_types`` and the block count
disagree, and the reloaded model builds each block from its ``layer_types`` entry).
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from lorp.errors import InvalidRequestError, UnsupportedArchitectureError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlockLayout:
    """Where a model keeps its decoder blocks.

    Attributes:
        family: the architecture family, e.g. ``"llama"``, ``"gpt2"``.
        path: dotted attribute path from the model to the ``ModuleList`` of blocks, e.g. ``"model.layers"``.
        num_layers_attr: the config attribute that holds the block count, e.g. ``"num_hidden_layers"``.
    """

    family: str
    path: str
    num_layers_attr: str


# model_type -> (family, path from the *ForCausalLM model to the block list). Paths come from each
# family's modeling_<family>.py in transformers 5.24.
_LAYOUTS: dict[str, tuple[str, str]] = {
    "llama": ("llama", "model.layers"),
    "mistral": ("mistral", "model.layers"),
    "qwen2": ("qwen2", "model.layers"),
    "qwen3": ("qwen3", "model.layers"),
    "gemma": ("gemma", "model.layers"),
    "gemma2": ("gemma2", "model.layers"),
    "gemma3_text": ("gemma3", "model.layers"),
    "phi3": ("phi3", "model.layers"),
    "olmo": ("olmo", "model.layers"),
    "olmo2": ("olmo2", "model.layers"),
    "olmo3": ("olmo3", "model.layers"),
    "smollm3": ("smollm3", "model.layers"),
    "gpt2": ("gpt2", "transformer.h"),
    "gpt_neox": ("gpt_neox", "gpt_neox.layers"),
    "opt": ("opt", "model.decoder.layers"),
    "falcon": ("falcon", "transformer.h"),
    "granite": ("granite", "model.layers"),
    "glm": ("glm", "model.layers"),
    "glm4": ("glm4", "model.layers"),
    "cohere": ("cohere", "model.layers"),
    "cohere2": ("cohere2", "model.layers"),
    "exaone4": ("exaone4", "model.layers"),
    "seed_oss": ("seed_oss", "model.layers"),
    "apertus": ("apertus", "model.layers"),
    "nemotron": ("nemotron", "model.layers"),
    "arcee": ("arcee", "model.layers"),
    "hunyuan_v1_dense": ("hunyuan_v1_dense", "model.layers"),
    "ministral": ("ministral", "model.layers"),
    "starcoder2": ("starcoder2", "model.layers"),
    "stablelm": ("stablelm", "model.layers"),
    "phi": ("phi", "model.layers"),
    "ernie4_5": ("ernie4_5", "model.layers"),
    # Mixtures of experts: whole blocks (attention and every expert) are removed like any other.
    "mixtral": ("mixtral", "model.layers"),
    "qwen2_moe": ("qwen2_moe", "model.layers"),
    "qwen3_moe": ("qwen3_moe", "model.layers"),
    "olmoe": ("olmoe", "model.layers"),
    "gpt_oss": ("gpt_oss", "model.layers"),
}

# Architecture class name -> model_type, for configs whose model_type was rewritten or is missing but
# whose ``architectures`` (or the model's own class) still names a supported causal LM.
_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text",
    "Phi3ForCausalLM": "phi3",
    "OlmoForCausalLM": "olmo",
    "Olmo2ForCausalLM": "olmo2",
    "Olmo3ForCausalLM": "olmo3",
    "SmolLM3ForCausalLM": "smollm3",
    "GPT2LMHeadModel": "gpt2",
    "GPTNeoXForCausalLM": "gpt_neox",
    "OPTForCausalLM": "opt",
    "FalconForCausalLM": "falcon",
    "GraniteForCausalLM": "granite",
    "GlmForCausalLM": "glm",
    "Glm4ForCausalLM": "glm4",
    "CohereForCausalLM": "cohere",
    "Cohere2ForCausalLM": "cohere2",
    "Exaone4ForCausalLM": "exaone4",
    "SeedOssForCausalLM": "seed_oss",
    "ApertusForCausalLM": "apertus",
    "NemotronForCausalLM": "nemotron",
    "ArceeForCausalLM": "arcee",
    "HunYuanDenseV1ForCausalLM": "hunyuan_v1_dense",
    "MinistralForCausalLM": "ministral",
    "Starcoder2ForCausalLM": "starcoder2",
    "StableLmForCausalLM": "stablelm",
    "PhiForCausalLM": "phi",
    "Ernie4_5ForCausalLM": "ernie4_5",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "OlmoeForCausalLM": "olmoe",
    "GptOssForCausalLM": "gpt_oss",
}

# Config lists with one entry per block, trimmed to the kept blocks. Found in the configuration_*.py
# files: layer_types (qwen2, qwen3, gemma2, gemma3, olmo3, smollm3, and the base PreTrainedConfig
# validation), mlp_layer_types (base validation), no_rope_layers (smollm3: one 0/1 flag per block).
_PER_LAYER_LISTS: tuple[str, ...] = ("layer_types", "mlp_layer_types", "no_rope_layers")

# Config integers that are a block-index threshold ("blocks below this index ..."): remapped to the
# number of kept blocks below the old threshold, so that regenerating layer_types from them agrees.
_LAYER_THRESHOLDS: tuple[str, ...] = ("max_window_layers",)

# Module attributes holding the block's own index. ``layer_idx`` is what every supported family uses
# (attention modules index the KV cache with it; Gemma3's decoder layer keeps a copy too).
_INDEX_ATTRS: tuple[str, ...] = ("layer_idx", "layer_id")


def _supported_text() -> str:
    return ", ".join(sorted(_LAYOUTS))


def supported_families() -> list[str]:
    """The transformers model packages (``transformers.models.<family>``) whose blocks we can find."""
    return sorted({family for family, _ in _LAYOUTS.values()})


def _model_type(model: Any) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) if config is not None else None


def _architectures(model: Any) -> list[str]:
    config = getattr(model, "config", None)
    archs = list(getattr(config, "architectures", None) or [])
    return archs


def resolve_path(obj: Any, path: str) -> Any:
    """The attribute at a dotted ``path`` below ``obj`` (``"model.layers"``)."""
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def input_device(model: Any) -> Any:
    """The device a model's inputs go to: where its input embeddings live (the first shard)."""
    return model.get_input_embeddings().weight.device


def _num_layers_attr(config: Any) -> str:
    # GPT-2 stores the count as n_layer and maps num_hidden_layers onto it (GPT2Config.attribute_map);
    # naming the real attribute keeps config.json edits and messages honest.
    attribute_map = getattr(type(config), "attribute_map", {}) or {}
    return str(attribute_map.get("num_hidden_layers", "num_hidden_layers"))


def block_layout(model: Any) -> BlockLayout:
    """Find where ``model`` keeps its decoder blocks.

    Args:
        model: a Hugging Face causal LM (``*ForCausalLM`` / ``GPT2LMHeadModel``) or its base model
            (``LlamaModel``, ``GPT2Model`` ...). Recognised by ``config.model_type``, then by
            ``config.architectures`` and the model's class name.

    Returns:
        The family, the dotted path to the block ``ModuleList`` on this very object, and the config
        attribute holding the block count.

    Raises:
        UnsupportedArchitectureError: the architecture is unknown, or the expected block list is not
            where its family keeps it. The message names the model_type and architectures and lists
            the supported model types.
    """
    model_type = _model_type(model)
    archs = _architectures(model)
    key = model_type if model_type in _LAYOUTS else None
    if key is None:
        for name in [*archs, type(model).__name__]:
            if name in _ARCHITECTURES:
                key = _ARCHITECTURES[name]
                break
    if key is None:
        raise UnsupportedArchitectureError(
            f"unsupported architecture: model_type={model_type!r}, architectures={archs!r} "
            f"(class {type(model).__name__}); supported model types: {_supported_text()}",
            field="model.id",
        )
    family, full_path = _LAYOUTS[key]
    parts = full_path.split(".")
    # A base model (LlamaModel, GPT2Model, OPTModel ...) holds the same list one level up: try the
    # path's suffixes, longest first, and accept the first that is a ModuleList.
    for start in range(len(parts)):
        candidate = ".".join(parts[start:])
        try:
            found = resolve_path(model, candidate)
        except AttributeError:
            continue
        if isinstance(found, torch.nn.ModuleList):
            return BlockLayout(family=family, path=candidate, num_layers_attr=_num_layers_attr(model.config))
    raise UnsupportedArchitectureError(
        f"model_type={model_type!r} (architectures={archs!r}, class {type(model).__name__}) is a known "
        f"family ({family}) but no decoder block list was found at {full_path!r}",
        field="model.id",
    )


def decoder_blocks(model: Any) -> torch.nn.ModuleList:
    """Return the model's decoder blocks, in depth order.

    Args:
        model: a supported Hugging Face causal LM (see :func:`block_layout`).

    Returns:
        The live ``ModuleList`` (not a copy): hooks registered on its members see the real forward.

    Raises:
        UnsupportedArchitectureError: see :func:`block_layout`.
    """
    layout = block_layout(model)
    blocks = resolve_path(model, layout.path)
    assert isinstance(blocks, torch.nn.ModuleList)
    return blocks


def validate_indices(blocks: Sequence[int], n: int) -> list[int]:
    """``blocks`` as a list of block indices of an ``n``-block model: integers, in range, unique, leaving one."""
    # Any iterable of integers is accepted (numpy arrays and numpy ints from the selection code
    # included); strings are iterable too but are never a list of block indices.
    if isinstance(blocks, str | bytes) or not isinstance(blocks, Iterable):
        raise InvalidRequestError(
            f"pruned_layers must be a list of block indices, got {type(blocks).__name__}",
            field="pruned_layers",
        )
    indices: list[int] = []
    for b in blocks:
        # bool is an int subclass: True as "block 1" is a bug at the caller, not a request.
        if isinstance(b, bool) or not isinstance(b, numbers.Integral):
            raise InvalidRequestError(f"pruned_layers entries must be integers, got {b!r}", field="pruned_layers")
        if not 0 <= b < n:
            raise InvalidRequestError(
                f"pruned_layers entry {b} is out of range: the model has {n} blocks (0..{n - 1})",
                field="pruned_layers",
            )
        indices.append(int(b))
    if len(set(indices)) != len(indices):
        dupes = sorted({i for i in indices if indices.count(i) > 1})
        raise InvalidRequestError(f"pruned_layers has duplicates: {dupes}", field="pruned_layers")
    if len(indices) >= n:
        raise InvalidRequestError(
            f"pruned_layers removes {len(indices)} of {n} blocks: at least one block must remain",
            field="pruned_layers",
        )
    return indices


def _renumber_block(block: torch.nn.Module, new_idx: int) -> None:
    for module in block.modules():
        for attr in _INDEX_ATTRS:
            value = getattr(module, attr, None)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(module, attr, new_idx)
        _fix_gpt2_inverse_layer_scaling(module, new_idx)


def _fix_gpt2_inverse_layer_scaling(module: Any, new_idx: int) -> None:
    # GPT2Attention (models/gpt2/modeling_gpt2.py) folds 1/(layer_idx+1) into `self.scaling` at
    # construction when config.scale_attn_by_inverse_layer_idx is set. A reload rebuilds the block at
    # its new index with the new factor, and the GPT-2 format cannot store the old one; so the
    # in-memory model takes the factor of its new position, keeping the evaluated model and the
    # published artifact the same function (a deliberate, logged change to that block's attention).
    if not getattr(module, "scale_attn_by_inverse_layer_idx", False) or not hasattr(module, "scaling"):
        return
    scaling = 1.0
    if getattr(module, "scale_attn_weights", False):
        scaling = float(module.head_dim) ** -0.5
    new_scaling = scaling / float(new_idx + 1)
    if module.scaling != new_scaling:
        logger.warning(
            "GPT-2 scale_attn_by_inverse_layer_idx: attention scaling of the block now at index %d "
            "follows its new depth (%g -> %g) so that the saved model reloads identically",
            new_idx,
            module.scaling,
            new_scaling,
        )
        module.scaling = new_scaling


def _per_layer_lists(config: Any, n_old: int) -> list[str]:
    # The known lists, and any other list the config holds under a name that says it is per layer
    # with one entry per block (a family's sliding-window or rope arrays).
    others = [
        name
        for name, value in vars(config).items()
        if name not in _PER_LAYER_LISTS
        and "layer" in name
        and isinstance(value, list | tuple)
        and len(value) == n_old
        and n_old > 1
    ]
    return [*_PER_LAYER_LISTS, *sorted(others)]


def prune_config(config: Any, kept: list[int], n_old: int, num_layers_attr: str) -> None:
    """Make ``config`` describe the model with only the ``kept`` blocks (original indices, ascending).

    Trims every per-layer list to the kept blocks, remaps block-index thresholds and sets the block
    count; refuses a known per-layer list whose length is not the old block count.
    """
    n_new = len(kept)
    kept_set = set(kept)
    for name in _per_layer_lists(config, n_old):
        value = getattr(config, name, None)
        if isinstance(value, list | tuple):
            if len(value) != n_old:
                raise InvalidRequestError(
                    f"config.{name} has {len(value)} entries but the model has {n_old} blocks; "
                    "refusing to guess which entries belong to which block",
                    field="pruned_layers",
                )
            setattr(config, name, type(value)(value[i] for i in kept))
    for name in _LAYER_THRESHOLDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            setattr(config, name, sum(1 for i in range(min(value, n_old)) if i in kept_set))
    _renumber_dense_mlp_layers(config, kept, n_old)
    setattr(config, num_layers_attr, n_new)
    # Some configs (Qwen3) validate layer_types against the block count only at save time; check now
    # so that an inconsistency surfaces here, next to its cause, not in save_pretrained.
    validate = getattr(config, "validate_layer_type", None)
    if callable(validate):
        validate()


def _renumber_dense_mlp_layers(config: Any, kept: list[int], n_old: int) -> None:
    """Qwen2-MoE and Qwen3-MoE build block ``i`` with a dense MLP when ``i`` is in ``mlp_only_layers``
    or ``(i + 1) % decoder_sparse_step`` is not 0: both depend on the block's index, which pruning
    changes. The kept dense blocks are listed at their new indices and the step set to 1, so that a
    reload builds each kept block as it was."""
    step = getattr(config, "decoder_sparse_step", None)
    listed = getattr(config, "mlp_only_layers", None)
    if not isinstance(step, int) or isinstance(step, bool) or not isinstance(listed, list | tuple):
        return
    dense = {i for i in range(n_old) if i in set(listed) or step < 1 or (i + 1) % step != 0}
    config.mlp_only_layers = [new for new, old in enumerate(kept) if old in dense]
    config.decoder_sparse_step = 1


def _refresh_model_flags(model: Any, config: Any) -> None:
    # Qwen2/Qwen3/SmolLM3 base models cache `has_sliding_layers` from layer_types at construction;
    # keep it equal to what a reload would compute.
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        return
    module: Any
    for module in model.modules():
        if isinstance(getattr(module, "has_sliding_layers", None), bool):
            module.has_sliding_layers = "sliding_attention" in layer_types


def remove_blocks(model: Any, blocks: Sequence[int]) -> list[int]:
    """Remove decoder blocks from ``model`` in place and make the model consistent again (docs/algorithm.md §8).

    Drops the blocks from the block ``ModuleList``, renumbers every kept block's per-layer index
    attributes (``layer_idx`` on any submodule), sets the config's block count, trims the per-layer
    config lists (``layer_types``, ``mlp_layer_types``, ``no_rope_layers``) to the kept blocks and remaps
    block-index thresholds (``max_window_layers``).

    Args:
        model: a supported Hugging Face causal LM (see :func:`block_layout`); modified in place.
        blocks: original indices (0-based, depth order) of the blocks to remove; integers, in range,
            unique, and leaving at least one block. An empty sequence is a no-op.

    Returns:
        The original indices of the kept blocks, ascending; position ``k`` in the list is the block
        that is now at index ``k``.

    Raises:
        InvalidRequestError: (field ``"pruned_layers"``) the indices are invalid.
        UnsupportedArchitectureError: see :func:`block_layout`.
    """
    layout = block_layout(model)
    module_list = resolve_path(model, layout.path)
    n_old = len(module_list)
    removed = set(validate_indices(blocks, n_old))
    kept = [i for i in range(n_old) if i not in removed]
    config = model.config

    # Config first: if a per-layer list does not match, fail before the module list is touched.
    prune_config(config, kept, n_old, layout.num_layers_attr)

    # Delete in place (deepest first so earlier indices stay valid): the ModuleList object stays the
    # same, so references held by callers remain valid.
    for i in sorted(removed, reverse=True):
        del module_list[i]
    for new_idx, block in enumerate(module_list):
        _renumber_block(block, new_idx)
    _refresh_model_flags(model, config)
    return kept


# Plain values a module may hold (per-layer indices, cached flags, attention scaling ...): removal
# may change any of them, so a view snapshots them all and puts them back.
_SCALARS = (bool, int, float, str)


@contextmanager
def pruned_view(model: Any, blocks: Sequence[int]) -> Iterator[Any]:
    """Temporarily remove ``blocks`` from ``model`` in place; everything is restored on exit.

    Args:
        model: A causal LM whose layout ``lorp.blocks`` knows.
        blocks: 0-based block indices to drop while the context is open.
    """
    layout = block_layout(model)
    parent_path, _, attr = layout.path.rpartition(".")
    parent = resolve_path(model, parent_path) if parent_path else model
    module_list = getattr(parent, attr)
    saved_modules = dict(module_list._modules)
    config = model.config
    saved_config = {k: (list(v) if isinstance(v, list) else v) for k, v in vars(config).items()}
    saved_scalars = [
        (module, {k: v for k, v in vars(module).items() if isinstance(v, _SCALARS)}) for module in model.modules()
    ]
    try:
        remove_blocks(model, list(blocks))
        yield model
    finally:
        setattr(parent, attr, module_list)
        module_list._modules.clear()
        module_list._modules.update(saved_modules)
        for key in [k for k in vars(config) if k not in saved_config]:
            delattr(config, key)
        config.__dict__.update(saved_config)
        for module, values in saved_scalars:
            module.__dict__.update(values)


def block_input_hidden(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """The hidden state a decoder block receives, from the arguments it is called with."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    hidden = kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor):
        raise RuntimeError("could not find the hidden state among a decoder block's inputs")
    return hidden


def block_output_hidden(output: Any) -> torch.Tensor:
    """The hidden state a decoder block returns (a tensor, or the first item of a tuple)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    hidden = getattr(output, "hidden_states", None) or getattr(output, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    raise RuntimeError(f"could not find the hidden state in a decoder block's output ({type(output).__name__})")
