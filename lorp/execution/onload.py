"""A model whose weights stay on disk until a pass needs them: a skeleton, then one block at a time.

The first piece of sequential execution (issue 21): :func:`skeleton` builds the model a config
describes with its parameters on the meta device (no memory, no random initialisation) and its
buffers real (the rotary frequencies and masks a model computes at construction and never stores).
:class:`Onloader` then brings what a pass needs from the checkpoint's safetensors shards straight to
the device, a tensor at a time (``lorp.shards``, no memory map): :meth:`Onloader.load_outside` the
final norm for the whole pass (untied token embeddings only while a batch is embedded,
:meth:`Onloader.input_embeddings`, an untied head only while logits are taken, :meth:`Onloader.head`);
:meth:`Onloader.block` one decoder block
for the length of a ``with``, after which its parameters are on the meta device again and their memory
is free. It counts the block loads and the most blocks held at once, so tests and the report can say
what a pass cost.

A weight is read as the checkpoint stores it (``lorp.execution.stored``): under its name or the one
transformers renames it from; a mixture of experts' stacked weight stored one piece per expert
(Mixtral, Qwen-MoE, OLMoE) is assembled from its pieces as the block loads, and gpt-oss's experts
stored in MXFP4 are dequantized as the block loads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import re
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import torch

from lorp.blocks import block_layout, decoder_blocks
from lorp.errors import InvalidRequestError
from lorp.execution.staging import Stager
from lorp.execution.stored import Assembly, StoredLayout
from lorp.shards import DTYPES, Checkpoint, TensorInfo


@functools.cache
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def trim_heap() -> None:
    """Give the memory the allocator holds freed back to the operating system (glibc's ``malloc_trim``;
    nothing elsewhere). glibc keeps freed chunks under its mmap threshold (up to 32 MiB) for reuse, and
    after a few hundred block loads that is most of the process's growth: measured on a 4.7 GB model, a
    sequential capture's resident memory went from 1.27 to 2.14 GiB, and back to 1.22 after a trim."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside put their parameters on the meta device and keep their buffers real."""
    register = torch.nn.Module.register_parameter

    def on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        register(module, name, param)
        registered = module._parameters[name]
        if registered is not None:
            module._parameters[name] = torch.nn.Parameter(registered.to("meta"), requires_grad=registered.requires_grad)

    torch.nn.Module.register_parameter = on_meta  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register  # type: ignore[method-assign]


