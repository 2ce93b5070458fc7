"""The offline assets: packaged files, the built-in corpus and the demo model conversion."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import pytest

from lorp import assets
from lorp.assets import corpus as corpus_module
from lorp.assets import demo_model
from lorp.assets.cache import remembered_sha256
from lorp.errors import CalibrationError, ModelLoadError

# --- packaged files --------------------------------------------------------------------------------


def test_distribution_files_found() -> None:
    gguf = assets.demo_gguf_path()
    assert gguf.is_file() and gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert gguf.stat().st_size > 50_000_000
    dump = assets.corpus_bz2_path()
    assert dump.is_file() and dump.name.endswith("-shortened.bz2")


def test_distribution_missing() -> None:
    with pytest.raises(ModelLoadError, match="make setup") as info:
        assets.distribution_file("no-such-distribution-lorp", "x.gguf")
    assert info.value.field == "model.id"
    with pytest.raises(CalibrationError, match="make setup") as cal_info:
        assets.distribution_file("gensim", "no/such/file.bz2", error=CalibrationError, field="calibration.dataset")
    assert cal_info.value.field == "calibration.dataset"


def test_cache_dir_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "nested" / "cache"
    monkeypatch.setenv("LORP_CACHE_DIR", str(target))
    assert assets.cache_dir() == target and target.is_dir()


def test_texts_sha256_counts_boundaries() -> None:
    assert assets.texts_sha256(["ab", "c"]) != assets.texts_sha256(["a", "bc"])
    assert assets.texts_sha256(["ab", "c"]) == assets.texts_sha256(["ab", "c"])


# --- the markup stripper ---------------------------------------------------------------------------

_SNIPPET = """{{Infobox person
| name = Ada {{small|(writer)}}
| image = Ada.jpg
}}
'''Ada Example''' (born 1815<ref>{{cite book|title=Lives|year=1900}}</ref>) was an [[England|English]] \
[[mathematician]]s and ''writer''.<ref name="b" /> See [http://example.org the archive] or \
[http://example.org/bare].<!-- hidden note -->&nbsp;She wrote&mdash;a lot.

[[File:Ada.jpg|thumb|left|Ada with [[Charles Babbage|Babbage]] in 1840]]
== Early life ==
{| class="wikitable"
|-
! Year !! Event {{efn|nested {{small|template}}}}
|-
| 1815 || Born
|}
* She studied <b>mathematics</b> with <span style="color:red">tutors</span>.
# Numbered item.

=== Work ===
Her notes<ref>Note with [[link]].</ref> described the [[Analytical Engine#Design|engine]].


<math>x^2</math>Done.

== References ==
{{reflist}}
* Smith, J. ''A life''.

== Legacy ==
Remembered.
[[Category:Mathematicians]]
[[de:Ada Example]]
"""


def test_strip_wiki_markup_snippet() -> None:
    text = assets.strip_wiki_markup(_SNIPPET)
    assert text.startswith("Ada Example (born 1815) was an English mathematicians and writer.")
    assert "See the archive or ." in text or "See the archive or." in text
    assert "She wrote—a lot." in text and "\xa0" not in text
    assert "\nEarly life\n" in text and "\nWork\n" in text and "\nLegacy\n" in text
    assert "She studied mathematics with tutors." in text
    assert "Numbered item." in text
    assert "Her notes described the engine." in text
    assert text.endswith("Remembered.")
    for gone in ("{{", "}}", "[[", "]]", "<ref", "'''", "''", "<", "==", "thumb", "Babbage", "Infobox",
                 "hidden note", "wikitable", "Category", "Ada Example]", "Smith", "x^2", "1900", "http",
                 "References", "de:"):  # fmt: skip
        assert gone not in text, gone
    assert "\n\n\n" not in text


def test_strip_wiki_markup_unbalanced_is_safe() -> None:
    text = assets.strip_wiki_markup("Before {{unclosed template\nAfter ]] and [[dangling.")
    assert "Before" in text and "After" in text
    assert "{{" not in text and "[[" not in text and "]]" not in text


# --- the built-in corpus ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("corpus-cache")


@pytest.fixture(scope="module")
def corpus(corpus_cache: Path) -> assets.Corpus:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORP_CACHE_DIR", str(corpus_cache))
        return assets.builtin_corpus()


def test_corpus_size_and_split(corpus: assets.Corpus) -> None:
    n_cal, n_eval = len(corpus.calibration), len(corpus.evaluation)
    assert corpus.name == "builtin:enwiki-sample"
    assert n_cal + n_eval >= 100
    assert abs(n_eval - (n_cal + n_eval) / 5) <= 1
    words = sum(len(t.split()) for t in corpus.calibration + corpus.evaluation)
    assert words >= 300_000
    # Disjoint by article: no article text is in both splits, and every text is a distinct article.
    assert not set(corpus.calibration) & set(corpus.evaluation)
    assert len(set(corpus.calibration)) == n_cal and len(set(corpus.evaluation)) == n_eval
    assert all(len(t.split()) >= 50 for t in corpus.calibration + corpus.evaluation)


def test_corpus_has_no_markup(corpus: assets.Corpus) -> None:
    for text in corpus.calibration + corpus.evaluation:
        for markup in ("{{", "}}", "[[", "]]", "<ref", "'''", "&nbsp;", "{|", "\n\n\n"):
            assert markup not in text, markup
    first = corpus.calibration[0]
    assert first.startswith("Anarchism is a political philosophy")


def test_corpus_deterministic_and_cached(
    corpus: assets.Corpus, corpus_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fresh cache parses again and must give the very same corpus.
    monkeypatch.setenv("LORP_CACHE_DIR", str(tmp_path))
    again = assets.builtin_corpus()
    assert again.sha256 == corpus.sha256
    assert again.calibration == corpus.calibration and again.evaluation == corpus.evaluation

    # The first cache is now reused without parsing.
    monkeypatch.setenv("LORP_CACHE_DIR", str(corpus_cache))
    files = list((corpus_cache / "corpus").glob("enwiki-sample-*.json"))
    assert len(files) == 1

    def boom(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the cached corpus should not be parsed again")

    monkeypatch.setattr(corpus_module, "_parse_dump", boom)
    started = time.perf_counter()
    cached = assets.builtin_corpus()
    assert time.perf_counter() - started < 1.0
    assert cached == corpus


def test_corrupt_corpus_cache_is_rebuilt(corpus: assets.Corpus, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LORP_CACHE_DIR", str(tmp_path))
    assets.builtin_corpus()
    (cache_file,) = (tmp_path / "corpus").glob("enwiki-sample-*.json")
    data = json.loads(cache_file.read_text(encoding="utf-8"))
    data["evaluation"] = data["evaluation"][:-1]
    cache_file.write_text(json.dumps(data), encoding="utf-8")
    assert assets.builtin_corpus() == corpus
    cache_file.write_text("{truncated", encoding="utf-8")
    assert assets.builtin_corpus() == corpus


# --- demo model conversion (logic, with a fake converter) ------------------------------------------


@pytest.fixture
def fake_conversion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """A tiny fake GGUF and a converter that writes one file and counts its calls."""
    gguf = tmp_path / "src" / "Fake-Model.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF fake weights")
    monkeypatch.setenv("LORP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(demo_model, "demo_gguf_path", lambda: gguf)
    calls = {"n": 0}

    def convert(src: Path, out_dir: Path) -> None:
        calls["n"] += 1
        time.sleep(0.2)  # long enough for a concurrent caller to wait on the lock
        (out_dir / "config.json").write_text('{"num_hidden_layers": 30}', encoding="utf-8")

    monkeypatch.setattr(demo_model, "_convert_gguf", convert)
    return calls


def test_demo_dir_converts_once(fake_conversion: dict[str, int], tmp_path: Path) -> None:
    lines: list[str] = []
    first = assets.demo_model_dir(progress=lines.append)
    assert first.parent == tmp_path / "cache" / "models"
    digest = assets.file_sha256(tmp_path / "src" / "Fake-Model.Q4_1.gguf")
    assert first.name == f"Fake-Model.Q4_1-{digest[:12]}"
    assert (first / "config.json").is_file()
    marker = json.loads((first / ".lorp-complete").read_text(encoding="utf-8"))
    assert marker["source_sha256"] == digest
    assert lines and "converting" in lines[0]
    assert assets.demo_model_dir() == first
    assert fake_conversion["n"] == 1
    assert not list(first.parent.glob(".*.tmp-*"))


def test_demo_dir_half_written_is_redone(fake_conversion: dict[str, int], tmp_path: Path) -> None:
    digest = assets.file_sha256(tmp_path / "src" / "Fake-Model.Q4_1.gguf")
    models = tmp_path / "cache" / "models"
    target = models / f"Fake-Model.Q4_1-{digest[:12]}"
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"half")  # no marker: a crashed conversion
    stale = models / f".{target.name}.tmp-dead"
    stale.mkdir()
    (stale / "config.json").write_text("{}", encoding="utf-8")

    result = assets.demo_model_dir()
    assert result == target and fake_conversion["n"] == 1
    assert (target / ".lorp-complete").is_file()
    assert not (target / "model.safetensors").exists()
    assert not stale.exists()


def test_demo_dir_old_layout_is_redone(fake_conversion: dict[str, int]) -> None:
    first = assets.demo_model_dir()
    (first / ".lorp-complete").write_text('{"format_version": 0}', encoding="utf-8")
    assert assets.demo_model_dir() == first
    assert fake_conversion["n"] == 2


def test_demo_dir_failed_conversion_leaves_nothing(
    fake_conversion: dict[str, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(src: Path, out_dir: Path) -> None:
        (out_dir / "partial").write_text("x", encoding="utf-8")
        raise ModelLoadError("boom", field="model")

    monkeypatch.setattr(demo_model, "_convert_gguf", failing)
    with pytest.raises(ModelLoadError, match="boom"):
        assets.demo_model_dir()
    models = tmp_path / "cache" / "models"
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []


def test_demo_dir_concurrent_callers_convert_once(fake_conversion: dict[str, int]) -> None:
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(assets.demo_model_dir())) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 3 and len(set(results)) == 1
    assert fake_conversion["n"] == 1


# --- the real demo model ---------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_model_dir_real() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.demo_model_dir()
    assert (path / ".lorp-complete").is_file()
    assert (path / "model.safetensors").is_file()
    assert (path / "generation_config.json").is_file()
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    assert config["num_hidden_layers"] == 30
    assert "quantization_config" not in config

    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.num_hidden_layers == 30 and len(model.model.layers) == 30
    assert model.dtype == torch.float32
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.eos_token_id is not None and tokenizer.chat_template
    assert tokenizer.model_max_length == config["max_position_embeddings"]
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])

    started = time.perf_counter()
    assert assets.demo_model_dir() == path
    assert time.perf_counter() - started < 3.0


def test_a_files_hash_is_remembered_per_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORP_CACHE_DIR", str(tmp_path / "cache"))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * 4096)
    first = remembered_sha256(weights)
    assert first == hashlib.sha256(b"a" * 4096).hexdigest()

    # The same version (path, size, mtime, inode) is not read again: rewritten in place with its
    # modification time put back, it still answers the remembered hash.
    stat = weights.stat()
    with weights.open("r+b") as fh:
        fh.write(b"b" * 4096)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert remembered_sha256(weights) == first

    # A new version (a copy put in its place) is hashed again.
    replacement = tmp_path / "new.safetensors"
    replacement.write_bytes(b"c" * 4096)
    replacement.replace(weights)
    assert remembered_sha256(weights) == hashlib.sha256(b"c" * 4096).hexdigest()
    # A cache entry that is not a hash is ignored, not trusted.
    for entry in (tmp_path / "cache" / "sha256").iterdir():
        entry.write_text("garbage")
    assert remembered_sha256(weights) == hashlib.sha256(b"c" * 4096).hexdigest()
