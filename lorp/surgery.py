"""The pruned checkpoint, written by tensor surgery on the source's safetensors files.

Nothing here builds or holds the model. The source's tensors are read one at a time: a removed
block's are skipped, a kept block's keys are renumbered to the block's new index, each heal map is
folded into its anchor block's MLP output projection (each expert's, in a mixture of experts, whether
stored stacked or one per expert; gpt-oss's MXFP4 experts dequantized in the anchor block and listed
unquantized in the config, :func:`_keep_unpacked`) as that tensor passes (the same float64
computation as the in-memory fold, :func:`lorp.heal.folded_weight`), tensors tied to another (an
output head sharing the input embeddings) stay tied, and every tensor keeps its stored dtype. The
config gets the new block count and its per-layer lists sliced (:func:`lorp.blocks.prune_config`);
tokenizer, generation and other small files are copied. Shards are bounded in size and indexed the
way transformers writes them. Peak memory is about the largest tensor. Weights changed in memory
(distillation's) are written in the source's layout (``lorp.execution.stored``): an expert stack the
source stores one piece per expert split into its pieces, an MXFP4 one written unquantized.

GGUF sources are not read here: the loader converts them once to a model in memory, which is saved
with ``save_pretrained`` (``lorp.export``).
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorp.blocks import block_layout, prune_config, validate_indices
from lorp.errors import InvalidRequestError, ModelLoadError
from lorp.execution.healed import FoldedMap
from lorp.execution.stored import Mxfp4, Stacked, StoredLayout
from lorp.foldable import OUTLETS, fold_refusal
from lorp.heal import folded_weight
from lorp.shards import (
    DTYPES,
    Checkpoint,
    Planned,
    TensorInfo,
    plan_shards,
    shard_names,
    write_file,
    write_index,
)

logger = logging.getLogger(__name__)

# What transformers' hub uses: shards of at most 5 GB keep uploads and partial downloads manageable.
DEFAULT_SHARD_BYTES = 5 * 10**9
# Files of a model folder that are weights, index them or describe them; everything else at the top level
# (tokenizer, generation config, chat template, licence, model card) is copied as it is.
_NOT_COPIED = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|gguf|msgpack|h5|onnx)|.*\.index\.json|config\.json|\..*")


@dataclass(frozen=True)
class WrittenCheckpoint:
    """What :func:`write_pruned` wrote.

    Attributes:
        directory: the output folder.
        kept: original indices of the kept blocks; position k is the block now at index k.
        files: the weight files written, in order.
        tensors: how many tensors they hold.
        nbytes: the bytes of those tensors.
        copied: the other files copied from the source.
    """

    directory: Path
    kept: list[int]
    files: list[str]
    tensors: int
    nbytes: int
    copied: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Source:
    """Where one output tensor comes from, and the heal map to fold into it on the way."""

    name: str
    fold: torch.Tensor | FoldedMap | None = None
    kind: str = "linear"  # how the map folds into it (``lorp.foldable.KINDS``)
    packed: Mxfp4 | None = None  # stored in MXFP4 (``name`` its blocks): dequantized on the way


def meta_skeleton(config: Any) -> Any:
    """The model a config describes, built on the meta device: its structure without any weight."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _block_key(layout_path: str) -> re.Pattern[str]:
    # A checkpoint saved from the causal LM names its blocks by the layout's full path ("model.layers.3.");
    # one saved from the base model drops the leading parts ("layers.3."). Either is accepted.
    parts = layout_path.split(".")
    heads = "|".join(re.escape(".".join(parts[i:])) for i in range(len(parts)))
    return re.compile(rf"^(?P<head>{heads})\.(?P<index>\d+)\.(?P<rest>.+)$")


def _tied_targets(skeleton: Any, names: set[str]) -> set[str]:
    # save_pretrained writes a tied pair once, under the source of the tie; do the same.
    tied = getattr(skeleton, "all_tied_weights_keys", None) or {}
    return {target for target, source in tied.items() if target in names and source in names}


def _unpacked(layout: StoredLayout, name: str, rest: str) -> tuple[str, Mxfp4 | None, bool]:
    """For a stored tensor ``name`` of an anchor block (``rest``: its name inside the block), the weight
    it is half of when that weight is stored in MXFP4 (``StoredLayout.packed``: written dequantized, so
    that a map can be folded in, ``lorp.foldable``) by its name inside the block, that weight's halves,
    and whether this is the half that stands for both (the blocks; the scales go with them)."""
    packed = layout.packed(name)
    if packed is None:
        return rest, None, True
    suffix = len(name) - len(packed.weight)  # "_blocks" or "_scales"
    return rest[:-suffix], packed, name == packed.blocks


