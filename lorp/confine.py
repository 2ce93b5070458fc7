"""Where a model folder's files really are: each one, links followed, must lie inside the roots a caller allows.

A model folder is read whole by transformers (config, weights, tokenizer files, chat templates), and
what it reads can come back to the caller: a tokenizer template is saved into the pruned model. A
link inside the folder (a file or a folder, at any depth) that leads outside what the caller may name
would make any file the process can read part of the result, so such a folder is refused before
anything in it is read. Anything that is neither a regular file nor a folder (a FIFO, a device) is
refused too: reading it would block or never end. Imports nothing heavy: the API checks folders it
can see with the same function.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

# A Hugging Face model folder holds tens of files; a folder with this many entries is not one.
MAX_ENTRIES = 100_000


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def confinement_problem(folder: Path, roots: Sequence[Path], *, max_entries: int = MAX_ENTRIES) -> str | None:
    """Why ``folder`` may not be read under ``roots``, or None when every entry lies inside them.

    The answer names entries by their path relative to ``folder``, never where a link leads. Each
    real folder is visited once, so links that loop are harmless.

    Args:
        folder: the model folder (or the single file) to check.
        roots: the folders everything must resolve into.
        max_entries: refuse folders holding more entries than this (links followed).
    """
    real_roots = [Path(os.path.realpath(root)) for root in roots]
    real = Path(os.path.realpath(folder))
    if not _inside(real, real_roots):
        return "it resolves to a place outside the allowed roots"
    if not real.is_dir():
        return None if real.is_file() or not real.exists() else "it is not a regular file"
    seen: set[Path] = set()
    pending = [folder]
    entries = 0
    while pending:
        current = pending.pop()
        real_current = Path(os.path.realpath(current))
        if real_current in seen:
            continue
        seen.add(real_current)
        try:
            listing = sorted(os.scandir(current), key=lambda e: e.name)
        except OSError as exc:
            return f"{_relative(Path(current), folder)} cannot be listed ({exc.strerror})"
        for entry in listing:
            entries += 1
            if entries > max_entries:
                return f"it holds more than {max_entries} files; a model folder holds tens"
            path = Path(entry.path)
            name = _relative(path, folder)
            target = Path(os.path.realpath(path))
            if entry.is_symlink() and not _inside(target, real_roots):
                return f"{name} is a link to a place outside the allowed roots"
            try:
                mode = os.stat(path).st_mode
            except FileNotFoundError:
                continue  # a dangling link inside the roots: nothing to read, the loader says what is missing
            except OSError as exc:
                return f"{name} cannot be read ({exc.strerror})"
            if stat.S_ISDIR(mode):
                pending.append(path)
            elif not stat.S_ISREG(mode):
                return f"{name} is not a regular file or folder"
    return None


def _relative(path: Path, folder: Path) -> str:
    try:
        return path.relative_to(folder).as_posix() or "."
    except ValueError:
        return path.name
