"""Text sources and token windows (lorp.calibration), on the tiny in-memory tokenizer."""

from __future__ import annotations

import copy
import itertools
import json
import random
from pathlib import Path

import pytest
import torch

from lorp.calibration import (
    TextSource,
    build_calibration,
    evaluation_windows,
    load_texts,
    parse_source,
    tokenize_stream,
)
from lorp.calibration import sources as calibration_sources
from lorp.errors import CalibrationError

_WORDS = [
    *str.split("the quick brown fox jumps over lazy dog depth pruning removes whole decoder blocks"),
    *str.split("from a language model similarity between hidden states decays with distance phases"),
]


def _texts(n_docs: int = 6, words_per_doc: int = 900, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(words_per_doc)) + "." for _ in range(n_docs)]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return _texts()


# --- parse_source ----------------------------------------------------------------------------------


def test_parse_builtin() -> None:
    assert parse_source(None) == TextSource(kind="builtin")
    assert parse_source("builtin") == TextSource(kind="builtin")
    assert parse_source("builtin:enwiki-sample").kind == "builtin"


def test_parse_files(tmp_path: Path) -> None:
    txt = tmp_path / "doc.txt"
    txt.write_text("hello", encoding="utf-8")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"text": "a"}\n', encoding="utf-8")
    assert parse_source(str(txt)) == TextSource(kind="text", path=str(txt))
    assert parse_source(str(jsonl)) == TextSource(kind="jsonl", path=str(jsonl), text_field="text")
    assert parse_source(f"{jsonl}#body") == TextSource(kind="jsonl", path=str(jsonl), text_field="body")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("hf:c4", TextSource(kind="hub", dataset="c4")),
        (
            "hf:allenai/c4:validation#text",
            TextSource(kind="hub", dataset="allenai/c4", split="validation"),
        ),
        (
            "hf:Salesforce/wikitext/wikitext-2-raw-v1:test",
            TextSource(kind="hub", dataset="Salesforce/wikitext", config="wikitext-2-raw-v1", split="test"),
        ),
        (
            "hf:wikitext@main/wikitext-2-raw-v1:train[:1000]#page",
            TextSource(
                kind="hub",
                dataset="wikitext",
                revision="main",
                config="wikitext-2-raw-v1",
                split="train[:1000]",
                text_field="page",
            ),
        ),
        (
            "hf:ptb-text-only/ptb_text_only@abc123:test#sentence",
            TextSource(
                kind="hub",
                dataset="ptb-text-only/ptb_text_only",
                revision="abc123",
                split="test",
                text_field="sentence",
            ),
        ),
    ],
)
def test_parse_hub(spec: str, expected: TextSource) -> None:
    assert parse_source(spec) == expected


@pytest.mark.parametrize(
    "spec",
    ["", "  ", "hf:", "hf::train", "hf:c4:", "hf:c4#", "hf:a/b/c/d", "hf:c4@", "hf:c4@rev/", "hf:/x"],
)
def test_parse_malformed(spec: str) -> None:
    with pytest.raises(CalibrationError) as info:
        parse_source(spec)
    assert info.value.field == "calibration.dataset"


def test_parse_missing_file(tmp_path: Path) -> None:
    for spec in (str(tmp_path / "nope.txt"), f"{tmp_path / 'nope.jsonl'}#text", str(tmp_path)):
        with pytest.raises(CalibrationError) as info:
            parse_source(spec)
        assert info.value.field == "calibration.dataset"


def test_parse_jsonl_empty_field(tmp_path: Path) -> None:
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("{}\n", encoding="utf-8")
    with pytest.raises(CalibrationError):
        parse_source(f"{jsonl}#")


# --- load_texts ------------------------------------------------------------------------------------


def test_load_text_file(tmp_path: Path) -> None:
    path = tmp_path / "doc.txt"
    path.write_text("\ufeffLine one.\nLine two, café.\n", encoding="utf-8")
    assert load_texts(parse_source(str(path))) == ["Line one.\nLine two, café.\n"]