class _Renumbering:
    """Names between the source (every block) and the pruned checkpoint (the ``kept`` blocks, renumbered
    in order), for blocks under ``path`` (the model's block list, ``lorp.blocks.block_layout``)."""

    def __init__(self, path: str, kept: list[int]) -> None:
        self.key = _block_key(path)
        self.kept = kept
        self.new_index = {old: new for new, old in enumerate(kept)}

    def source(self, name: str) -> str:
        """The source's name for a pruned checkpoint's ``name``."""
        match = self.key.match(name)
        if not match:
            return name
        return f"{match.group('head')}.{self.kept[int(match.group('index'))]}.{match.group('rest')}"

    def pruned(self, name: str, rest: str | None = None) -> str:
        """The pruned checkpoint's name for a kept tensor ``name`` of the source (with its part inside
        the block replaced by ``rest`` where given: an unpacked weight's name)."""
        match = self.key.match(name)
        if not match:
            return name
        inside = match.group("rest") if rest is None else rest
        return f"{match.group('head')}.{self.new_index[int(match.group('index'))]}.{inside}"

    def block(self, name: str) -> int | None:
        """The source block a source tensor ``name`` belongs to, or None."""
        match = self.key.match(name)
        return int(match.group("index")) if match else None


def _plan(
    stored: StoredLayout,
    rename: _Renumbering,
    folds: Mapping[int, torch.Tensor | FoldedMap],
    unpack: AbstractSet[int] = frozenset(),
) -> tuple[list[Planned], dict[str, _Source]]:
    checkpoint = stored.checkpoint
    outlet = OUTLETS.get(block_layout(stored.model).family)
    skip = _tied_targets(stored.model, set(checkpoint.tensors))
    planned: list[Planned] = []
    sources: dict[str, _Source] = {}
    folded: set[int] = set()
    for name, info in checkpoint.tensors.items():
        if name in skip:
            continue
        out_name, source = name, _Source(name)
        match = rename.key.match(name)
        if match:
            old = int(match.group("index"))
            if old not in rename.new_index:
                continue
            rest, packed = match.group("rest"), None
            if old in folds or old in unpack:
                rest, packed, stands = _unpacked(stored, name, rest)
                if not stands:
                    continue
            out_name = rename.pruned(name, rest)
            kind = outlet.kind(rest) if outlet is not None and old in folds else None
            if kind is not None or packed is not None:
                source = _Source(name, folds[old] if kind is not None else None, kind or "linear", packed)
                if kind not in (None, "bias"):
                    folded.add(old)
            if packed is not None:
                shape = packed.shape(checkpoint.tensors)
                assert shape is not None  # checked by StoredLayout.packed
                planned.append(Planned(out_name, packed.written_dtype(checkpoint.tensors), shape))
                sources[out_name] = source
                continue
        planned.append(Planned(out_name, info.dtype, info.shape))
        sources[out_name] = source
    missing = sorted(set(folds) - folded)
    if missing:
        raise InvalidRequestError(
            f"blocks {missing} have no MLP output ({outlet.watch if outlet else 'unknown'}) to fold a heal map into",
            field="options.heal",
        )
    return planned, sources


def stored_dtypes(source: Path, model: Any, anchors: Sequence[int]) -> dict[int, torch.dtype]:
    """The dtype each anchor block's folded weights are stored in (read from the headers only).

    The in-memory model may run in another dtype (float32 on a CPU for a bfloat16 checkpoint); a map
    folded in memory is rounded to this dtype so that the model measured is the model written.
    """
    layout = block_layout(model)
    outlet = OUTLETS.get(layout.family)
    key = _block_key(layout.path)
    wanted = set(anchors)
    found: dict[int, torch.dtype] = {}
    checkpoint = Checkpoint(source)
    stored_layout = StoredLayout(model, checkpoint)
    for name, info in checkpoint.tensors.items():
        match = key.match(name)
        if not match or int(match.group("index")) not in wanted or outlet is None:
            continue
        rest, packed, _ = _unpacked(stored_layout, name, match.group("rest"))
        if outlet.kind(rest) not in (None, "bias"):
            stored = info.dtype if packed is None else packed.written_dtype(checkpoint.tensors)
            found[int(match.group("index"))] = DTYPES[stored]
    return found


