"""Files that appear whole or not at all: written under a temporary name beside their target, then
renamed over it in one step.

Whoever reads the target (another worker sharing the cache folder, a retried attempt reading a scratch,
the storage's listing) sees the file as it was or as it is now, never half of it. A write that fails,
or a process killed in the middle of one, leaves no file under the target's name: at most a temporary
one whose name starts with :data:`PARTIAL_PREFIX` (a name no cache, scratch or storage key uses, so
listings skip it and a later cleaner may remove it). Each write has a temporary name of its own, so
processes writing the same target at once do not write into one another's file; the last rename wins.

``durable=True`` also flushes the file to the disk before the rename, for what must survive the
machine's crash, not only the process's: a model's weights, a resumable pass's states and their
manifest. Caches that can be rebuilt skip it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

PARTIAL_PREFIX = ".lorp-partial-"


def partial_path(path: Path) -> Path:
    """A temporary name beside ``path`` that no other write uses (this process's id and a random tag).

    It carries the start of the target's name (at most 64 bytes: a name as long as the file system
    allows still leaves room for the rest)."""
    start = path.name.encode("utf-8")[:64].decode("utf-8", errors="ignore")
    return path.with_name(f"{PARTIAL_PREFIX}{start}.{os.getpid()}.{secrets.token_hex(4)}")


@contextlib.contextmanager
def replacing(
    path: Path, *, encoding: str | None = None, durable: bool = False, mode: int | None = None
) -> Iterator[IO[Any]]:
    """An open file whose content replaces ``path`` when the ``with`` block ends without an exception.

    Args:
        path: the target; its folder must exist.
        encoding: open in text mode with this encoding (binary when None).
        durable: flush to the disk (fsync) before the rename.
        mode: permission bits for the file; when None, the usual ones (0o666 less the umask).

    An exception in the block, or in writing, removes the temporary file and leaves ``path`` as it was.
    """
    tmp = partial_path(Path(path))
    fh = open(tmp, "x", encoding=encoding) if encoding is not None else open(tmp, "xb")  # noqa: SIM115
    try:
        with fh:
            yield fh
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomically(path: Path, data: str | bytes, *, durable: bool = False) -> None:
    """Replace ``path`` with ``data`` (text is written as UTF-8) in one step; see :func:`replacing`."""
    with replacing(path, durable=durable) as fh:
        fh.write(data.encode("utf-8") if isinstance(data, str) else data)
