"""One-pass capture of the similarity statistics S and D (docs/algorithm.md §1-2).

The runner (``lorp.execution``) runs each batch through the decoder blocks and hands over the state
entering each block and the one leaving the last, written straight into one float32 buffer; the
final norm and the LM head never run. Per batch, the normalised states of the real (unpadded)
tokens (L = N+1 of them per token) go through one batched product giving every token's L x L dot
products; summed over tokens they are S's ``[L, tokens*d] x [tokens*d, L]`` product, and their
``arccos / pi`` summed over tokens is D. Sums accumulate in float64.

Only sums and a token count persist between batches, so memory does not grow with the number of
calibration sequences. A sequential runner's capture can go through a state store on disk instead
(``lorp.states.window_store``, ``lorp.execution.scratch``): each state is written as its block finishes, the pass
resumes from the files of an interrupted attempt, and the host holds one batch's states at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from lorp.calibration import TokenWindows
from lorp.errors import InvalidRequestError
from lorp.execution import Batch, Runner, as_runner
from lorp.execution.scratch import StateStore
from lorp.states import Riders, StateSink, store_states

EPS = 1e-8
AngularMode = Literal["all_tokens", "last_token"]
# Tokens per chunk of the per-token product for D: bounds the [chunk, L, L] temporary.
_D_CHUNK_ELEMENTS = 1 << 24
STORED_READ_BYTES = 64 << 20  # float32 states read back from a store at once, at most


@dataclass
class SimilarityStats:
    """S and D over the N+1 hidden states, with what they were computed from."""

    S: np.ndarray  # (N+1, N+1) float64, diagonal exactly 1
    D: np.ndarray  # (N+1, N+1) float64, diagonal exactly 0
    num_tokens: int
    num_sequences: int
    angular_mode: str = "all_tokens"

    @property
    def num_blocks(self) -> int:
        return int(self.S.shape[0]) - 1


def capture_similarity(
    model: Any,
    windows: TokenWindows,
    *,
    batch_size: int = 8,
    angular: AngularMode = "all_tokens",
    progress: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    keep_states: StateSink | None = None,
    store: StateStore | None = None,
    mlp_store: StateStore | None = None,
    also: Sequence[tuple[list[Batch], StateStore]] = (),
    riders: Riders | None = None,
) -> SimilarityStats:
    """Compute S and D over all calibration tokens in one forward pass per batch.

    Args:
        model: A causal LM whose decoder blocks ``lorp.blocks`` can find.
        windows: Token windows; positions with ``attention_mask == 0`` never count.
        batch_size: Sequences per forward pass.
        angular: ``"all_tokens"`` (default) averages D over every real token; ``"last_token"`` over
            the last real token of each sequence only (Gromov et al.'s variant).
        progress: Called as ``progress(sequences_done, sequences_total)`` after each batch.
        should_cancel: Checked between batches; when it returns True, ``JobCancelled`` is raised.
        keep_states: a :class:`lorp.states.StateSink`, called per batch as ``keep_states(runner, batch,
            states, mlp)`` with the raw states of the real tokens, ``[tokens, N+1, d]`` float32, and
            while it wants more windows their blocks' MLP outputs ``[tokens, N, d]`` (so that healing
            runs no block again).
        store: for a sequential runner, a :class:`lorp.execution.scratch.StateStore` (``lorp.states.window_store``)
            the pass writes each state to as its block finishes, resuming at the first incomplete one;
            S and D are then summed from it a batch at a time (the same sums, in the same order).
        mlp_store: with ``store``, where the blocks' MLP outputs on the first windows go
            (``lorp.states.store_states``' ``mlp``).
        also, riders: with ``store``, other windows stored by the same pass, and windows run along it
            unstored (``lorp.states.store_states``): each block loaded once for all of them.

    Returns:
        SimilarityStats with S and D as float64 (N+1)x(N+1) arrays.
    """
    if batch_size < 1:
        raise InvalidRequestError("batch_size must be at least 1", field="calibration.batch_size")
    if angular not in ("all_tokens", "last_token"):
        raise InvalidRequestError(f"unknown angular mode {angular!r}", field="calibration.angular")
    runner = as_runner(model)
    # The sums stay where the states are until the end: read back per batch, each read would wait for
    # the device and leave it idle while the next batch's work is queued.
    sums: list[torch.Tensor] = []
    n_tokens = 0
    n_angular = 0
    total = int(windows.input_ids.shape[0])
    done = 0
    with torch.inference_mode():
        batches = runner.batches(windows, batch_size, should_cancel=should_cancel, doing="capturing similarity")
        stored = store is not None and runner.mode == "sequential"
        if store is not None and stored:
            found = _stored_states(
                runner, list(batches), store, should_cancel, progress, total, mlp_store, also, riders
            )
        else:
            found = _real_states(runner, batches, keep_states)
        for batch, offset, x, mlp in found:  # x: [tokens, L, d], the batch's real tokens from ``offset``
            if keep_states is not None:
                keep_states(runner, batch, x, mlp)
            last = None
            if angular == "last_token":
                last = _last_token_positions(batch.mask) - offset
                last = last[(last >= 0) & (last < x.shape[0])]
            batch_sums = _pair_sums(x, last)
            sums = [batch_sums] if not sums else [sums[0] + batch_sums.to(sums[0].device)]
            n_tokens += int(x.shape[0])
            n_angular += int(x.shape[0]) if last is None else int(last.numel())
            if offset + x.shape[0] == batch.real_count:  # the batch's last part
                done += batch.num_windows
                if progress is not None and not stored:  # a stored pass reports its blocks instead
                    progress(done, total)

    if n_tokens == 0:
        raise InvalidRequestError("the calibration windows hold no real tokens", field="calibration.dataset")
    s_sum, d_sum = sums[0].cpu().numpy()
    S = s_sum / n_tokens
    D = d_sum / math.pi / max(n_angular, 1)
    np.fill_diagonal(S, 1.0)
    np.fill_diagonal(D, 0.0)
    return SimilarityStats(S=S, D=D, num_tokens=n_tokens, num_sequences=total, angular_mode=angular)


def _stored_states(
    runner: Runner,
    batches: list[Batch],
    store: StateStore,
    should_cancel: Callable[[], bool] | None,
    progress: Callable[[int, int], None] | None,
    total: int,
    mlp: StateStore | None = None,
    also: Sequence[tuple[list[Batch], StateStore]] = (),
    riders: Riders | None = None,
) -> Iterator[tuple[Batch, int, torch.Tensor, torch.Tensor | None]]:
    """:func:`_real_states` of a sequential runner through ``store`` (``lorp.states.store_states``), then
    the N + 1 states read back a part of a batch at a time, at most :data:`STORED_READ_BYTES` of them
    (a whole batch's would be 0.4 GB for 4 x 256 tokens of a 48-block model of width 2048; the MLP
    outputs stay in ``mlp``)."""
    on_block = None if progress is None else lambda done, blocks: progress(total * done // (blocks + 1), total)
    store_states(
        runner, batches, store, should_cancel=should_cancel, on_block=on_block, mlp=mlp, also=also, riders=riders
    )
    n_states = runner.num_blocks + 1
    rows = max(1, STORED_READ_BYTES // (n_states * store.shape["width"] * 4))
    begin = 0
    for batch in batches:
        count = batch.real_count
        for offset in range(0, count, rows):
            part = min(rows, count - offset)
            x = torch.empty((part, n_states, store.shape["width"]), dtype=torch.float32)
            for j in range(n_states):
                x[:, j] = store.read(j, begin + offset, begin + offset + part)
            yield batch, offset, x, None
            del x
        begin += count


def _real_states(
    runner: Runner, batches: Iterable[Batch], sink: StateSink | None = None
) -> Iterator[tuple[Batch, int, torch.Tensor, torch.Tensor | None]]:
    """Each batch with the N+1 states of its real tokens in one token-major float32 buffer, ``[tokens, L, d]``
    (from token 0: the offset yielded is 0).

    Token-major, so that the per-token products for S and D are one batched matrix product over
    contiguous memory; each state is copied in as the pass hands it over (normalisation happens on
    the products). Buffers are kept where the runner keeps states between blocks (``state_device``).
    While ``sink`` wants more windows, a group's blocks' MLP outputs on the real tokens come too
    (``[tokens, N, d]`` on the host), else None.
    """
    n_states = runner.num_blocks + 1
    device = runner.state_device
    for group in runner.groups(batches):
        buffers: list[torch.Tensor | None] = [None] * len(group)
        mlp: list[list[torch.Tensor]] = [[] for _ in group]
        watching = sink is not None and sink.wants_more

        def store(
            i: int, index: int, hidden: torch.Tensor, group: list[Batch] = group, buffers: list[Any] = buffers
        ) -> None:
            h = hidden.detach().to(device)
            h = h[group[i].real.to(device)] if group[i].padded else h.reshape(-1, h.shape[-1])  # [tokens, d]
            buffer = buffers[i]
            if buffer is None:
                buffer = buffers[i] = torch.empty(
                    (h.shape[0], n_states, h.shape[1]), dtype=torch.float32, device=device
                )
            buffer[:, index].copy_(h)

        watch: AbstractContextManager[dict[int, list[torch.Tensor]]] = (
            runner.watch_mlp(range(runner.num_blocks)) if watching else nullcontext({})
        )
        with watch as latest:

            def keep_mlp(
                i: int, j: int, _h: torch.Tensor, group: list[Batch] = group, latest: Any = latest, mlp: Any = mlp
            ) -> None:
                mlp[i].append(group[i].real_rows(latest[j][0]).cpu())

            finals = runner.run_all(group, on_input=store, on_output=keep_mlp if watching else None)
        for i, (batch, final) in enumerate(zip(group, finals, strict=True)):
            store(i, n_states - 1, final)
            buffer = buffers[i]
            assert buffer is not None
            buffers[i] = None
            yield batch, 0, buffer, torch.stack(mlp[i], dim=1) if watching else None
            mlp[i] = []


def _last_token_positions(mask: torch.Tensor) -> torch.Tensor:
    """Indices, into the flattened real tokens, of each sequence's last real token."""
    counts = mask.sum(dim=1)
    ends = torch.cumsum(counts, dim=0) - 1
    return ends[counts > 0]


def _pair_sums(x: torch.Tensor, last: torch.Tensor | None) -> torch.Tensor:
    """Sums over tokens of x_i . x_j (for S) and of arccos(x_i . x_j) (for D), stacked ``[2, L, L]`` in
    float64 on x's device.

    ``x`` holds the raw states, ``[tokens, L, d]``. One batched product gives every token's L x L
    Gram matrix G; its diagonal holds the squared norms, so the normalised products are
    ``G_ij / ((|h_i| + eps)(|h_j| + eps))`` without a separate normalisation pass. D needs these
    per-token products anyway, and their sum over tokens is exactly S's
    ``[L, tokens*d] x [tokens*d, L]`` product: one product serves both. Chunks bound the
    ``[chunk, L, L]`` temporary; ``last`` restricts D to those tokens (the last-token variant).
    """
    tokens, n_states, _ = x.shape
    chunk = max(1, _D_CHUNK_ELEMENTS // (n_states * n_states))
    totals = torch.zeros((2, n_states, n_states), dtype=torch.float64, device=x.device)
    s_total, d_total = totals[0], totals[1]

    def cosines(part: torch.Tensor) -> torch.Tensor:
        gram = torch.bmm(part, part.transpose(1, 2))  # [chunk, L, L], float32
        scale = gram.diagonal(dim1=1, dim2=2).sqrt().add_(EPS)  # |h| + eps, [chunk, L]
        return gram.div_(scale.unsqueeze(2)).div_(scale.unsqueeze(1))

    for begin in range(0, tokens, chunk):
        cos = cosines(x[begin : begin + chunk])
        s_total += cos.sum(dim=0, dtype=torch.float64)
        if last is None:
            d_total += torch.arccos(cos.clamp_(-1.0, 1.0)).sum(dim=0, dtype=torch.float64)
    if last is not None:
        cos = cosines(x[last]).clamp_(-1.0, 1.0)
        d_total += torch.arccos(cos).sum(dim=0, dtype=torch.float64)
    return totals
