"""The dense model's hidden states on fixed windows, cached once, and forward passes that start from them.

Scoring a plan only needs the blocks from its first change onward: every block before it sees
exactly what it saw in the dense model. ``StateCache`` records, in one dense pass, the state
entering every block (and the one leaving the last); ``forward_from`` then runs the model's own
forward with the blocks before ``start`` dropped (a ``pruned_view``) and the cached state put in
place of the first remaining block's input, so masks, positions, the final norm and the head are
the model's own code for every architecture. ``docs/algorithm.md`` §8b says what this costs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from lorp.blocks import (
    block_input_hidden,
    block_output_hidden,
    decoder_blocks,
    input_device,
    pruned_view,
    replace_block_input,
)
from lorp.calibration import TokenWindows
from lorp.errors import JobCancelled


class StopForward(Exception):
    """Raised by a hook once everything a pass needs has been recorded."""


class StateCache:
    """Hidden states entering each block 0..N-1, and leaving block N-1 (index N), per batch of windows.

    Kept on the model's input device in the model's dtype: ``(N + 1) x tokens x d`` values.
    """

    def __init__(
        self,
        model: Any,
        windows: TokenWindows,
        *,
        batch_size: int = 4,
        progress: Callable[[int, int], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> None:
        self.windows = windows
        self.batch_size = batch_size
        self.num_blocks = len(decoder_blocks(model))
        device = input_device(model)
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.states: list[list[torch.Tensor]] = []
        starts = range(0, windows.num_windows, batch_size)
        for i, begin in enumerate(starts):
            if should_cancel is not None and should_cancel():
                raise JobCancelled("the job was cancelled while caching hidden states")
            ids = windows.input_ids[begin : begin + batch_size].to(device)
            mask = windows.attention_mask[begin : begin + batch_size].to(device)
            self.batches.append((ids, mask))
            self.states.append(_dense_states(model, ids, mask))
            if progress is not None:
                progress(i + 1, len(starts))

    @property
    def num_batches(self) -> int:
        return len(self.batches)

    def state(self, batch: int, block: int) -> torch.Tensor:
        """The dense state entering ``block`` (``N``: leaving the last block) in batch ``batch``."""
        return self.states[batch][block]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for states in self.states for t in states)


def _dense_states(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    blocks = decoder_blocks(model)
    found: list[torch.Tensor | None] = [None] * (len(blocks) + 1)
    handles = []
    for j, block in enumerate(blocks):
        handles.append(
            block.register_forward_pre_hook(
                lambda _m, args, kwargs, j=j: found.__setitem__(j, block_input_hidden(args, kwargs).detach()),
                with_kwargs=True,
            )
        )

    def last(_m: Any, _a: Any, out: Any) -> None:
        found[-1] = block_output_hidden(out).detach()
        raise StopForward

    handles.append(blocks[-1].register_forward_hook(last))
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    except StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    assert all(t is not None for t in found)
    return [t for t in found if t is not None]


@contextmanager
def started_at(model: Any, cache: StateCache, start: int, removed: Sequence[int]) -> Iterator[Callable[[int], Any]]:
    """The model with blocks ``< start`` and ``removed`` dropped and block ``start``'s dense input injected.

    Yields ``run(batch)``, which runs the model's forward on cached batch ``batch`` and returns its
    output; hooks the caller registered on the kept blocks fire as usual. Block ``start`` need not be
    kept: its dense input is what the first kept block after it receives.
    """
    dropped = sorted(set(range(start)) | set(removed))
    blocks = list(decoder_blocks(model))
    kept = [b for b in range(len(blocks)) if b not in set(dropped)]
    if not kept:
        raise ValueError("a forward pass needs at least one kept block")
    first = blocks[kept[0]]
    current: list[torch.Tensor] = []

    def inject(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return replace_block_input(args, kwargs, current[0])

    def run(batch: int) -> Any:
        ids, mask = cache.batches[batch]
        current[:] = [cache.state(batch, start)]
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask, use_cache=False)

    handle = first.register_forward_pre_hook(inject, with_kwargs=True)
    try:
        with pruned_view(model, dropped):
            yield run
    finally:
        handle.remove()
