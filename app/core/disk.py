"""Full disks: whether an error says the disk filled, and the free space where the service writes.

A full disk surfaces in many shapes: ``OSError`` with ``ENOSPC`` (or ``EDQUOT``, a quota) from a plain
write, a Rust ``I/O error ... (os error 28)`` from safetensors, SQLite's "database or disk is full",
Postgres' SQLSTATE 53100, each possibly wrapped by the layer that caught it (a storage error, a
SQLAlchemy error). ``is_disk_full`` reads the whole exception chain so the worker and the API can say
"disk full" rather than "internal error" whatever the wrapper. ``write_dirs`` lists the local folders
the service writes, so ``/readyz`` and ``/metrics`` can show their free space before a write fails.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

from app.core.config import Settings
from lorp.errors import LorpError

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# How each layer words it: the OS's own strerror (as Python and Rust both print it), Rust's
# "(os error N)", SQLite's SQLITE_FULL. Lower case; matched against each exception's text.
_DISK_FULL_PHRASES = (
    *(os.strerror(code).lower() for code in sorted(DISK_FULL_ERRNOS)),
    *(f"(os error {code})" for code in sorted(DISK_FULL_ERRNOS)),
    "database or disk is full",
)
POSTGRES_DISK_FULL = "53100"
_MAX_CHAIN = 32
MIB = 1024 * 1024
# Errors that say a write failed without saying why (no errno): SQLite's "disk I/O error" (its journal
# or shared-memory file could not grow on a full tmpfs), torch's archive writer ("unexpected pos",
# "file write failed"). Taken for a full disk only where a folder the writer used has (almost) nothing
# left, which is then what made them fail.
_UNEXPLAINED_WRITE_FAILURES = (
    "disk i/o error",
    "pytorchstreamwriter",
    "inline_container",
    "iostream error",
    "file write failed",
)
NEARLY_FULL_BYTES = MIB


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception it was raised from or while handling (``__cause__``, ``__context__``)."""
    seen: set[int] = set()
    pending = [exc]
    while pending and len(seen) < _MAX_CHAIN:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending.extend(e for e in (current.__context__, current.__cause__) if e is not None)


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc``, or anything in its chain, says a disk or a quota is full.

    The project's own errors (``LorpError``) are read by their chain only, never by their text: their
    messages may quote a client's input, which may say "No space left on device" on purpose.
    """
    for error in exception_chain(exc):
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return True
        if getattr(error, "sqlstate", None) == POSTGRES_DISK_FULL:
            return True
        if not isinstance(error, LorpError) and any(phrase in str(error).lower() for phrase in _DISK_FULL_PHRASES):
            return True
    return False


def is_disk_full_at(exc: BaseException, folders: Iterable[Path]) -> bool:
    """``is_disk_full``, or a write that failed without a reason while one of ``folders`` is (nearly) full."""
    if is_disk_full(exc):
        return True
    texts = " ".join(str(e).lower() for e in exception_chain(exc) if not isinstance(e, LorpError))
    if not any(phrase in texts for phrase in _UNEXPLAINED_WRITE_FAILURES):
        return False
    for folder in folders:
        try:
            if free_bytes(folder) < NEARLY_FULL_BYTES:
                return True
        except OSError:
            continue
    return False


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem that holds ``path``.

    A folder not made yet (the work folder before the first job) is measured where it will be made:
    on its nearest existing parent.
    """
    current = path.expanduser().absolute()
    while not current.exists() and current != current.parent:
        current = current.parent
    stats = os.statvfs(current)
    return stats.f_bavail * stats.f_frsize


def _sqlite_folder(url: str) -> Path | None:
    for prefix in ("sqla+sqlite:///", "sqlite:///"):
        if url.startswith(prefix):
            name = url.removeprefix(prefix).split("?", 1)[0]
            return Path(name).parent if name and name != ":memory:" else None
    return None


def _local_store_folder(url: str) -> Path | None:
    """The folder of a local artifact store (``file:///dir`` or a plain path); None for ``s3://``."""
    parts = urlsplit(url.strip())
    if parts.scheme.lower() == "file":
        return Path(unquote(parts.path))
    return None if "://" in url else Path(url)


def write_dirs(settings: Settings) -> dict[str, Path]:
    """The local folders this service writes, by a label that names no path (responses show labels).

    ``data`` (in the embedded mode: the SQLite database, the broker and the artifacts), ``work`` (the
    worker's job folders), ``database`` and ``broker`` when they are SQLite files elsewhere, ``artifacts``
    when the store is a local folder elsewhere, and ``spool`` (the temporary folder uploads pass
    through). A folder listed under an earlier label is not listed again.
    """
    candidates: list[tuple[str, Path | None]] = [
        ("data", settings.resolved_data_dir),
        ("work", settings.work_dir),
        ("database", _sqlite_folder(settings.sqlalchemy_url)),
        ("broker", _sqlite_folder(settings.celery_broker_url)),
        ("artifacts", _local_store_folder(settings.artifact_storage_url)),
        ("spool", Path(tempfile.gettempdir())),
    ]
    dirs: dict[str, Path] = {}
    for label, folder in candidates:
        if folder is None:
            continue
        resolved = folder.expanduser().absolute()
        if resolved not in dirs.values():
            dirs[label] = resolved
    return dirs
