"""Calibration and evaluation text: where it comes from and how it becomes token windows.

A text source (the built-in corpus, a text file, a JSONL file or a hub dataset) yields documents; the
documents become one token stream (documents joined by the end-of-sequence token); the stream is cut
into windows of ``seq_len`` tokens:

- capture windows: ``num_samples`` non-overlapping windows drawn with a seeded generator from the
  first part of the stream, for the similarity capture (docs/algorithm.md §1-2);
- validation windows: consecutive windows over the last part of the stream, held out from capture,
  on which ``auto`` scores candidate plans;
- evaluation windows: consecutive non-overlapping windows over held-out text (docs/algorithm.md §9).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from lorp.assets import builtin_corpus, texts_sha256
from lorp.errors import CalibrationError

SourceKind = Literal["builtin", "text", "jsonl", "hub"]
Role = Literal["calibration", "evaluation"]

_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_BUILTIN_SPECS = ("builtin", "builtin:enwiki-sample")


@dataclass(frozen=True)
class TextSource:
    """Where calibration or evaluation text comes from.

    Attributes:
        kind: ``"builtin"`` (the built-in Wikipedia sample), ``"text"`` (one UTF-8 file, one
            document), ``"jsonl"`` (one JSON object per line) or ``"hub"`` (a Hugging Face dataset).
        path: the file, for ``text`` and ``jsonl``.
        text_field: the JSONL field or the hub dataset column holding the text.
        dataset: the hub dataset id, for ``hub``.
        config: the hub dataset's configuration, if any.
        split: the hub dataset's split (slicing syntax such as ``train[:1000]`` allowed).
        revision: the hub dataset's revision, if pinned.
    """

    kind: SourceKind
    path: str | None = None
    text_field: str = "text"
    dataset: str | None = None
    config: str | None = None
    split: str = "train"
    revision: str | None = None


def _bad_spec(spec: str, why: str) -> CalibrationError:
    return CalibrationError(f"invalid calibration source {spec!r}: {why}", field="calibration")


def _parse_hub(spec: str) -> TextSource:
    rest = spec[len("hf:") :]
    rest, hash_sign, text_field = rest.partition("#")
    if hash_sign and not text_field.strip():
        raise _bad_spec(spec, "empty text field after '#'")
    # Dataset ids, revisions and configs never hold ':', so the first one starts the split, which
    # may itself hold ':' in slicing syntax (train[:1000]).
    ref, colon, split = rest.partition(":")
    if colon and not split.strip():
        raise _bad_spec(spec, "empty split after ':'")
    revision: str | None = None
    config: str | None = None
    if "@" in ref:
        dataset, _, after = ref.partition("@")
        revision, slash, config_part = after.partition("/")
        if not revision or (slash and not config_part):
            raise _bad_spec(spec, "expected 'dataset@revision' or 'dataset@revision/config'")
        config = config_part or None
    else:
        parts = ref.split("/")
        if len(parts) > 3:
            raise _bad_spec(spec, "too many '/' (expected 'name', 'owner/name' or 'owner/name/config')")
        if len(parts) == 3:
            dataset, config = f"{parts[0]}/{parts[1]}", parts[2]
        else:
            dataset = ref
    if not dataset or any(not piece for piece in dataset.split("/")) or dataset.count("/") > 1:
        raise _bad_spec(spec, "missing or malformed dataset id")
    if config is not None and not config:
        raise _bad_spec(spec, "empty config")
    return TextSource(
        kind="hub",
        dataset=dataset,
        config=config,
        split=split.strip() or "train",
        revision=revision,
        text_field=text_field.strip() or "text",
    )


def parse_source(spec: str | None) -> TextSource:
    """Parse a calibration-source string as the CLI and the API take it.

    Grammar::

        None | "builtin" | "builtin:enwiki-sample"   the built-in corpus
        PATH.jsonl | PATH.ndjson                      JSONL, text in the field "text"
        PATH.jsonl#FIELD                              JSONL, text in FIELD
        PATH                                          any other existing file: one UTF-8 text document
        hf:DATASET[@REVISION][/CONFIG][:SPLIT][#FIELD]
                                                      a Hugging Face dataset (needs `datasets` and
                                                      the hub); SPLIT defaults to "train", FIELD to
                                                      "text"

    ``DATASET`` is ``name`` or ``owner/name``. Without ``@REVISION``, a config follows a
    namespaced id as a third part (``hf:Salesforce/wikitext/wikitext-2-raw-v1:test``); a
    non-namespaced id takes its config after a revision (``hf:wikitext@main/wikitext-2-raw-v1:test``),
    since ``hf:name/x`` means the dataset ``name/x``. ``~`` in paths is expanded.

    Args:
        spec: the source string, or ``None`` for the built-in corpus.

    Returns:
        The parsed :class:`TextSource`.

    Raises:
        CalibrationError: (field ``calibration``) on a malformed string or a file that does not
            exist.
    """
    if spec is None:
        return TextSource(kind="builtin")
    spec = spec.strip()
    if not spec:
        raise _bad_spec(spec, "empty")
    if spec in _BUILTIN_SPECS:
        return TextSource(kind="builtin")
    if spec.startswith("hf:"):
        return _parse_hub(spec)

    path_str, text_field = spec, "text"
    base, hash_sign, after = spec.rpartition("#")
    if hash_sign and base.lower().endswith(_JSONL_SUFFIXES):
        if not after.strip():
            raise _bad_spec(spec, "empty JSONL field after '#'")
        path_str, text_field = base, after.strip()
    path = Path(path_str).expanduser()
    if not path.is_file():
        why = "is a directory, not a file" if path.is_dir() else "no such file"
        raise CalibrationError(f"calibration source {path_str!r}: {why}", field="calibration")
    if path.suffix.lower() in _JSONL_SUFFIXES:
        return TextSource(kind="jsonl", path=str(path), text_field=text_field)
    return TextSource(kind="text", path=str(path))


def _read_text_file(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CalibrationError(f"cannot read {path}: {exc.strerror}", field="calibration") from exc
    # Text never holds NUL bytes; many binary formats happen to decode as UTF-8 in places.
    if b"\x00" in data:
        raise CalibrationError(f"{path} looks like a binary file, not UTF-8 text", field="calibration")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CalibrationError(
            f"{path} is not valid UTF-8 text (byte offset {exc.start})", field="calibration"
        ) from exc


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    texts: list[str] = []
    for number, line in enumerate(_read_text_file(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"{path} line {number}: invalid JSON ({exc.msg})", field="calibration") from exc
        if not isinstance(record, dict):
            raise CalibrationError(f"{path} line {number}: expected a JSON object", field="calibration")
        if text_field not in record:
            raise CalibrationError(
                f"{path} line {number}: no field {text_field!r} (fields: {', '.join(map(str, record))})",
                field="calibration",
            )
        value = record[text_field]
        if not isinstance(value, str):
            raise CalibrationError(
                f"{path} line {number}: field {text_field!r} is {type(value).__name__}, not a string",
                field="calibration",
            )
        texts.append(value)
    return texts


def _load_hub(source: TextSource) -> list[str]:
    try:
        import datasets  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise CalibrationError(
            "hub datasets need the `datasets` package: `pip install datasets` (or the `hub` extra), "
            "and a machine that reaches the Hugging Face hub",
            field="calibration",
        ) from None
    try:
        data = datasets.load_dataset(source.dataset, source.config, split=source.split, revision=source.revision)
    except Exception as exc:  # network, auth, unknown config: the caller needs one error
        raise CalibrationError(
            f"could not load hub dataset {source.dataset!r} (config {source.config!r}, split {source.split!r}): {exc}",
            field="calibration",
        ) from exc
    columns = list(getattr(data, "column_names", None) or [])
    if source.text_field not in columns:
        raise CalibrationError(
            f"hub dataset {source.dataset!r} has no column {source.text_field!r} (columns: {', '.join(columns)})",
            field="calibration",
        )
    return [str(text) for text in data[source.text_field] if text is not None]


def load_texts(source: TextSource, role: Role = "calibration") -> list[str]:
    """Load the documents of a text source.

    Args:
        source: where the text comes from (see :func:`parse_source`).
        role: for the built-in corpus, which split: ``"calibration"`` or the held-out
            ``"evaluation"`` articles. Other sources return the same documents for both roles (the
            caller holds out part of them, e.g. :func:`build_calibration`'s validation slice).

    Returns:
        The non-empty documents, in source order: one per built-in article, the whole file for a
        text file, one per JSONL line, one per hub dataset row.

    Raises:
        CalibrationError: (field ``calibration``) on a missing or unreadable file, a binary or
            non-UTF-8 file, a JSONL line without the field, a hub failure, or no text at all.
    """
    if source.kind == "builtin":
        corpus = builtin_corpus()
        texts = corpus.evaluation if role == "evaluation" else corpus.calibration
        texts = list(texts)
    elif source.kind in ("text", "jsonl"):
        if not source.path:
            raise CalibrationError(f"a {source.kind} source needs a path", field="calibration")
        path = Path(source.path)
        if not path.is_file():
            raise CalibrationError(f"calibration source {source.path!r}: no such file", field="calibration")
        texts = [_read_text_file(path)] if source.kind == "text" else _read_jsonl(path, source.text_field)
    elif source.kind == "hub":
        if not source.dataset:
            raise CalibrationError("a hub source needs a dataset id", field="calibration")
        texts = _load_hub(source)
    else:
        raise CalibrationError(f"unknown calibration source kind {source.kind!r}", field="calibration")
    texts = [text for text in texts if text.strip()]
    if not texts:
        raise CalibrationError(f"the {source.kind} calibration source holds no text", field="calibration")
    return texts


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
    """

    capture: TokenWindows
    validation: TokenWindows
    text_sha256: str
    num_stream_tokens: int


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
        raise CalibrationError(f"num_samples must be at least 1, got {num_samples}", field="num_samples")
    if isinstance(seq_len, bool) or seq_len < 2:
        raise CalibrationError(f"seq_len must be at least 2, got {seq_len}", field="seq_len")
    if max_windows is not None and max_windows < 1:
        raise CalibrationError(f"max_windows must be at least 1, got {max_windows}", field="max_windows")


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
            field="chat_template",
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise CalibrationError("the tokenizer has neither a pad nor an eos token to pad with", field="chat_template")
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

    Returns:
        The capture and validation windows with the text's hash and the stream's length.

    Raises:
        CalibrationError: with ``field`` ``num_samples`` or ``seq_len`` when the values are out of
            range or the text is too short (the message says how many tokens there are and how many
            windows fit), ``validation_fraction`` / ``max_validation_windows`` when out of range, and
            ``chat_template`` when the tokenizer has no template.
    """
    _check_sizes(seq_len=seq_len, num_samples=num_samples)
    if not 0.0 <= validation_fraction < 1.0:
        raise CalibrationError(
            f"validation_fraction must be in [0, 1), got {validation_fraction}", field="validation_fraction"
        )
    if max_validation_windows < 0:
        raise CalibrationError(
            f"max_validation_windows must be at least 0, got {max_validation_windows}",
            field="max_validation_windows",
        )
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
        field_at_fault = "seq_len" if slots == 0 else "num_samples"
        raise CalibrationError(
            f"the calibration text has {total} tokens; after holding out {held_out} for validation, "
            f"{available} remain, which fit {slots} non-overlapping windows of seq_len={seq_len}, "
            f"but num_samples={num_samples} were asked: give more text, fewer samples or a shorter seq_len",
            field=field_at_fault,
        )

    # Uniform over non-overlapping placements: choose sorted distinct q_i in [0, available - M*T + M)
    # and shift window i by i*(T-1), which leaves at least T between consecutive starts.
    rng = np.random.default_rng(seed)
    population = available - num_samples * seq_len + num_samples
    picks = np.sort(rng.choice(population, size=num_samples, replace=False))
    starts = [int(q) + i * (seq_len - 1) for i, q in enumerate(picks)]
    capture_ids = torch.stack([stream[s : s + seq_len] for s in starts]).clone()
    capture = TokenWindows(input_ids=capture_ids, attention_mask=torch.ones_like(capture_ids), starts=tuple(starts))
    if chat_template:
        capture = _chat_wrap(tokenizer, capture, seq_len)

    n_validation = min(held_out // seq_len, max_validation_windows) if validation_fraction > 0 else 0
    validation = _consecutive_windows(stream, available, seq_len, n_validation)
    return CalibrationData(
        capture=capture,
        validation=validation,
        text_sha256=texts_sha256(texts),
        num_stream_tokens=total,
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
        CalibrationError: (field ``seq_len``) when the text is too short for one window or
            ``seq_len`` < 2; (field ``max_windows``) when ``max_windows`` < 1.
    """
    _check_sizes(seq_len=seq_len, max_windows=max_windows)
    # The windows are the stream's first ones: only that prefix needs tokenizing.
    needed = None if max_windows is None else max_windows * seq_len
    stream = tokenize_stream(tokenizer, texts, min_tokens=needed)
    count = int(stream.numel()) // seq_len
    if count == 0:
        raise CalibrationError(
            f"the evaluation text has {int(stream.numel())} tokens, fewer than one window of seq_len={seq_len}",
            field="seq_len",
        )
    if max_windows is not None:
        count = min(count, max_windows)
    return _consecutive_windows(stream, 0, seq_len, count)
