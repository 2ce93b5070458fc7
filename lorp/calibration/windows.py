"""Documents into token windows: one token stream (documents joined by the end-of-sequence token)
cut into windows of ``seq_len`` tokens.

- capture windows: ``num_samples`` non-overlapping windows drawn with a seeded generator from the
  first part of the stream, for the similarity capture (docs/algorithm.md §1-2);
- validation windows: consecutive windows over the last part of the stream, held out from capture,
  on which ``auto`` scores candidate plans;
- training windows (``options.heal: distill`` only): the capture windows and, where distillation asks
  for more, further windows from the same first part that overlap none of them, so that a long
  distillation does not read the same few windows over and over (docs/algorithm.md §8c);
- evaluation windows: consecutive non-overlapping windows over held-out text (docs/algorithm.md §9).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lorp.assets import texts_sha256
from lorp.errors import CalibrationError


@dataclass(frozen=True)
class TokenWindows:
    """A batch of token windows.

    Attributes:
        input_ids: int64 ``[M, T]``.
        attention_mask: int64 ``[M, T]``; 0 marks padding (only chat-wrapped windows have any).
        starts: the offset of each window in the token stream it was cut from (for chat-wrapped
            windows, the offset of the source text before wrapping).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    starts: tuple[int, ...] = field(default=())

    @property
    def num_tokens(self) -> int:
        """The number of real (unmasked) tokens."""
        return int(self.attention_mask.sum().item())

    @property
    def num_windows(self) -> int:
        """The number of windows (M)."""
        return int(self.input_ids.shape[0])


@dataclass(frozen=True)
class CalibrationData:
    """The token windows of one calibration run.

    Attributes:
        capture: the windows the similarity capture runs on.
        validation: windows over a held-out slice at the end of the calibration text, disjoint from
            ``capture``, on which candidate plans are scored.
        text_sha256: hash of the documents used (provenance).
        num_stream_tokens: the length of the whole token stream.
        training: what distillation trains on where it asked for more windows than the capture's
            (``num_training``): the capture windows followed by the further ones; None otherwise.
    """

    capture: TokenWindows
    validation: TokenWindows
    text_sha256: str
    num_stream_tokens: int
    training: TokenWindows | None = None

    @property
    def training_windows(self) -> TokenWindows:
        """Distillation's training windows: :attr:`training`, or the capture windows."""
        return self.training if self.training is not None else self.capture


def tokenize_stream(tokenizer: Any, texts: list[str], *, min_tokens: int | None = None) -> torch.Tensor:
    """Tokenize documents into one stream.

    Args:
        tokenizer: a Hugging Face tokenizer.
        texts: the documents; each is tokenized without special tokens.
        min_tokens: stop once the stream holds at least this many tokens (documents are tokenized in
            order, a few at a time); the result is a prefix of the whole stream. ``None`` tokenizes all.

    Returns:
        A 1-D int64 tensor: the documents' tokens, consecutive documents separated by the
        tokenizer's end-of-sequence id (no separator when the tokenizer has none).
    """
    eos = tokenizer.eos_token_id
    pieces: list[int] = []
    step = len(texts) if min_tokens is None else 4
    for start in range(0, len(texts), max(step, 1)):
        # verbose=False: documents are longer than the model's context on purpose; windows cut them.
        encoded = tokenizer(list(texts[start : start + step]), add_special_tokens=False, verbose=False)["input_ids"]
        for offset, ids in enumerate(encoded):
            if start + offset and eos is not None:
                pieces.append(int(eos))
            pieces.extend(ids)
        if min_tokens is not None and len(pieces) >= min_tokens:
            break
    return torch.tensor(pieces, dtype=torch.int64)


def _check_sizes(*, seq_len: int, num_samples: int | None = None, max_windows: int | None = None) -> None:
    if num_samples is not None and (isinstance(num_samples, bool) or num_samples < 1):
        raise CalibrationError(f"num_samples must be at least 1, got {num_samples}", field="calibration.num_samples")
    if isinstance(seq_len, bool) or seq_len < 2:
        raise CalibrationError(f"seq_len must be at least 2, got {seq_len}", field="calibration.seq_len")
    if max_windows is not None and max_windows < 1:
        raise CalibrationError(f"max_windows must be at least 1, got {max_windows}", field="evaluation.max_windows")


