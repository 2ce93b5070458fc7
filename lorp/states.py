"""The dense model's hidden states on fixed windows, cached once, for passes that start from them.

Scoring a plan only needs the blocks from its first change onward: every block before it sees
exactly what it saw in the dense model. ``StateCache`` keeps, per batch of windows, the batch made
ready to run (``lorp.execution.Batch``) and the dense state entering every block (and the one leaving
the last); a pass then runs from any block on its cached state (``Runner.run(start=..., state=...)``).
``docs/algorithm.md`` §8b says what this costs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorp.calibration import TokenWindows
from lorp.errors import JobCancelled
from lorp.execution import Batch, Runner, as_runner
from lorp.execution.scratch import StateStore


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
        self.mlp: list[torch.Tensor] | None = None

    @classmethod
    def from_batches(
        cls,
        batches: list[Batch],
        states: list[list[torch.Tensor]],
        batch_size: int,
        mlp: list[torch.Tensor] | None = None,
    ) -> StateCache:
        """A cache of states recorded elsewhere (``StateSink``): per batch, the batch and its N+1 states,
        and (``mlp``) per batch its real tokens' MLP outputs ``[tokens, N, d]``."""
        cache = cls.__new__(cls)
        cache.mlp = mlp
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

    def mlp_output(self, batch: int, block: int) -> torch.Tensor | None:
        """Block ``block``'s dense MLP output M on the real tokens of batch ``batch`` (``[tokens, d]``),
        when the pass that recorded the states kept it (a capture does for the heal windows); else None."""
        return None if self.mlp is None else self.mlp[batch][:, block]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for states in self.states for t in states)


class StateSink:
    """Keeps the states a capture pass records for its first ``max_windows`` windows (``keep_states``),
    and each block's MLP output M there (a heal fit's inputs, so that fitting runs no block again).

    The capture hands over real tokens only; padded positions are filled with zeros, which nothing
    reads (no real token attends to padding, and padded positions are never scored or fitted). The
    MLP outputs are kept as real tokens' rows on the host, ``N x tokens x d`` values in ``dtype``.

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
        self.mlp: list[torch.Tensor] = []
        self.windows = 0

    @property
    def wants_more(self) -> bool:
        """Whether the next batch's windows are (partly) kept."""
        return self.windows < self.max_windows

    def __call__(
        self, runner: Runner, batch: Batch, real_states: torch.Tensor, mlp: torch.Tensor | None = None
    ) -> None:
        """Keep ``batch``'s states (``[tokens, N+1, d]``, its real tokens) and MLP outputs (``[tokens, N, d]``)."""
        take = min(batch.num_windows, self.max_windows - self.windows)
        if take <= 0:
            return
        if take < batch.num_windows:  # the last batch kept is cut short: made ready again, smaller
            batch = runner.batch(batch.ids[:take], batch.mask[:take])
        real = batch.real
        rows = real_states[: batch.real_count]  # real tokens are in window order
        kept: list[torch.Tensor] = []
        for j in range(rows.shape[1]):
            full = torch.zeros((*batch.ids.shape, rows.shape[2]), dtype=self.dtype, device=rows.device)
            full[real.to(rows.device)] = rows[:, j].to(self.dtype)
            kept.append(full.to(batch.ids.device))
        self.batches.append(batch)
        self.states.append(kept)
        if mlp is not None and len(self.mlp) == len(self.batches) - 1:
            self.mlp.append(mlp[: rows.shape[0]].to("cpu", self.dtype))
        self.windows += take

    def cache(self) -> StateCache:
        complete = len(self.mlp) == len(self.batches)
        return StateCache.from_batches(self.batches, self.states, self.batch_size, self.mlp if complete else None)


