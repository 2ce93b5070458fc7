"""The engine's cache folder, cross-process locks and content hashes (provenance, cache keys)."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

_HASH_CHUNK = 1 << 20


def cache_dir() -> Path:
    """The directory where converted models and the parsed corpus are cached.

    ``$LORP_CACHE_DIR`` when set, else ``~/.cache/lorp``; created on demand.
    """
    env = os.environ.get("LORP_CACHE_DIR")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "lorp"
    path.mkdir(parents=True, exist_ok=True)
    return path


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


def source_sha256(path: Path) -> str:
    """sha256 of a packaged file, remembered per process while its size and mtime are unchanged."""
    stat = path.stat()
    return _sha256_of_version(str(path), stat.st_size, stat.st_mtime_ns)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock held across processes (released when the process dies, too)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