def stored_tensor_dtypes(source: Path, removed: Sequence[int], names: Iterable[str]) -> dict[str, torch.dtype]:
    """The dtype each of ``names`` (weights of the pruned model: kept blocks renumbered) is written in
    (``lorp.execution.stored.StoredLayout.written_dtype``: as stored, or as an expert stored in MXFP4
    is written once changed), read from the headers only; names the source does not store are left out."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source, local_files_only=True)
    skeleton = meta_skeleton(config)
    layout = StoredLayout(skeleton, Checkpoint(source))
    blocks = block_layout(skeleton)
    gone = set(removed)
    kept = [i for i in range(int(getattr(config, blocks.num_layers_attr))) if i not in gone]
    rename = _Renumbering(blocks.path, kept)
    found: dict[str, torch.dtype] = {}
    for name in names:
        try:
            found[name] = layout.written_dtype(rename.source(name))
        except ModelLoadError:
            continue
    return found


def _as_stored(
    layout: StoredLayout, rename: _Renumbering, replaced: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], set[int]]:
    """``replaced`` (weights of the pruned model by its names) as the pruned checkpoint stores them:
    a weight stored one piece per expert split into its pieces (``Stacked.split``), an expert stored in
    MXFP4 written unquantized under its own name. Returns the tensors by their names in the pruned
    checkpoint, and the source blocks whose MXFP4 experts are written unquantized for it."""
    checkpoint = layout.checkpoint
    out: dict[str, torch.Tensor] = {}
    unpack: set[int] = set()
    for name, value in replaced.items():
        try:
            stored, assembly = layout.sources(rename.source(name))
        except ModelLoadError:
            out[name] = value  # not a weight the source stores: refused with the rest (_producer)
            continue
        if isinstance(assembly, Stacked):
            out.update(
                {rename.pruned(piece): part for piece, part in assembly.split(value, checkpoint.tensors).items()}
            )
        elif isinstance(assembly, Mxfp4):
            out[rename.pruned(assembly.weight)] = value
            block = rename.block(assembly.weight)
            if block is not None:
                unpack.add(block)
        else:
            out[rename.pruned(stored[0])] = value
    return out, unpack


def _copy_files(source: Path, out: Path) -> list[str]:
    copied = []
    for path in sorted(source.iterdir()):
        if path.is_file() and not _NOT_COPIED.fullmatch(path.name):
            shutil.copyfile(path, out / path.name)
            copied.append(path.name)
    return copied


def _kept_blocks(config: Any, family: str, n_old: int, removed: Sequence[int], folds: Mapping[int, Any]) -> list[int]:
    """The blocks a pruned checkpoint keeps, after checking the removal and that every fold can apply
    (the family takes a fold; no map is for a removed block)."""
    if folds:
        why = fold_refusal(family, config.to_dict())
        if why is not None:
            raise InvalidRequestError(f"healing cannot be applied: {why}", field="options.heal")
    dropped = set(validate_indices(removed, n_old))
    gone = sorted(set(folds) & dropped)
    if gone:
        raise InvalidRequestError(f"heal maps for blocks {gone}, which are removed", field="options.heal")
    return [i for i in range(n_old) if i not in dropped]


def _producer(
    checkpoint: Checkpoint,
    sources: dict[str, _Source],
    replaced: dict[str, torch.Tensor],
    device: torch.device | str,
) -> Callable[[Planned], torch.Tensor | TensorInfo]:
    """What writes each output tensor: a replacement cast to the stored dtype, the source's tensor as
    stored (read a part at a time), or the source's tensor with its heal map folded in on ``device``."""
    unknown = sorted(set(replaced) - set(sources))
    if unknown:
        raise InvalidRequestError(
            f"the pruned checkpoint has no tensors {unknown[:5]} to replace", field="options.heal"
        )

    def produce(p: Planned) -> torch.Tensor | TensorInfo:
        if p.name in replaced:
            return replaced[p.name].detach().to("cpu", DTYPES[p.dtype])
        src = sources[p.name]
        if src.packed is not None:  # dequantized in the dtype it is written in (exact), then folded
            halves = {name: checkpoint.read(name, device=device) for name in src.packed.names}
            moved = src.packed.assemble(halves, DTYPES[p.dtype])
            if src.fold is None:
                return moved.to("cpu")
        elif src.fold is None:
            return checkpoint.tensors[src.name]
        else:
            moved = checkpoint.read(src.name).to(device)
        T = src.fold if isinstance(src.fold, torch.Tensor) else src.fold.T
        result = folded_weight(moved, src.kind, T)
        return result.to("cpu")

    return produce