def skeleton(config: Any, dtype: torch.dtype) -> Any:
    """The causal LM ``config`` describes, parameters on the meta device, buffers real, in eval mode."""
    from transformers import AutoModelForCausalLM

    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _set(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    owner_path, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    if leaf in owner._parameters:
        owner._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value


_HEAD_CHUNK_BYTES = 32 << 20  # the head's weights cast at once, at most (a vocabulary slice)


def _run_head_in(module: torch.nn.Linear, dtype: torch.dtype) -> None:
    """A linear head stored narrower than ``dtype`` computes in ``dtype``, casting a slice of the
    vocabulary's weights at a time (the cast of all of them would be the copy it avoids holding)."""

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        weight, bias = module.weight, module.bias
        rows = max(1, _HEAD_CHUNK_BYTES // (int(weight.shape[1]) * dtype.itemsize))
        out = torch.empty((*hidden.shape[:-1], weight.shape[0]), dtype=dtype, device=hidden.device)
        for begin in range(0, weight.shape[0], rows):
            part = slice(begin, begin + rows)
            out[..., part] = torch.nn.functional.linear(
                hidden, weight[part].to(dtype), None if bias is None else bias[part].to(dtype)
            )
        return out

    module.forward = forward  # type: ignore[method-assign,assignment]  # this instance only


class Onloader:
    """Brings a skeleton's weights from ``source``'s safetensors files onto ``device``, piece by piece.

    Args:
        model: a :func:`skeleton` of the checkpoint's config.
        source: the model folder (``model.safetensors`` or shards with their index).
        device: where the weights go.
        dtype: the dtype they run in (stored tensors are cast to it).
        stage: load through a :class:`lorp.execution.staging.Stager` (default: on a CUDA device).
    """

    def __init__(
        self, model: Any, source: Path, device: torch.device | str, dtype: torch.dtype, *, stage: bool | None = None
    ) -> None:
        self.model = model
        self.checkpoint = Checkpoint(source)
        self.device = torch.device(device)
        self.dtype = dtype
        self.path = block_layout(model).path
        self.blocks = list(decoder_blocks(model))  # by original index, also inside a pruned view
        self.layout = StoredLayout(model, self.checkpoint)
        self.block_loads = 0
        self.held: set[int] = set()
        self.most_held = 0
        self._narrow: set[str] = set()
        self._embeddings: str | None = None  # loaded for a batch's embedding only (see load_outside)
        self._head: str | None = None  # loaded for the logits only
        self._users: dict[str, int] = {}  # open ``with`` blocks per weight loaded on demand
        self.stage = self.device.type == "cuda" if stage is None else stage
        self.stager: Stager | None = None  # made at the first load when staging

    def missing(self) -> list[str]:
        """The model's weights still on the meta device that the checkpoint holds no tensor (nor every
        piece) for, sorted (checked from the names and stored shapes alone, before a pass finds the gap)."""
        return self.layout.missing()

    def check_layout(self, name: str) -> None:
        """Refuse, before any pass, a checkpoint that stores some weights in a layout this reader cannot
        turn into the model's (a conversion other than stacking experts, or experts' pieces that do not
        make the stacked weight): stored tensors no weight reads beside weights no stored tensor gives.
        (Weights simply missing are the caller's to refuse.)"""
        missing = self.missing()
        unclaimed = self.layout.unclaimed() if missing else []
        if unclaimed:
            raise InvalidRequestError(
                f"{name} stores {len(unclaimed)} tensors in another layout than the model holds them (the files "
                f"hold {unclaimed[0]!r}, the model reads {missing[0]!r}); transformers converts them when it "
                "loads the whole model, and sequential execution reads tensors as they are stored (experts "
                "stored one by one it stacks, when every piece is there; MXFP4 experts it dequantizes): use "
                "options.execution 'resident'",
                field="options.execution",
            )

    def _staged(self) -> Stager | None:
        """The stager loads go through when staging (made at the first load, its buffers the largest
        block's stored bytes); None otherwise: each tensor is read straight into memory of its own
        (what a CPU device wants: there is no copy after the read to overlap or speed up)."""
        if self.stager is None and self.stage:
            sizes = [
                sum(info.nbytes for _, infos, _ in self._to_load(block, index) for info in infos)
                for index, block in enumerate(self.blocks)
            ]
            self.stager = Stager(self.device, max(sizes, default=1))
        return self.stager

    def _to_load(self, block: torch.nn.Module, index: int) -> list[tuple[str, list[TensorInfo], Assembly | None]]:
        """Block ``index``'s tensors still on the meta device, with the stored tensors each is read from
        (one, or an expert's pieces each) and how it is assembled from them."""
        prefix = f"{self.path}.{index}."
        wanted = []
        for name, tensor in [*block.named_parameters(), *block.named_buffers()]:
            if tensor.device.type == "meta":
                stored, stacked = self.layout.sources(prefix + name)
                wanted.append((name, [self.checkpoint.tensors[piece] for piece in stored], stacked))
        return wanted

    def _read(self, infos: list[TensorInfo]) -> list[torch.Tensor]:
        """Stored tensors on the device, at their stored dtype."""
        stager = self._staged()
        if stager is None:
            return [self.checkpoint.read(info.name, device=self.device) for info in infos]
        loaded = stager.load(infos)
        return [loaded[info.name] for info in infos]

    def _load(self, block: torch.nn.Module, index: int) -> None:
        wanted = self._to_load(block, index)
        infos = [info for _, pieces, _ in wanted for info in pieces]
        read = dict(zip([info.name for info in infos], self._read(infos), strict=True))
        for name, pieces, assembly in wanted:
            value = read[pieces[0].name] if assembly is None else assembly.assemble(read, self.dtype)
            if assembly is not None:
                for piece in pieces:  # a piece serves one assembled weight: its memory goes now
                    del read[piece.name]
            _set(block, name, value.to(self.dtype) if value.is_floating_point() else value)

    def prefetch(self, index: int) -> None:
        """Start reading block ``index`` from disk while the caller runs another (on a GPU; nothing
        elsewhere): its next :meth:`block` then only copies it to the device."""
        stager = self._staged()
        if stager is not None:
            stager.prefetch([info for _, infos, _ in self._to_load(self.blocks[index], index) for info in infos])

    def round_to_stored(self, index: int, names: Iterable[str]) -> None:
        """Round block ``index``'s weights ``names`` (inside the block, changed in memory: a folded heal
        map) to the dtype the checkpoint stores them in, so that what runs is what a checkpoint holds."""
        block = self.blocks[index]
        with torch.no_grad():
            for name in names:
                tensor = block.get_parameter(name)
                rounded = self.rounded(index, name, tensor)
                if rounded is not tensor:
                    tensor.copy_(rounded)

    def stored_dtype(self, index: int, name: str) -> torch.dtype:
        """The dtype a new value of block ``index``'s weight ``name`` is written in (``StoredLayout``)."""
        return self.layout.written_dtype(f"{self.path}.{index}.{name}")

    def rounded(self, index: int, name: str, value: torch.Tensor) -> torch.Tensor:
        """``value``, a new value of block ``index``'s weight ``name``, rounded to the dtype the
        checkpoint stores that weight in (and back to ``value``'s dtype)."""
        stored = self.stored_dtype(index, name)
        return value if value.dtype == stored else value.to(stored).to(value.dtype)

    def _outside(self, name: str) -> bool:
        """Whether the model's tensor ``name`` lies outside the decoder blocks."""
        return re.match(rf"{re.escape(self.path)}\.\d+\.", name) is None

    def _narrow_names(self) -> set[str]:
        """The model's names for the weights that may stay in the checkpoint's dtype: the token
        embeddings' when they are a plain ``nn.Embedding`` (a scaled one, Gemma's, computes in the
        weight's dtype), the head's when it is a plain ``nn.Linear``; a tied pair only when both are."""
        plain = {torch.nn.Embedding, torch.nn.Linear}
        modules = [
            m
            for m in (self.model.get_input_embeddings(), self.model.get_output_embeddings())
            if isinstance(getattr(m, "weight", None), torch.Tensor)
        ]
        users: dict[int, list[torch.nn.Module]] = {}
        for module in modules:
            users.setdefault(id(module.weight), []).append(module)
        allowed = {key for key, owners in users.items() if all(type(m) in plain for m in owners)}
        return {name for name, param in self.model.named_parameters(remove_duplicate=False) if id(param) in allowed}

    def _on_demand_name(self, module: Any) -> str | None:
        """The model's name for the weight of ``module`` (the token embeddings or the head) when no
        other weight is tied to it: a sequential runner then loads it only while it is used
        (:meth:`input_embeddings`, :meth:`head`), not for good."""
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            return None
        name = next((n for n, p in self.model.named_parameters() if p is weight), None)
        tied = getattr(self.model, "all_tied_weights_keys", None)
        if tied is None:
            config = self.model.config.get_text_config()
            return None if getattr(config, "tie_word_embeddings", True) else name
        return None if name in tied or name in tied.values() else name

    def _stays_narrow(self, name: str) -> bool:
        """Whether the model's weight ``name`` runs in the dtype the checkpoint stores it in (narrower
        than the run's; see :meth:`load_outside`)."""
        stored = DTYPES[self.checkpoint.tensors[self.layout.stored(name)].dtype]
        return name in self._narrow and stored.is_floating_point and stored.itemsize < self.dtype.itemsize

    def _load_outside_tensor(self, name: str) -> None:
        (value,) = self._read([self.checkpoint.tensors[self.layout.stored(name)]])
        cast = value.is_floating_point() and not self._stays_narrow(name)
        _set(self.model, name, value.to(self.dtype) if cast else value)

    def _free_outside_tensor(self, name: str) -> None:
        weight = self.model.get_parameter(name)
        _set(self.model, name, torch.empty_like(weight, device="meta"))
        trim_heap()

    def load_outside(self) -> None:
        """Load the weights outside the decoder blocks for good (the final norm, and the token
        embeddings and head when they are tied); untied token embeddings wait for
        :meth:`input_embeddings` and an untied head for :meth:`head` (each is as large as a block or
        two of a small model, and a job's heal fits need neither).

        The token embeddings and the head stay in the dtype the checkpoint stores them in when that is
        narrower than the run's (a bfloat16 checkpoint run in float32 on a CPU): the embeddings' rows
        and the head's weights are cast as they are used (:func:`_run_head_in`), which gives what
        weights cast on load give, and the host holds half the bytes."""
        self._narrow = self._narrow_names()
        embeddings, head = self.model.get_input_embeddings(), self.model.get_output_embeddings()
        self._embeddings = self._on_demand_name(embeddings)
        self._head = self._on_demand_name(head)
        for name, tensor in [*self.model.named_parameters(), *self.model.named_buffers()]:
            if tensor.device.type == "meta" and self._outside(name) and name not in (self._embeddings, self._head):
                self._load_outside_tensor(name)
        tie = getattr(self.model, "tie_weights", None)
        if callable(tie):
            tie()
        for buffer_owner in self.model.modules():  # buffers built at construction go where the weights are
            for key, buffer in list(buffer_owner._buffers.items()):
                if buffer is not None and buffer.device != self.device and buffer.device.type != "meta":
                    buffer_owner._buffers[key] = buffer.to(self.device)
        named = dict(self.model.named_parameters(remove_duplicate=False))
        narrow = {id(named[n]) for n in self._narrow if self._stays_narrow(n)}
        if id(embeddings.weight) in narrow:
            embeddings.register_forward_hook(lambda _module, _args, output: output.to(self.dtype))  # exact
        if isinstance(head, torch.nn.Linear) and id(head.weight) in narrow:
            _run_head_in(head, self.dtype)

    @contextmanager
    def _while_used(self, name: str | None) -> Iterator[None]:
        """The weight ``name`` (one :meth:`load_outside` left on disk; None: loaded for good) on the
        device from entering the outermost ``with`` to leaving it."""
        if name is None:
            yield
            return
        if not self._users.get(name):
            self._load_outside_tensor(name)
        self._users[name] = self._users.get(name, 0) + 1
        try:
            yield
        finally:
            self._users[name] -= 1
            if not self._users[name]:
                self._free_outside_tensor(name)

    def input_embeddings(self) -> AbstractContextManager[None]:
        """The token embeddings on the device for the length of the ``with`` (loaded and freed when
        they wait on disk, see :meth:`load_outside`)."""
        return self._while_used(self._embeddings)

    def head(self) -> AbstractContextManager[None]:
        """The head on the device for the length of the ``with`` (loaded on entering the outermost
        one and freed on leaving it when it waits on disk, see :meth:`load_outside`)."""
        return self._while_used(self._head)

    @contextmanager
    def block(self, index: int, then: int | None = None) -> Iterator[torch.nn.Module]:
        """Decoder block ``index`` with its weights on the device, for the length of the block; with
        ``then``, block ``then`` is read from disk meanwhile (:meth:`prefetch`)."""
        block = self.blocks[index]
        self._load(block, index)
        if then is not None:
            self.prefetch(then)
        self.block_loads += 1
        self.held.add(index)
        self.most_held = max(self.most_held, len(self.held))
        try:
            yield block
        finally:
            for name, param in list(block.named_parameters()):
                _set(block, name, torch.empty_like(param, device="meta"))
            self.held.discard(index)
            trim_heap()

    def unload_outside(self) -> None:
        """Free the weights outside the blocks (their parameters back on the meta device): the runner
        can run no pass afterwards. For a check that opens another model once this one is done with."""
        for name, param in list(self.model.named_parameters()):
            if param.device.type != "meta" and self._outside(name):
                _set(self.model, name, torch.empty_like(param, device="meta"))
        if self.stager is not None:
            self.stager.close()
            self.stager = None
        trim_heap()