def _consecutive_windows(stream: torch.Tensor, offset: int, seq_len: int, count: int) -> TokenWindows:
    starts = tuple(offset + i * seq_len for i in range(count))
    if count:
        ids = stream[offset : offset + count * seq_len].reshape(count, seq_len).clone()
    else:
        ids = torch.zeros((0, seq_len), dtype=torch.int64)
    return TokenWindows(input_ids=ids, attention_mask=torch.ones_like(ids), starts=starts)


def _chat_wrap(tokenizer: Any, windows: TokenWindows, seq_len: int) -> TokenWindows:
    """Wrap each window's text as one user message, re-tokenize, truncate and right-pad to seq_len."""
    if not getattr(tokenizer, "chat_template", None):
        raise CalibrationError(
            "chat_template=True needs a tokenizer with a chat template; this one has none",
            field="calibration.chat_template",
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise CalibrationError(
            "the tokenizer has neither a pad nor an eos token to pad with", field="calibration.chat_template"
        )
    ids = torch.full((windows.num_windows, seq_len), int(pad), dtype=torch.int64)
    mask = torch.zeros((windows.num_windows, seq_len), dtype=torch.int64)
    for row, window in enumerate(windows.input_ids.tolist()):
        content = tokenizer.decode(window, skip_special_tokens=False)
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False)
        # The template writes the special tokens itself; letting the tokenizer add its own would
        # duplicate e.g. the BOS.
        wrapped = tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"][:seq_len]
        ids[row, : len(wrapped)] = torch.tensor(wrapped, dtype=torch.int64)
        mask[row, : len(wrapped)] = 1
    return TokenWindows(input_ids=ids, attention_mask=mask, starts=windows.starts)


def _check_validation(validation_fraction: float, max_validation_windows: int) -> None:
    if not 0.0 <= validation_fraction < 1.0:
        raise CalibrationError(
            f"validation_fraction must be in [0, 1), got {validation_fraction}", field="calibration.validation_fraction"
        )
    if max_validation_windows < 0:
        raise CalibrationError(
            f"max_validation_windows must be at least 0, got {max_validation_windows}",
            field="calibration.validation_windows",
        )


def _draw_starts(available: int, num_samples: int, seq_len: int, seed: int) -> list[int]:
    """``num_samples`` non-overlapping window starts in the first ``available`` tokens, sorted, drawn
    uniformly over all placements: choose sorted distinct q_i in [0, available - M*T + M) and shift
    window i by i*(T-1), which leaves at least T between consecutive starts."""
    rng = np.random.default_rng(seed)
    population = available - num_samples * seq_len + num_samples
    picks = np.sort(rng.choice(population, size=num_samples, replace=False))
    return [int(q) + i * (seq_len - 1) for i, q in enumerate(picks)]


def _fresh_starts(available: int, taken: list[int], seq_len: int, count: int, seed: int) -> list[int]:
    """Up to ``count`` window starts in the first ``available`` tokens overlapping none of the windows
    starting at ``taken`` nor each other, sorted: every slot laid end to end in the gaps between the
    taken windows, ``count`` of them drawn with a generator of their own from ``seed`` (all of them when
    there are no more)."""
    slots: list[int] = []
    edge = 0
    for start in [*sorted(taken), available]:
        slots += range(edge, start - seq_len + 1, seq_len)
        edge = start + seq_len
    if len(slots) <= count:
        return slots
    picks = np.sort(np.random.default_rng([seed, 1]).choice(len(slots), size=count, replace=False))
    return [slots[int(i)] for i in picks]