def window_store(
    runner: Runner, windows: TokenWindows, directory: Path, key: str, *, num_states: int | None = None
) -> StateStore:
    """The :class:`StateStore` a sequential pass over ``windows`` keeps in ``directory``; ``key`` names the
    model and the job (a calibration fingerprint), and the windows' own tokens are added to it.

    ``num_states``: N + 1 (the states entering each block and leaving the last) unless given; a store
    of the blocks' MLP outputs (``store_states``' ``mlp``) has N."""
    width = int(runner.model.get_input_embeddings().embedding_dim)
    tokens = int(windows.attention_mask.bool().sum())
    digest = hashlib.sha256()
    for part in (windows.input_ids, windows.attention_mask):
        digest.update(part.detach().cpu().to(torch.int64).numpy().tobytes())
    dtype = runner.dtype
    key = f"{key}|windows={digest.hexdigest()}|{dtype}|{width}"
    # A 16-bit model's states are 16-bit values: kept as they are, at half float32's bytes.
    stored = dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32
    states = runner.num_blocks + 1 if num_states is None else num_states
    return StateStore(directory, key, num_tokens=tokens, width=width, num_states=states, dtype=stored)


@dataclass
class Riders:
    """Batches that run through a stored pass's blocks beside its windows without being stored (a
    sequential job's dense evaluation, which needs only their states leaving the last block), and
    those states once a pass has carried them (:func:`store_states`); None until then."""

    batches: list[Batch]
    finals: list[torch.Tensor] | None = None


def _entering(batches: list[Batch], store: StateStore) -> list[torch.Tensor]:
    """The states ``batches`` enter the next block to run with: the embedded input of a pass from block
    0 (written to ``store`` as its state 0 when it is empty), else the last complete state an earlier
    attempt stored (its padded positions zero: nothing reads them); a complete store, which no block
    will run on, is not read."""
    states = [batch.entering for batch in batches]
    if store.done == 0:
        store.write(0, _real(states, batches))
    elif 1 < store.done < store.shape["states"]:
        last = store.read(store.done - 1)
        states, begin = [], 0
        for batch in batches:
            full = torch.zeros((*batch.ids.shape, last.shape[1]), dtype=batch.entering.dtype)
            full[batch.real.cpu()] = last[begin : begin + batch.real_count].to(full.dtype)
            states.append(full)
            begin += batch.real_count
    return states


def _real(states: list[torch.Tensor], batches: list[Batch]) -> list[torch.Tensor]:
    """Each batch's state rows of its real tokens."""
    return [h[batch.real.to(h.device)] for h, batch in zip(states, batches, strict=True)]


def store_states(
    runner: Runner,
    batches: list[Batch],
    store: StateStore,
    *,
    should_cancel: Callable[[], bool] | None = None,
    on_block: Callable[[int, int], None] | None = None,
    mlp: StateStore | None = None,
    also: Sequence[tuple[list[Batch], StateStore]] = (),
    riders: Riders | None = None,
) -> None:
    """Run ``batches`` through every block, block-major, writing each state to ``store`` as its block
    finishes (the real tokens' rows, in window order); a store holding an earlier attempt's states goes
    on from the last complete one. ``on_block(done, total)`` follows the blocks.

    ``mlp``: a store of each block's MLP output on the first of those rows (the heal windows'), written
    as the block runs, before its state; a block whose MLP output a resumed pass did not keep is left
    out, and so is every block after it (the heal fits then run their anchors again).

    ``also``: other windows' batches, each with its own store, run through the same blocks (each
    block loaded once for all) and stored the same way: a sequential job's validation windows beside
    its capture's. A store that is not as far as ``store`` (an attempt killed between two writes) is
    left out: a pass of its own (:func:`stored_cache`) goes on with it.

    ``riders``: batches run through the same blocks without being stored, their states leaving the
    last block put in ``riders.finals``; only by a pass from block 0 (one that goes on from an earlier
    attempt's blocks leaves them None: the caller runs them itself)."""
    n_states = runner.num_blocks + 1
    sets = [(list(batches), store), *((list(b), other) for b, other in also if other.done == store.done)]
    ride = riders.batches if riders is not None and riders.finals is None and store.done <= 1 else []
    states = [_entering(set_batches, set_store) for set_batches, set_store in sets]
    every = [batch for set_batches, _ in sets for batch in set_batches] + ride
    flat = [state for set_states in states for state in set_states] + [batch.entering for batch in ride]
    for j in range(store.done - 1, n_states - 1):
        if should_cancel is not None and should_cancel():
            raise JobCancelled("the job was cancelled while running the model block by block")
        if mlp is not None and mlp.done == j:
            kept: list[torch.Tensor] = []
            with runner.watch_mlp([j]) as latest:

                def keep(
                    i: int, block: int, _h: torch.Tensor, kept: list[torch.Tensor] = kept, latest: Any = latest
                ) -> None:
                    wanted = mlp.shape["tokens"] - sum(int(part.shape[0]) for part in kept)
                    if wanted > 0 and i < len(batches):  # the heal windows are the first; later ones not kept
                        kept.append(batches[i].real_rows(latest[block][0])[:wanted].cpu())

                flat = runner.run_all(every, start=j, states=flat, stop=j + 1, on_output=keep)
            mlp.write(j, kept)
        else:
            flat = runner.run_all(every, start=j, states=flat, stop=j + 1)
        at = 0
        for set_batches, set_store in sets:
            set_store.write(j + 1, _real(flat[at : at + len(set_batches)], set_batches))
            at += len(set_batches)
        if on_block is not None:
            on_block(j + 1, n_states - 1)
    if ride and riders is not None:
        riders.finals = flat[len(flat) - len(ride) :]


