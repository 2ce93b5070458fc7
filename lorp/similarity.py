"""One-pass capture of the similarity statistics S and D (docs/algorithm.md §1-2).

Forward pre-hooks on every decoder block record the hidden state that enters it, a forward hook on
the last block records its output and then stops the forward pass, so the final norm and the LM
head never run. Per batch, the normalised states of the real (unpadded) tokens (L = N+1 of them per
token) go through one batched product giving every token's L x L dot products; summed over tokens
they are S's ``[L, tokens*d] x [tokens*d, L]`` product, and their ``arccos / pi`` summed over tokens
is D. Sums accumulate in float64.

Only sums and a token count persist between batches, so memory does not grow with the number of
calibration sequences.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from lorp.blocks import block_input_hidden, block_output_hidden, decoder_blocks, input_device
from lorp.calibration import TokenWindows
from lorp.errors import InvalidRequestError, JobCancelled

EPS = 1e-8
AngularMode = Literal["all_tokens", "last_token"]
# Tokens per chunk of the per-token product for D: bounds the [chunk, L, L] temporary.
_D_CHUNK_ELEMENTS = 1 << 24


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


class _StopForward(Exception):
    """Raised by the last block's hook: nothing after the last block is needed."""


class _StateRecorder:
    """Hooks that copy the N+1 hidden states of one batch, real tokens only, into one float32 buffer.

    The buffer is token-major, ``[tokens, L, d]``, so that the per-token products for S and D are
    one batched matrix product over contiguous memory, with no stacking copy.
    """

    def __init__(self, blocks: torch.nn.ModuleList) -> None:
        self.blocks = blocks
        self.n_states = len(blocks) + 1
        self.buffer: torch.Tensor | None = None
        self.filled: list[bool] = [False] * self.n_states
        self.mask: torch.Tensor | None = None
        self.all_real = False
        self.compute_device: torch.device | None = None
        self._handles: list[Any] = []

    def start_batch(self, mask: torch.Tensor) -> None:
        self.mask = mask.bool()
        self.all_real = bool(self.mask.all())
        self.buffer = None
        self.filled = [False] * self.n_states

    def _store(self, index: int, hidden: torch.Tensor) -> None:
        # Only a copy here (the forward pass waits on it); normalisation happens on the products.
        assert self.mask is not None
        h = hidden.detach()
        if self.compute_device is not None and h.device != self.compute_device:
            h = h.to(self.compute_device)
        h = h.reshape(-1, h.shape[-1]) if self.all_real else h[self.mask.to(h.device)]  # [tokens, d]
        if self.buffer is None:
            self.buffer = torch.empty((h.shape[0], self.n_states, h.shape[1]), dtype=torch.float32, device=h.device)
        self.buffer[:, index].copy_(h)
        self.filled[index] = True

    def __enter__(self) -> _StateRecorder:
        for idx, block in enumerate(self.blocks):
            self._handles.append(block.register_forward_pre_hook(self._pre_hook(idx), with_kwargs=True))
        self._handles.append(self.blocks[-1].register_forward_hook(self._last_hook, with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _pre_hook(self, idx: int) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self._store(idx, block_input_hidden(args, kwargs))

        return hook

    def _last_hook(self, _module: torch.nn.Module, _args: Any, _kwargs: Any, output: Any) -> None:
        self._store(self.n_states - 1, block_output_hidden(output))
        raise _StopForward


def run_blocks(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    """Run the model up to and including its last decoder block, then stop (no final norm, no head).

    Used by the capture and, with no recording hooks, as the plain-forward baseline of the benchmark.
    """
    blocks = decoder_blocks(model)
    handle = blocks[-1].register_forward_hook(_raise_stop)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()


def _raise_stop(*_args: Any) -> None:
    raise _StopForward


def capture_similarity(
    model: Any,
    windows: TokenWindows,
    *,
    batch_size: int = 8,
    angular: AngularMode = "all_tokens",
    progress: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    keep_states: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
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
        keep_states: Called per batch as ``keep_states(ids, mask, states)`` with the raw states of
            the real tokens, ``[tokens, N+1, d]`` float32 (``lorp.states.StateSink`` keeps them, so
            healing needs no second pass).

    Returns:
        SimilarityStats with S and D as float64 (N+1)x(N+1) arrays.
    """
    if batch_size < 1:
        raise InvalidRequestError("batch_size must be at least 1", field="calibration.batch_size")
    if angular not in ("all_tokens", "last_token"):
        raise InvalidRequestError(f"unknown angular mode {angular!r}", field="calibration.angular")
    blocks = decoder_blocks(model)
    n_states = len(blocks) + 1
    device = input_device(model)
    s_sum = np.zeros((n_states, n_states), dtype=np.float64)
    d_sum = np.zeros((n_states, n_states), dtype=np.float64)
    n_tokens = 0
    n_angular = 0
    total = int(windows.input_ids.shape[0])

    recorder = _StateRecorder(blocks)
    recorder.compute_device = device
    with torch.inference_mode(), recorder:
        for start in range(0, total, batch_size):
            if should_cancel is not None and should_cancel():
                raise JobCancelled("cancelled during similarity capture")
            ids = windows.input_ids[start : start + batch_size].to(device)
            mask = windows.attention_mask[start : start + batch_size].to(device)
            recorder.start_batch(mask)
            with contextlib.suppress(_StopForward):
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            if not all(recorder.filled) or recorder.buffer is None:
                raise RuntimeError("a decoder block did not run during capture")
            x = recorder.buffer  # [tokens, L, d]
            recorder.buffer = None
            if keep_states is not None:
                keep_states(ids, mask, x)
            last = _last_token_positions(mask) if angular == "last_token" else None
            batch_s, batch_d = _pair_sums(x, last)
            s_sum += batch_s
            d_sum += batch_d
            n_tokens += int(x.shape[0])
            n_angular += int(x.shape[0]) if last is None else int(last.numel())
            if progress is not None:
                progress(min(start + batch_size, total), total)

    if n_tokens == 0:
        raise InvalidRequestError("the calibration windows hold no real tokens", field="calibration.dataset")
    S = s_sum / n_tokens
    D = d_sum / max(n_angular, 1)
    np.fill_diagonal(S, 1.0)
    np.fill_diagonal(D, 0.0)
    return SimilarityStats(S=S, D=D, num_tokens=n_tokens, num_sequences=total, angular_mode=angular)


def _last_token_positions(mask: torch.Tensor) -> torch.Tensor:
    """Indices, into the flattened real tokens, of each sequence's last real token."""
    counts = mask.sum(dim=1)
    ends = torch.cumsum(counts, dim=0) - 1
    return ends[counts > 0]


def _pair_sums(x: torch.Tensor, last: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray]:
    """Sums over tokens of x_i . x_j (for S) and of arccos(x_i . x_j) / pi (for D).

    ``x`` holds the raw states, ``[tokens, L, d]``. One batched product gives every token's L x L
    Gram matrix G; its diagonal holds the squared norms, so the normalised products are
    ``G_ij / ((|h_i| + eps)(|h_j| + eps))`` without a separate normalisation pass. D needs these
    per-token products anyway, and their sum over tokens is exactly S's
    ``[L, tokens*d] x [tokens*d, L]`` product: one product serves both. Chunks bound the
    ``[chunk, L, L]`` temporary; ``last`` restricts D to those tokens (the last-token variant).
    """
    tokens, n_states, _ = x.shape
    chunk = max(1, _D_CHUNK_ELEMENTS // (n_states * n_states))
    s_total = torch.zeros((n_states, n_states), dtype=torch.float64, device=x.device)
    d_total = torch.zeros((n_states, n_states), dtype=torch.float64, device=x.device)

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
    return s_total.cpu().numpy(), (d_total / math.pi).cpu().numpy()