def test_load_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    rows = [{"body": "first doc", "id": 1}, {"body": "   "}, {"body": "second doc"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert load_texts(parse_source(f"{path}#body")) == ["first doc", "second doc"]


def test_load_jsonl_missing_field(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "ok"}\n{"content": "no text"}\n', encoding="utf-8")
    with pytest.raises(CalibrationError) as info:
        load_texts(parse_source(str(path)))
    assert "'text'" in info.value.message and "line 2" in info.value.message
    assert info.value.field == "calibration.dataset"


def test_load_jsonl_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    for content, needle in (
        ("{not json\n", "invalid JSON"),
        ("[1, 2]\n", "JSON object"),
        ('{"text": 3}\n', "int"),
        ("[" * 100_000 + "]" * 100_000 + "\n", "nests too deeply"),
    ):
        path.write_text(content, encoding="utf-8")
        with pytest.raises(CalibrationError, match=needle):
            load_texts(TextSource(kind="jsonl", path=str(path)))


@pytest.mark.parametrize("content", ["", "   \n\t\n"])
def test_load_empty_text(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(CalibrationError, match="no text"):
        load_texts(parse_source(str(path)))


def test_load_empty_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text('{"text": ""}\n', encoding="utf-8")
    with pytest.raises(CalibrationError, match="no text"):
        load_texts(parse_source(str(path)))


@pytest.mark.parametrize("payload", [b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", b"caf\xe9 latin-1 text"])
def test_load_binary_or_undecodable(tmp_path: Path, payload: bytes) -> None:
    path = tmp_path / "blob.txt"
    path.write_bytes(payload)
    with pytest.raises(CalibrationError) as info:
        load_texts(parse_source(str(path)))
    assert info.value.field == "calibration.dataset"


def test_load_file_vanished(tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match="no such file"):
        load_texts(TextSource(kind="text", path=str(tmp_path / "gone.txt")))


def test_load_hub_without_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def fake_import(name: str, *args: object, **kwargs: object) -> object:
        if name == "datasets":
            raise ImportError("no datasets here")
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(CalibrationError, match="pip install datasets"):
        load_texts(parse_source("hf:allenai/c4:train"))


def test_load_builtin_roles(monkeypatch: pytest.MonkeyPatch) -> None:
    from lorp.assets import Corpus

    fake = Corpus(name="builtin:enwiki-sample", calibration=["cal a", " "], evaluation=["eval b"], sha256="x")
    monkeypatch.setattr(calibration_sources, "builtin_corpus", lambda: fake)
    assert load_texts(parse_source(None)) == ["cal a"]
    assert load_texts(parse_source("builtin"), role="evaluation") == ["eval b"]


# --- token stream and windows ----------------------------------------------------------------------


def test_tokenize_stream_joins_with_eos(tiny_tokenizer) -> None:
    docs = ["The quick brown fox.", "Depth pruning."]
    stream = tokenize_stream(tiny_tokenizer, docs)
    first = tiny_tokenizer(docs[0], add_special_tokens=False)["input_ids"]
    second = tiny_tokenizer(docs[1], add_special_tokens=False)["input_ids"]
    assert stream.dtype == torch.int64 and stream.dim() == 1
    assert stream.tolist() == [*first, tiny_tokenizer.eos_token_id, *second]
    assert tokenize_stream(tiny_tokenizer, []).numel() == 0


def test_tokenize_stream_prefix_stops_early(tiny_tokenizer, texts: list[str]) -> None:
    """With min_tokens the stream is a prefix of the whole one, long enough, and not the whole."""
    whole = tokenize_stream(tiny_tokenizer, texts)
    first_doc = len(tiny_tokenizer(texts[0], add_special_tokens=False)["input_ids"])
    prefix = tokenize_stream(tiny_tokenizer, texts, min_tokens=first_doc)
    assert first_doc <= prefix.numel() < whole.numel()
    assert torch.equal(prefix, whole[: prefix.numel()])
    # More than there is: everything.
    assert torch.equal(tokenize_stream(tiny_tokenizer, texts, min_tokens=whole.numel() + 1), whole)


def test_capture_and_validation_shapes(tiny_tokenizer, texts: list[str]) -> None:
    data = build_calibration(tiny_tokenizer, texts, num_samples=8, seq_len=64, max_validation_windows=4)
    stream = tokenize_stream(tiny_tokenizer, texts)
    assert data.num_stream_tokens == stream.numel()
    assert data.capture.input_ids.shape == (8, 64) and data.capture.input_ids.dtype == torch.int64
    assert data.capture.attention_mask.dtype == torch.int64
    assert bool((data.capture.attention_mask == 1).all())
    assert data.capture.num_tokens == 8 * 64
    assert data.validation.input_ids.shape == (4, 64)
    assert data.validation.num_tokens == 4 * 64
    assert len(data.text_sha256) == 64
    for windows in (data.capture, data.validation):
        for row, start in zip(windows.input_ids, windows.starts, strict=True):
            assert torch.equal(row, stream[start : start + 64])


def test_windows_non_overlapping_and_disjoint(tiny_tokenizer, texts: list[str]) -> None:
    seq_len = 50
    total = tokenize_stream(tiny_tokenizer, texts).numel()
    for seed in range(5):
        data = build_calibration(tiny_tokenizer, texts, num_samples=20, seq_len=seq_len, seed=seed)
        starts = list(data.capture.starts)
        assert starts == sorted(starts)
        assert all(b - a >= seq_len for a, b in itertools.pairwise(starts))
        validation_start = data.validation.starts[0]
        assert validation_start >= total - int(total * 0.1)
        assert starts[-1] + seq_len <= validation_start
        val = list(data.validation.starts)
        assert val == [validation_start + i * seq_len for i in range(len(val))]


def test_training_windows_extend_the_capture_with_unseen_text(tiny_tokenizer, texts: list[str]) -> None:
    seq_len = 40
    stream = tokenize_stream(tiny_tokenizer, texts)
    plain = build_calibration(tiny_tokenizer, texts, num_samples=6, seq_len=seq_len, seed=2)
    assert plain.training is None and plain.training_windows is plain.capture
    assert build_calibration(tiny_tokenizer, texts, num_samples=6, seq_len=seq_len, num_training=6).training is None

    data = build_calibration(tiny_tokenizer, texts, num_samples=6, seq_len=seq_len, seed=2, num_training=20)
    training = data.training_windows
    assert torch.equal(data.capture.input_ids, plain.capture.input_ids)  # the capture does not change
    assert training.input_ids.shape == (20, seq_len) and bool((training.attention_mask == 1).all())
    assert training.starts[:6] == data.capture.starts and torch.equal(training.input_ids[:6], data.capture.input_ids)
    everything = sorted([*training.starts, *data.validation.starts])
    assert all(b - a >= seq_len for a, b in itertools.pairwise(everything))  # no window overlaps another
    for row, start in zip(training.input_ids, training.starts, strict=True):
        assert torch.equal(row, stream[start : start + seq_len])
    again = build_calibration(tiny_tokenizer, texts, num_samples=6, seq_len=seq_len, seed=2, num_training=20)
    assert again.training_windows.starts == training.starts
    other = build_calibration(tiny_tokenizer, texts, num_samples=6, seq_len=seq_len, seed=3, num_training=20)
    assert other.training_windows.starts[6:] != training.starts[6:]

    # Where the text runs out, every slot left between the capture windows, and no more.
    available = data.validation.starts[0]
    most = build_calibration(tiny_tokenizer, texts, num_samples=6, seq_len=seq_len, seed=2, num_training=10_000)
    gaps = [*data.capture.starts, available]
    free = sum((b - a - (seq_len if i else 0)) // seq_len for i, (a, b) in enumerate(itertools.pairwise([0, *gaps])))
    assert most.training_windows.num_windows == 6 + free < 10_000
    assert all(b - a >= seq_len for a, b in itertools.pairwise(sorted(most.training_windows.starts)))


def test_capture_deterministic_by_seed(tiny_tokenizer, texts: list[str]) -> None:
    kwargs = {"num_samples": 6, "seq_len": 32}
    a = build_calibration(tiny_tokenizer, texts, seed=3, **kwargs)
    b = build_calibration(tiny_tokenizer, texts, seed=3, **kwargs)
    c = build_calibration(tiny_tokenizer, texts, seed=4, **kwargs)
    assert torch.equal(a.capture.input_ids, b.capture.input_ids)
    assert a.capture.starts == b.capture.starts
    assert a.text_sha256 == b.text_sha256 == c.text_sha256
    assert a.capture.starts != c.capture.starts
    # The validation slice does not depend on the seed: plans are scored on the same text.
    assert torch.equal(a.validation.input_ids, c.validation.input_ids)


def test_capture_fills_exactly(tiny_tokenizer, texts: list[str]) -> None:
    total = tokenize_stream(tiny_tokenizer, texts).numel()
    seq_len = 40
    available = total - max(int(total * 0.1), seq_len)
    slots = available // seq_len
    data = build_calibration(tiny_tokenizer, texts, num_samples=slots, seq_len=seq_len)
    assert data.capture.input_ids.shape == (slots, seq_len)
    with pytest.raises(CalibrationError) as info:
        build_calibration(tiny_tokenizer, texts, num_samples=slots + 1, seq_len=seq_len)
    assert info.value.field == "calibration.num_samples"
    assert str(total) in info.value.message and f"fit {slots} " in info.value.message


def test_too_short_seq_len(tiny_tokenizer) -> None:
    with pytest.raises(CalibrationError) as info:
        build_calibration(tiny_tokenizer, ["a short text"], num_samples=1, seq_len=512)
    assert info.value.field == "calibration.seq_len"
    assert "fit 0 " in info.value.message


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_samples": 0, "seq_len": 16}, "calibration.num_samples"),
        ({"num_samples": 2, "seq_len": 1}, "calibration.seq_len"),
        ({"num_samples": 2, "seq_len": 16, "validation_fraction": 1.0}, "calibration.validation_fraction"),
        ({"num_samples": 2, "seq_len": 16, "validation_fraction": -0.1}, "calibration.validation_fraction"),
        ({"num_samples": 2, "seq_len": 16, "max_validation_windows": -1}, "calibration.validation_windows"),
    ],
)
def test_bad_arguments(tiny_tokenizer, texts: list[str], kwargs: dict, field: str) -> None:
    with pytest.raises(CalibrationError) as info:
        build_calibration(tiny_tokenizer, texts, **kwargs)
    assert info.value.field == field


def test_no_validation(tiny_tokenizer, texts: list[str]) -> None:
    data = build_calibration(tiny_tokenizer, texts, num_samples=4, seq_len=32, validation_fraction=0.0)
    assert data.validation.input_ids.shape == (0, 32)
    assert data.validation.num_tokens == 0


def test_small_text_still_gets_one_validation_window(tiny_tokenizer, texts: list[str]) -> None:
    total = tokenize_stream(tiny_tokenizer, texts[:1]).numel()
    seq_len = int(total * 0.1) + 10  # more than the 10% slice
    data = build_calibration(tiny_tokenizer, texts[:1], num_samples=1, seq_len=seq_len)
    assert data.validation.input_ids.shape == (1, seq_len)
    assert data.capture.starts[0] + seq_len <= data.validation.starts[0]


def test_chat_template_wraps_capture(tiny_tokenizer, texts: list[str]) -> None:
    data = build_calibration(tiny_tokenizer, texts, num_samples=3, seq_len=48, chat_template=True)
    plain = build_calibration(tiny_tokenizer, texts, num_samples=3, seq_len=48)
    assert data.capture.input_ids.shape == (3, 48)
    assert data.capture.starts == plain.capture.starts
    prefix = tiny_tokenizer("<|endoftext|>user: ", add_special_tokens=False)["input_ids"]
    for row in data.capture.input_ids.tolist():
        assert row[: len(prefix)] == prefix
    # Validation text is scored as plain text, never wrapped.
    assert torch.equal(data.validation.input_ids, plain.validation.input_ids)


def test_chat_template_pads_short_prompts(tiny_tokenizer, texts: list[str]) -> None:
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = "{{ messages[0]['content'][:12] }}"
    data = build_calibration(tok, texts, num_samples=4, seq_len=64, chat_template=True)
    ids, mask = data.capture.input_ids, data.capture.attention_mask
    assert ids.shape == mask.shape == (4, 64)
    for row_ids, row_mask in zip(ids.tolist(), mask.tolist(), strict=True):
        real = sum(row_mask)
        assert 0 < real < 64
        assert row_mask == [1] * real + [0] * (64 - real)  # right padding
        assert row_ids[real:] == [tok.pad_token_id] * (64 - real)
    assert data.capture.num_tokens == int(mask.sum())


def test_chat_template_pads_with_eos_without_pad(tiny_tokenizer, texts: list[str]) -> None:
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = "{{ messages[0]['content'][:12] }}"
    tok.pad_token = None
    assert tok.pad_token_id is None
    data = build_calibration(tok, texts, num_samples=2, seq_len=64, chat_template=True)
    padded = data.capture.input_ids[data.capture.attention_mask == 0]
    assert padded.numel() > 0 and bool((padded == tok.eos_token_id).all())


def test_chat_template_missing(tiny_tokenizer, texts: list[str]) -> None:
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    with pytest.raises(CalibrationError) as info:
        build_calibration(tok, texts, num_samples=2, seq_len=32, chat_template=True)
    assert info.value.field == "calibration.chat_template"


def test_evaluation_windows(tiny_tokenizer, texts: list[str]) -> None:
    stream = tokenize_stream(tiny_tokenizer, texts)
    windows = evaluation_windows(tiny_tokenizer, texts, seq_len=100)
    count = stream.numel() // 100
    assert windows.input_ids.shape == (count, 100)
    assert windows.starts == tuple(range(0, count * 100, 100))
    assert torch.equal(windows.input_ids.reshape(-1), stream[: count * 100])
    assert windows.num_tokens == count * 100
    first = evaluation_windows(tiny_tokenizer, texts, seq_len=100, max_windows=3)
    assert torch.equal(first.input_ids, windows.input_ids[:3])


def test_evaluation_windows_errors(tiny_tokenizer) -> None:
    with pytest.raises(CalibrationError) as info:
        evaluation_windows(tiny_tokenizer, ["tiny"], seq_len=64)
    assert info.value.field == "calibration.seq_len"
    with pytest.raises(CalibrationError) as info:
        evaluation_windows(tiny_tokenizer, ["tiny text"], seq_len=1)
    assert info.value.field == "calibration.seq_len"
    with pytest.raises(CalibrationError) as info:
        evaluation_windows(tiny_tokenizer, _texts(1), seq_len=4, max_windows=0)
    assert info.value.field == "evaluation.max_windows"