class StoredStateCache(StateCache):
    """A :class:`StateCache` whose states stay in a complete :class:`StateStore` on disk and are read a
    batch at a time when asked for: what a sequential job keeps instead of (N + 1) x tokens x d in memory.

    Args:
        store: the states of ``batches`` (and possibly of windows after them), complete.
        batches: the batches, in the store's window order, from its first window.
        batch_size: the batches' size (the last may be smaller).
        dtype: the dtype a state is handed out in (the model's).
        mlp: the blocks' MLP outputs on the same windows (``store_states``), where the pass kept them.
    """

    def __init__(
        self,
        store: StateStore,
        batches: list[Batch],
        batch_size: int,
        dtype: torch.dtype,
        mlp: StateStore | None = None,
    ) -> None:
        if store.done != store.shape["states"]:
            raise ValueError("the state store is not complete")
        self.store = store
        self.batches = batches
        self.batch_size = batch_size
        self.dtype = dtype
        self.num_blocks = store.shape["states"] - 1
        self.states = []
        self.mlp = None
        self.mlp_store = mlp
        ids = torch.cat([b.ids.cpu() for b in batches]) if batches else torch.zeros(0, 0, dtype=torch.long)
        mask = torch.cat([b.mask.cpu() for b in batches]) if batches else torch.zeros(0, 0, dtype=torch.long)
        self.windows = TokenWindows(input_ids=ids, attention_mask=mask)
        self._rows = [batch.real_count for batch in batches]
        self._offsets = [sum(self._rows[:i]) for i in range(len(self._rows))]

    def state(self, batch: int, block: int) -> torch.Tensor:
        b = self.batches[batch]
        begin = self._offsets[batch]
        rows = self.store.read(block, begin, begin + self._rows[batch])
        full = torch.zeros((*b.ids.shape, rows.shape[1]), dtype=self.dtype)
        full[b.real.cpu()] = rows.to(self.dtype)
        return full

    def mlp_output(self, batch: int, block: int) -> torch.Tensor | None:
        store = self.mlp_store
        if store is None or block >= store.done:
            return None
        begin = self._offsets[batch]
        return store.read(block, begin, begin + self._rows[batch]).to(self.dtype)

    @property
    def nbytes(self) -> int:
        return 0  # nothing held in memory


def stored_cache(
    runner: Runner,
    windows: TokenWindows,
    directory: Path,
    key: str,
    *,
    batch_size: int,
    should_cancel: Callable[[], bool] | None = None,
    on_block: Callable[[int, int], None] | None = None,
    riders: Riders | None = None,
    store: StateStore | None = None,
    batches: list[Batch] | None = None,
) -> StoredStateCache:
    """:class:`StateCache` of a sequential runner with the states on disk in ``directory`` (resumed
    when an earlier attempt left them there, and nothing run when another pass completed them:
    ``store_states(also=...)``); ``riders`` go along where the pass runs from block 0. ``store`` and
    ``batches``: the windows' store and batches where the caller made them already."""
    store = store if store is not None else window_store(runner, windows, directory, key)
    if batches is None:
        batches = list(runner.batches(windows, batch_size, should_cancel=should_cancel, doing="caching hidden states"))
    store_states(runner, batches, store, should_cancel=should_cancel, on_block=on_block, riders=riders)
    return StoredStateCache(store, batches, batch_size, runner.dtype)