def _keep_unpacked(config: Any, path: str, unpacked: list[str]) -> None:
    """List the experts written dequantized (``unpacked``: their weights' names) in the config's
    ``modules_to_not_convert``, so that transformers loads them as stored and the rest as MXFP4."""
    modules = sorted({name.rsplit(".", 1)[0] for name in unpacked if name.startswith(f"{path}.")})
    if not modules:
        return
    quantization = config.quantization_config
    if not isinstance(quantization, dict):  # transformers' config object: written as its dict
        quantization = config.quantization_config = quantization.to_dict()
    listed = list(quantization.get("modules_to_not_convert") or [])
    quantization["modules_to_not_convert"] = listed + [m for m in modules if m not in listed]


def write_pruned(
    source: Path,
    out: Path,
    removed: Sequence[int],
    folds: Mapping[int, torch.Tensor | FoldedMap] | None = None,
    *,
    replaced: Mapping[str, torch.Tensor] | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    device: torch.device | str = "cpu",
) -> WrittenCheckpoint:
    """Write ``source`` with the ``removed`` blocks gone and the heal maps folded, one tensor at a time.

    Args:
        source: a model folder with safetensors weights and its ``config.json``.
        out: the folder to write; created, and must be empty if it exists.
        removed: original indices of the blocks to remove (validated as :func:`lorp.blocks.remove_blocks` does).
        folds: original index of an anchor block -> the d x d map folded into its MLP output projection,
            or a fit holding it (``lorp.heal.Fit``: its map is read when its tensor is written, so maps kept
            in files are never all in memory at once).
        replaced: weights written instead of what the source holds, by their name in the pruned model
            (a distilled block's weights, ``lorp.distill``: its fold already in them), cast to the stored
            dtype; one the source stores in pieces is split into them (:func:`_as_stored`).
        max_shard_bytes: the most bytes of tensors one weight file holds (a larger tensor gets a file of its own).
        device: where the folds are computed (the in-memory fold's device gives bit-equal weights).

    Raises:
        InvalidRequestError: the indices are invalid, the folder is not empty, or the family cannot take a fold.
        ModelLoadError: the source's weights are not valid safetensors.
    """
    from transformers import AutoConfig

    folds = dict(folds or {})
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise InvalidRequestError(f"output directory {out} is not empty", field="out")
    config = AutoConfig.from_pretrained(source, local_files_only=True)
    skeleton = meta_skeleton(config)
    layout = block_layout(skeleton)
    n_old = int(getattr(config, layout.num_layers_attr))
    kept = _kept_blocks(config, layout.family, n_old, removed, folds)
    checkpoint = Checkpoint(source)
    rename = _Renumbering(layout.path, kept)
    stored = StoredLayout(skeleton, checkpoint)
    changed, unpack = _as_stored(stored, rename, replaced or {})
    planned, sources = _plan(stored, rename, folds, unpack)
    produce = _producer(checkpoint, sources, changed, device)
    out.mkdir(parents=True, exist_ok=True)
    shards = plan_shards(sorted(planned, key=lambda p: p.name), max_shard_bytes)
    names = shard_names(len(shards))
    written = {name: write_file(out / name, shard, produce) for name, shard in zip(names, shards, strict=True)}
    if len(names) > 1:
        write_index(out, written)
    prune_config(config, kept, n_old, layout.num_layers_attr)
    _keep_unpacked(config, layout.path, [p.name for p in planned if sources[p.name].packed is not None])
    config.architectures = [type(skeleton).__name__]
    config.save_pretrained(out)
    copied = _copy_files(source, out)
    logger.info(
        "wrote the pruned checkpoint: %d of %d blocks kept, %d tensors in %d files, %d heal maps folded",
        len(kept),
        n_old,
        len(planned),
        len(names),
        len(folds),
    )
    return WrittenCheckpoint(
        directory=out,
        kept=kept,
        files=names,
        tensors=len(planned),
        nbytes=sum(p.nbytes for p in planned),
        copied=copied,
    )
