"""The built-in English corpus: real Wikipedia articles, markup stripped, split by article.

About 4/5 of the articles calibrate, 1/5 are held out for evaluation; parsed once from the dump that
``gensim`` ships and cached as JSON under the cache folder.
"""

from __future__ import annotations

import bz2
import hashlib
import json
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lorp.assets.cache import cache_dir, source_sha256, texts_sha256
from lorp.assets.packaged import corpus_bz2_path
from lorp.assets.wiki_markup import strip_wiki_markup
from lorp.atomic import replacing
from lorp.errors import CalibrationError

CORPUS_NAME = "builtin:enwiki-sample"
# Bump whenever the markup stripper or the split changes: the cached JSON is keyed by it, so an old
# cache is never served for new code.
_CORPUS_FORMAT_VERSION = 1
_EVALUATION_SHARE = 5  # one article in five is held out for evaluation
_MIN_ARTICLE_WORDS = 50


@dataclass(frozen=True)
class Corpus:
    """A corpus of article texts split by article into calibration and held-out evaluation parts.

    Attributes:
        name: the corpus' reference, e.g. ``"builtin:enwiki-sample"``.
        calibration: article texts for calibration (about 4/5 of the articles).
        evaluation: held-out article texts (about 1/5), disjoint from ``calibration`` by article.
        sha256: hash of the stripped texts of both splits, stable across runs (provenance).
    """

    name: str
    calibration: list[str]
    evaluation: list[str]
    sha256: str


def _corpus_sha256(calibration: list[str], evaluation: list[str]) -> str:
    # Split names go into the hash so that moving an article between splits changes it.
    return texts_sha256(["calibration", *calibration, "evaluation", *evaluation])


def builtin_corpus() -> Corpus:
    """The built-in English corpus: real Wikipedia articles, markup stripped, split by article.

    Parsed from the ``gensim`` distribution's shortened enwiki dump on first use (about a second) and
    cached as JSON in ``cache_dir()/corpus/``, keyed by the dump's sha256 and the stripper's version.
    The split is deterministic: articles are ranked by the sha256 of their title and the first fifth
    is held out for evaluation.
    """
    bz2_path = corpus_bz2_path()
    digest = source_sha256(bz2_path)
    cache_file = cache_dir() / "corpus" / f"enwiki-sample-{digest[:16]}-v{_CORPUS_FORMAT_VERSION}.json"
    cached = _read_cached_corpus(cache_file)
    if cached is not None:
        return cached

    articles = [(title, text) for title, text in _parse_dump(bz2_path)]
    if not articles:
        raise CalibrationError(f"no usable article in {bz2_path}", field="calibration.dataset")
    ranked = sorted(articles, key=lambda item: hashlib.sha256(item[0].encode("utf-8")).hexdigest())
    n_eval = max(1, round(len(articles) / _EVALUATION_SHARE))
    held_out = {title for title, _ in ranked[:n_eval]}
    # Dump order within each split keeps related neighbouring articles together, as in the dump.
    calibration = [text for title, text in articles if title not in held_out]
    evaluation = [text for title, text in articles if title in held_out]
    corpus = Corpus(
        name=CORPUS_NAME,
        calibration=calibration,
        evaluation=evaluation,
        sha256=_corpus_sha256(calibration, evaluation),
    )
    _write_cached_corpus(cache_file, corpus, digest)
    return corpus


def _read_cached_corpus(path: Path) -> Corpus | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        calibration = [str(t) for t in data["calibration"]]
        evaluation = [str(t) for t in data["evaluation"]]
        sha = str(data["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    # A truncated or hand-edited cache must not silently change the corpus.
    if _corpus_sha256(calibration, evaluation) != sha:
        return None
    return Corpus(name=str(data.get("name", CORPUS_NAME)), calibration=calibration, evaluation=evaluation, sha256=sha)


def _write_cached_corpus(path: Path, corpus: Corpus, source_sha256: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "name": corpus.name,
        "source_sha256": source_sha256,
        "format_version": _CORPUS_FORMAT_VERSION,
        "sha256": corpus.sha256,
        "calibration": corpus.calibration,
        "evaluation": corpus.evaluation,
    }
    with replacing(path, encoding="utf-8") as fh:
        json.dump(payload, fh, ensure_ascii=False)


def _local(tag: str) -> str:
    """An element's tag without its XML namespace (the dump's namespace changes between versions)."""
    return tag.rsplit("}", 1)[-1]


def _parse_dump(path: Path) -> Iterator[tuple[str, str]]:
    """Yield (title, stripped text) for every main-namespace, non-redirect article of a dump."""
    with bz2.open(path, "rb") as fh:
        for _event, elem in ET.iterparse(fh, events=("end",)):
            if _local(elem.tag) != "page":
                continue
            title = ns = raw = None
            redirect = False
            for child in elem.iter():
                name = _local(child.tag)
                if name == "title":
                    title = child.text or ""
                elif name == "ns":
                    ns = (child.text or "").strip()
                elif name == "redirect":
                    redirect = True
                elif name == "text":
                    raw = child.text or ""
            elem.clear()
            if title is None or raw is None or ns != "0" or redirect:
                continue
            if raw.lstrip().upper().startswith("#REDIRECT"):
                continue
            text = strip_wiki_markup(raw)
            if len(text.split()) >= _MIN_ARTICLE_WORDS:
                yield title, text