def build_calibration(
    tokenizer: Any,
    texts: list[str],
    *,
    num_samples: int,
    seq_len: int,
    seed: int = 0,
    chat_template: bool = False,
    validation_fraction: float = 0.1,
    max_validation_windows: int = 16,
    num_training: int = 0,
) -> CalibrationData:
    """Cut calibration text into capture windows and a held-out validation slice.

    The documents become one token stream (:func:`tokenize_stream`). Its last ``validation_fraction``
    (at least one window's worth when the fraction is positive) is the validation slice: consecutive
    non-overlapping windows of ``seq_len``, at most ``max_validation_windows``. From the rest,
    ``num_samples`` non-overlapping windows are drawn with ``numpy.random.default_rng(seed)``,
    uniformly over all non-overlapping placements, and ordered by position.

    Args:
        tokenizer: a Hugging Face tokenizer.
        texts: the calibration documents.
        num_samples: the number of capture windows (M), at least 1.
        seq_len: the window length in tokens (T), at least 2.
        seed: the seed of the window draw; the same seed and text give the same windows.
        chat_template: wrap each capture window's text as one user message with the tokenizer's
            chat template (for instruct models), then truncate to ``seq_len`` and right-pad with the
            pad id (eos if none), attention mask 0 on padding.
        validation_fraction: the share of the stream held out at its end, in ``[0, 1)``; 0 gives no
            validation windows.
        max_validation_windows: the most validation windows kept (0 for none).
        num_training: the windows distillation trains on; where that is more than
            ``num_samples``, the capture windows are followed by further ones from the same text,
            overlapping none of them (:attr:`CalibrationData.training`; fewer where the text runs
            out, and distillation then reads each window more often).

    Returns:
        The capture and validation windows with the text's hash and the stream's length.

    Raises:
        CalibrationError: with ``field`` ``num_samples`` or ``seq_len`` when the values are out of
            range or the text is too short (the message says how many tokens there are and how many
            windows fit), ``validation_fraction`` / ``max_validation_windows`` when out of range, and
            ``chat_template`` when the tokenizer has no template.
    """
    _check_sizes(seq_len=seq_len, num_samples=num_samples)
    _check_validation(validation_fraction, max_validation_windows)
    stream = tokenize_stream(tokenizer, texts)
    total = int(stream.numel())

    held_out = math.floor(total * validation_fraction)
    if validation_fraction > 0 and max_validation_windows > 0:
        # A slice shorter than one window would score plans on nothing.
        held_out = max(held_out, seq_len)
    held_out = min(held_out, total)
    available = total - held_out
    slots = available // seq_len
    if slots < num_samples:
        field_at_fault = "calibration.seq_len" if slots == 0 else "calibration.num_samples"
        raise CalibrationError(
            f"the calibration text has {total} tokens; after holding out {held_out} for validation, "
            f"{available} remain, which fit {slots} non-overlapping windows of seq_len={seq_len}, "
            f"but num_samples={num_samples} were asked: give more text, fewer samples or a shorter seq_len",
            field=field_at_fault,
        )

    starts = _draw_starts(available, num_samples, seq_len, seed)

    def windows_at(at: list[int]) -> TokenWindows:
        ids = torch.stack([stream[s : s + seq_len] for s in at]).clone()
        drawn = TokenWindows(input_ids=ids, attention_mask=torch.ones_like(ids), starts=tuple(at))
        return _chat_wrap(tokenizer, drawn, seq_len) if chat_template else drawn

    capture = windows_at(starts)
    training = None
    if num_training > num_samples and (
        fresh := _fresh_starts(available, starts, seq_len, num_training - num_samples, seed)
    ):
        more = windows_at(fresh)
        training = TokenWindows(
            input_ids=torch.cat([capture.input_ids, more.input_ids]),
            attention_mask=torch.cat([capture.attention_mask, more.attention_mask]),
            starts=capture.starts + more.starts,
        )

    n_validation = min(held_out // seq_len, max_validation_windows) if validation_fraction > 0 else 0
    validation = _consecutive_windows(stream, available, seq_len, n_validation)
    return CalibrationData(
        capture=capture,
        validation=validation,
        text_sha256=texts_sha256(texts),
        num_stream_tokens=total,
        training=training,
    )


def evaluation_windows(
    tokenizer: Any, texts: list[str], *, seq_len: int, max_windows: int | None = None
) -> TokenWindows:
    """Consecutive non-overlapping windows of ``seq_len`` over held-out text (docs/algorithm.md §9).

    Args:
        tokenizer: a Hugging Face tokenizer.
        texts: the evaluation documents (joined as in :func:`tokenize_stream`).
        seq_len: the window length in tokens, at least 2.
        max_windows: keep only the first this many windows; ``None`` keeps all.

    Returns:
        The windows, in stream order; a tail shorter than ``seq_len`` is dropped.

    Raises:
        CalibrationError: (field ``calibration.seq_len``) when the text is too short for one window or
            ``seq_len`` < 2; (field ``evaluation.max_windows``) when ``max_windows`` < 1.
    """
    _check_sizes(seq_len=seq_len, max_windows=max_windows)
    # The windows are the stream's first ones: only that prefix needs tokenizing.
    needed = None if max_windows is None else max_windows * seq_len
    stream = tokenize_stream(tokenizer, texts, min_tokens=needed)
    count = int(stream.numel()) // seq_len
    if count == 0:
        raise CalibrationError(
            f"the evaluation text has {int(stream.numel())} tokens, fewer than one window of seq_len={seq_len}",
            field="calibration.seq_len",
        )
    if max_windows is not None:
        count = min(count, max_windows)
    return _consecutive_windows(stream, 0, seq_len, count)
