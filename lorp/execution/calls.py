"""How each decoder block is called, recorded from the model's own forward.

A model's forward does more than chain its blocks: it embeds the tokens, builds the attention masks
(one per kind of layer where layers differ: sliding or full), the rotary position embeddings (per
kind of layer again for Gemma 3) and passes each block its own set. Rather than rebuild that per
architecture, a *relay pass* runs the model's own forward with every block swapped for a
:class:`_Relay`: a stand-in that answers attribute reads as its block would (Gemma 3 picks a
layer's mask by ``decoder_layer.attention_type``), records the arguments its block was called with,
and hands its input on unchanged. What it records (a :class:`BlockCall` per block) lets the runner
call the real block later on any state; the state the first relay received is the embedded input.

The same stand-ins give the logits of a final state: relay 0 hands on the given state instead of
its input, the others pass it along, and the model's own code applies the final norm, the head and
anything after them (Gemma 2's logit soft-capping).

A block may return its state as a tensor or as the first item of a tuple (Falcon); the relays
return what the real block returns, learned once by calling block 0 (:class:`OutputForm`).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import torch

from lorp.blocks import block_input_hidden, block_output_hidden


@dataclass
class BlockCall:
    """The arguments one block receives beside its hidden state, for one batch."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    hidden_as_kwarg: bool = False

    @classmethod
    def of(cls, args: tuple[Any, ...], kwargs: dict[str, Any]) -> BlockCall:
        if args and isinstance(args[0], torch.Tensor):
            return cls(args=args[1:], kwargs=dict(kwargs))
        block_input_hidden(args, kwargs)  # raises when the state is in neither place
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        return cls(args=args, kwargs=rest, hidden_as_kwarg=True)

    def __call__(self, block: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Run ``block`` on ``hidden`` with these arguments; the state it returns."""
        if self.hidden_as_kwarg:
            return block_output_hidden(block(*self.args, hidden_states=hidden, **self.kwargs))
        return block_output_hidden(block(hidden, *self.args, **self.kwargs))


@dataclass(frozen=True)
class OutputForm:
    """What a block returns: its state alone (``length`` None) or a tuple of ``length`` led by it."""

    length: int | None

    @classmethod
    def of(cls, output: Any) -> OutputForm:
        if isinstance(output, torch.Tensor):
            return cls(None)
        if isinstance(output, tuple):
            return cls(len(output))
        raise RuntimeError(f"a decoder block returned {type(output).__name__}; a tensor or a tuple was expected")

    def wrap(self, hidden: torch.Tensor) -> Any:
        return hidden if self.length is None else (hidden, *([None] * (self.length - 1)))


class _Finished(Exception):
    """Raised by the last relay of a recording: nothing after the blocks is wanted."""


@dataclass
class _Recording:
    num_blocks: int
    form: OutputForm | None
    inject: torch.Tensor | None = None
    stop_after_last: bool = True
    calls: list[BlockCall | None] = field(default_factory=list)
    entering: torch.Tensor | None = None
    first_block: torch.nn.Module | None = None

    def relay(self, index: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        hidden = block_input_hidden(args, kwargs)
        call = BlockCall.of(args, kwargs)
        if index == 0:
            self.entering = hidden
            if self.form is None:
                assert self.first_block is not None
                self.form = OutputForm.of(self.first_block(*args, **kwargs))
            if self.inject is not None:
                hidden = self.inject
        self.calls[index] = call
        if self.stop_after_last and index == self.num_blocks - 1:
            raise _Finished
        assert self.form is not None
        return self.form.wrap(hidden)


class _Relay(torch.nn.Module):
    """Stands in for one block during a relay pass (see the module's docstring)."""

    def __init__(self, block: torch.nn.Module, index: int, recording: _Recording) -> None:
        super().__init__()
        # Kept out of the module tree: the relay owns no parameters.
        self.__dict__["_block"] = block
        self.__dict__["_index"] = index
        self.__dict__["_recording"] = recording

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_block"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.__dict__["_recording"].relay(self.__dict__["_index"], args, kwargs)


@contextmanager
def _relays(blocks: torch.nn.ModuleList, recording: _Recording) -> Iterator[None]:
    saved = dict(blocks._modules)
    try:
        for key, (index, block) in zip(list(saved), enumerate(saved.values()), strict=True):
            assert block is not None
            blocks._modules[key] = _Relay(block, index, recording)
        yield
    finally:
        blocks._modules.clear()
        blocks._modules.update(saved)


def record_calls(
    model: Any, blocks: torch.nn.ModuleList, ids: torch.Tensor, mask: torch.Tensor, form: OutputForm | None
) -> tuple[torch.Tensor, list[BlockCall], OutputForm]:
    """One relay pass: the state entering block 0, every block's call, and the blocks' output form.

    ``form`` None: learned now by running block 0 once on this batch.
    """
    recording = _Recording(num_blocks=len(blocks), form=form, calls=[None] * len(blocks))
    recording.first_block = blocks[0]
    with _relays(blocks, recording), suppress(_Finished):
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    if recording.entering is None or any(call is None for call in recording.calls) or recording.form is None:
        raise RuntimeError("the model's forward did not call every decoder block")
    calls = [call for call in recording.calls if call is not None]
    return recording.entering, calls, recording.form


def head_logits(
    model: Any,
    blocks: torch.nn.ModuleList,
    ids: torch.Tensor,
    mask: torch.Tensor,
    final: torch.Tensor,
    form: OutputForm,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """The model's logits for the state ``final`` leaving its last block (its own norm and head);
    ``keep`` (positions, 1-D) gives only those positions' logits, ``[windows, len(keep), vocabulary]``:
    the head runs on those alone where the model's forward takes ``logits_to_keep``.

    The forward is given zero embeddings rather than the tokens: the state entering block 0 is replaced
    by ``final`` anyway, and the embedding table is not read (a sequential runner does not hold it)."""
    recording = _Recording(
        num_blocks=len(blocks), form=form, inject=final, stop_after_last=False, calls=[None] * len(blocks)
    )
    width = int(model.get_input_embeddings().embedding_dim)
    embeds = torch.zeros((*ids.shape, width), dtype=final.dtype, device=final.device)
    sliced = keep is not None and "logits_to_keep" in inspect.signature(model.forward).parameters
    with _relays(blocks, recording):
        if sliced:
            out = model(inputs_embeds=embeds, attention_mask=mask, use_cache=False, logits_to_keep=keep)
        else:
            out = model(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
    return out.logits if keep is None or sliced else out.logits[:, keep]
