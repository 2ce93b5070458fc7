"""JSON from clients: parsed with a bound on nesting, and checked for text no database can store.

Python's parser recurses once per nesting level: a line of 100,000 ``[`` raises ``RecursionError``, an
error no caller expects from a parse. ``loads`` refuses anything nested deeper than ``MAX_JSON_DEPTH``
before parsing, with a message that says so.

Postgres text and JSONB cannot hold NUL (U+0000), and no UTF-8 encoder takes an unpaired UTF-16
surrogate (the JSON escape ``"\\ud800"`` decodes to one): a string holding either is accepted by the
parser and by pydantic and fails only when written, as a server error. ``unstorable`` finds them (and
numbers too large to be finite), anywhere in a parsed value, with the path of each.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from itertools import accumulate
from typing import Any

MAX_JSON_DEPTH = 100
JsonPath = tuple[str | int, ...]

_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
# A JSON string, escapes included (unrolled so a long string costs one pass); its brackets do not nest.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


class JsonRefused(ValueError):
    """The text is refused before or while parsing (too deep, or a non-JSON constant); not a syntax error."""


def nesting_depth(text: str) -> int:
    """How deeply ``text`` nests arrays and objects (brackets inside strings do not count)."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0)


def check_depth(text: str, limit: int = MAX_JSON_DEPTH) -> None:
    """Raise ``JsonRefused`` when ``text`` nests deeper than ``limit``."""
    # Text with no more opening brackets than the limit cannot nest deeper: the common case costs two counts.
    if text.count("[") + text.count("{") > limit and nesting_depth(text) > limit:
        raise JsonRefused(f"the JSON nests deeper than {limit} levels of arrays and objects")


def _no_constant(name: str) -> Any:
    raise JsonRefused(f"{name} is not a JSON number (RFC 8259 has no NaN or Infinity)")


def loads(data: str | bytes, *, max_depth: int = MAX_JSON_DEPTH, constants: bool = True) -> Any:
    """``json.loads`` that first refuses nesting deeper than ``max_depth``; ``constants=False`` also
    refuses the NaN, Infinity and -Infinity that Python's parser accepts and JSON does not have.

    Raises ``JsonRefused`` for those, ``json.JSONDecodeError`` for text that is not JSON, and
    ``UnicodeDecodeError`` for bytes in no JSON encoding.
    """
    text = data.decode(json.detect_encoding(data), "surrogatepass") if isinstance(data, bytes) else data
    check_depth(text, max_depth)
    if constants:
        return json.loads(text)
    return json.loads(text, parse_constant=_no_constant)


def escape_unstorable(text: str) -> str:
    """``text`` with each NUL and unpaired surrogate written as its ``\\uXXXX`` escape (safe to show and store)."""
    return _UNSTORABLE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def text_problem(text: str) -> str | None:
    """Why ``text`` cannot be stored (its first NUL or unpaired surrogate), or None when it can."""
    found = _UNSTORABLE.search(text)
    if found is None:
        return None
    if found.group() == "\x00":
        return "must not contain NUL (U+0000) characters"
    return f"holds an unpaired UTF-16 surrogate (\\u{ord(found.group()):04x}), which is not Unicode text"


def unstorable(value: Any, limit: int = 20) -> list[tuple[JsonPath, str]]:
    """Each place in a parsed JSON value that no database can store, as (path, why), at most ``limit``.

    A path is the keys and indexes from the root (``("evaluation", "prompts", 0)``); a key that is itself
    unstorable appears escaped (``escape_unstorable``), so the path can be shown.
    """
    found: list[tuple[JsonPath, str]] = []
    for path, problem in _walk(value):
        found.append((path, problem))
        if len(found) >= limit:
            break
    return found


def _walk(value: Any) -> Iterator[tuple[JsonPath, str]]:
    # Iterative: the value may be as deep as loads allowed, and a recursion per level is what loads avoids.
    stack: list[tuple[JsonPath, Any]] = [((), value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            problem = text_problem(item)
            if problem is not None:
                yield path, problem
        elif isinstance(item, float) and not math.isfinite(item):
            yield path, "must be a finite number"
        elif isinstance(item, dict):
            children: list[tuple[JsonPath, Any]] = []
            for key, child in item.items():
                name = escape_unstorable(key) if isinstance(key, str) else key
                if isinstance(key, str) and (problem := text_problem(key)) is not None:
                    yield (*path, name), f"the field name {problem}"
                children.append(((*path, name), child))
            stack.extend(reversed(children))
        elif isinstance(item, list):
            stack.extend(((*path, index), child) for index, child in reversed(list(enumerate(item))))
