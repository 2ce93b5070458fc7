"""Object keys: slash-separated relative paths that are safe on every backend."""

from __future__ import annotations

import unicodedata

from lorp.atomic import PARTIAL_PREFIX

MAX_KEY_LENGTH = 1024  # S3's limit, in UTF-8 bytes; applied to the local backend too so keys stay portable
# Temp files of in-progress local writes carry this name prefix (the engine's, for every file written
# whole or not at all); keys may not use it, so a listing can tell them apart from objects.
TMP_MARK = PARTIAL_PREFIX


def key_problem(key: object) -> str | None:
    if not isinstance(key, str):
        return "not a string"
    if not key:
        return "empty"
    try:
        encoded = key.encode("utf-8")
    except UnicodeEncodeError:
        return "not valid UTF-8"
    if len(encoded) > MAX_KEY_LENGTH:
        return f"longer than {MAX_KEY_LENGTH} bytes"
    if any(unicodedata.category(c) == "Cc" for c in key):
        return "contains a NUL or control character"
    if key.startswith("/"):
        return "absolute (starts with '/')"
    if "\\" in key:
        return "contains a backslash"
    for segment in key.split("/"):
        if segment == "":
            return "has an empty segment ('//' or a trailing '/')"
        if segment in (".", ".."):
            return f"has a {segment!r} segment"
    return None


def validate_key(key: str) -> str:
    """Return `key` if it is a safe relative object key, else raise ValueError naming it."""
    problem = key_problem(key)
    if problem is not None:
        raise ValueError(f"invalid storage key {key!r}: {problem}")
    return key


def validate_prefix(prefix: str, *, allow_empty: bool) -> str:
    # A prefix names a folder: "a/b" and "a/b/" are the same, and "" (when allowed) means everything.
    if not isinstance(prefix, str):
        raise ValueError(f"invalid storage prefix {prefix!r}: not a string")
    stripped = prefix[:-1] if prefix.endswith("/") else prefix
    if not stripped:
        if allow_empty:
            return ""
        raise ValueError("invalid storage prefix '': refusing to operate on the whole store")
    problem = key_problem(stripped)
    if problem is not None:
        raise ValueError(f"invalid storage prefix {prefix!r}: {problem}")
    return stripped


JOBS_PREFIX = "jobs"


def job_prefix(job_id: object) -> str:
    """Where a job's outputs live in the artifact store (the worker writes there, deletion empties it)."""
    return f"{JOBS_PREFIX}/{job_id}"
