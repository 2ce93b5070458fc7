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

    @classmethod
    def from_batches(
        cls,
        batches: list[tuple[torch.Tensor, torch.Tensor]],
        states: list[list[torch.Tensor]],
        batch_size: int,
    ) -> StateCache:
        """A cache of states recorded elsewhere (``StateSink``): per batch, (ids, mask) and N+1 states."""
        cache = cls.__new__(cls)
        ids = torch.cat([b[0].cpu() for b in batches]) if batches else torch.zeros(0, 0, dtype=torch.long)
        mask = torch.cat([b[1].cpu() for b in batches]) if batches else torch.zeros(0, 0, dtype=torch.long)
        cache.windows = TokenWindows(input_ids=ids, attention_mask=mask)
        cache.batch_size = batch_size
        cache.num_blocks = len(states[0]) - 1 if states else 0
        cache.batches = batches
        cache.states = states
        return cache

    @property
    def num_batches(self) -> int:
        return len(self.batches)

    def state(self, batch: int, block: int) -> torch.Tensor:
        """The dense state entering ``block`` (``N``: leaving the last block) in batch ``batch``."""
        return self.states[batch][block]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for states in self.states for t in states)


class StateSink:
    """Keeps the states a capture pass records for its first ``max_windows`` windows (``keep_states``).

    The capture hands over real tokens only; padded positions are filled with zeros, which nothing
    reads (no real token attends to padding, and padded positions are never scored or fitted).

    Args:
        max_windows: windows to keep (from the first).
        batch_size: the capture's batch size (the cache's batches are its batches).
        dtype: the model's dtype, the states' dtype in a ``StateCache``.
    """

    def __init__(self, max_windows: int, batch_size: int, dtype: torch.dtype) -> None:
        self.max_windows = max_windows
        self.batch_size = batch_size
        self.dtype = dtype
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.states: list[list[torch.Tensor]] = []
        self.windows = 0

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, real_states: torch.Tensor) -> None:
        take = min(int(ids.shape[0]), self.max_windows - self.windows)
        if take <= 0:
            return
        ids, mask = ids[:take], mask[:take]
        real = mask.bool()
        rows = real_states[: int(real.sum())]  # real tokens are in window order
        batch: list[torch.Tensor] = []
        for j in range(rows.shape[1]):
            full = torch.zeros((*ids.shape, rows.shape[2]), dtype=self.dtype, device=rows.device)
            full[real.to(rows.device)] = rows[:, j].to(self.dtype)
            batch.append(full.to(ids.device))
        self.batches.append((ids.clone(), mask.clone()))
        self.states.append(batch)
        self.windows += take

    def cache(self) -> StateCache:
        return StateCache.from_batches(self.batches, self.states, self.batch_size)


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
