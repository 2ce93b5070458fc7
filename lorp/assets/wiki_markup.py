"""Plain prose from MediaWiki source text (the built-in corpus is a Wikipedia dump)."""

from __future__ import annotations

import html
import re
from collections.abc import Callable

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
