"""The dense model's hidden states on fixed windows, cached once, for passes that start from them.

Scoring a plan only needs the blocks from its first change onward: every block before it sees
exactly what it saw in the dense model. ``StateCache`` keeps, per batch of windows, the batch made
ready to run (``lorp.execution.Batch``) and the dense state entering every block (and the one leaving
the last); a pass then runs from any block on its cached state (``Runner.run(start=..., state=...)``).
``docs/algorithm.md`` §8b says what this costs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lorp.calibration import TokenWindows
from lorp.execution import Batch, Runner, as_runner


class StateCache:
    """Hidden states entering each block 0..N-1, and leaving block N-1 (index N), per batch of windows.

    Kept where the runner runs (the model's input device) in the model's dtype: ``(N + 1) x tokens x d``
    values.
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
        runner = as_runner(model)
        self.windows = windows
        self.batch_size = batch_size
        self.num_blocks = runner.num_blocks
        self.batches: list[Batch] = []
        self.states: list[list[torch.Tensor]] = []
        total = -(-windows.num_windows // batch_size)
        batches = runner.batches(windows, batch_size, should_cancel=should_cancel, doing="caching hidden states")
        for group in runner.groups(batches):
            self.batches.extend(group)
            self.states.extend(runner.states_all(group))
            if progress is not None:
                progress(len(self.batches), total)

    @classmethod
    def from_batches(cls, batches: list[Batch], states: list[list[torch.Tensor]], batch_size: int) -> StateCache:
        """A cache of states recorded elsewhere (``StateSink``): per batch, the batch and its N+1 states."""
        cache = cls.__new__(cls)
        ids = torch.cat([b.ids.cpu() for b in batches]) if batches else torch.zeros(0, 0, dtype=torch.long)
        mask = torch.cat([b.mask.cpu() for b in batches]) if batches else torch.zeros(0, 0, dtype=torch.long)
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
        self.batches: list[Batch] = []
        self.states: list[list[torch.Tensor]] = []
        self.windows = 0

    def __call__(self, runner: Runner, batch: Batch, real_states: torch.Tensor) -> None:
        take = min(batch.num_windows, self.max_windows - self.windows)
        if take <= 0:
            return
        if take < batch.num_windows:  # the last batch kept is cut short: made ready again, smaller
            batch = runner.batch(batch.ids[:take], batch.mask[:take])
        real = batch.real
        rows = real_states[: int(real.sum())]  # real tokens are in window order
        kept: list[torch.Tensor] = []
        for j in range(rows.shape[1]):
            full = torch.zeros((*batch.ids.shape, rows.shape[2]), dtype=self.dtype, device=rows.device)
            full[real.to(rows.device)] = rows[:, j].to(self.dtype)
            kept.append(full.to(batch.ids.device))
        self.batches.append(batch)
        self.states.append(kept)
        self.windows += take

    def cache(self) -> StateCache:
        return StateCache.from_batches(self.batches, self.states, self.batch_size)
