"""The engine's cache folder, cross-process locks and content hashes (provenance, cache keys)."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from lorp.atomic import write_atomically

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


_SHA256 = re.compile(r"[0-9a-f]{64}")


def remembered_sha256(path: Path) -> str:
    """sha256 of a file, remembered in the cache folder while the file stays the same version.

    A version is the file's real path, size, modification time (ns), inode and device: replacing
    the file (a copy, a download, a rename over it) makes a new version, hashed again. A model's
    weights are then read in full for their hash once per version on a machine, not before every job.
    """
    real = path.resolve()
    stat = real.stat()
    version = f"{real}\0{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ino}\0{stat.st_dev}"
    entry = cache_dir() / "sha256" / hashlib.sha256(version.encode()).hexdigest()
    with contextlib.suppress(OSError, UnicodeDecodeError):
        known = entry.read_text(encoding="ascii").strip()
        if _SHA256.fullmatch(known):
            return known
    digest = file_sha256(real)
    with contextlib.suppress(OSError):
        entry.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(entry, digest + "\n")
    return digest


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
