"""A real small filesystem for full-disk tests: a tmpfs mounted on a folder, filled on demand.

Mounting needs root (CAP_SYS_ADMIN); where it is not permitted the test is skipped with the reason.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

BALLAST = "ballast.bin"


@contextlib.contextmanager
def mounted_tmpfs(folder: Path, size_kib: int) -> Iterator[Path]:
    """``folder`` as a fresh tmpfs of ``size_kib`` KiB for the block; unmounted (and emptied) after it."""
    folder.mkdir(parents=True, exist_ok=True)
    mount = shutil.which("mount")
    if mount is None:
        pytest.skip("full-disk test skipped: no mount command on this machine")
    done = subprocess.run(
        [mount, "-t", "tmpfs", "-o", f"size={size_kib}k,mode=0777", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        reason = (done.stderr or done.stdout).strip() or f"exit {done.returncode}"
        pytest.skip(f"full-disk test skipped: mounting a tmpfs is not permitted here ({reason})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, check=False)


def fill(folder: Path, leave_bytes: int = 0) -> Path:
    """Fill the filesystem holding ``folder`` until about ``leave_bytes`` remain free; returns the ballast file."""
    ballast = folder / BALLAST
    stats = os.statvfs(folder)
    free = stats.f_bavail * stats.f_frsize
    with ballast.open("ab") as out:
        remaining = max(free - leave_bytes, 0)
        chunk = b"\0" * (1 << 16)
        with contextlib.suppress(OSError):  # the last chunk may not fit: full is what was asked
            while remaining > 0:
                written = out.write(chunk[: min(len(chunk), remaining)])
                remaining -= written
                out.flush()
    return ballast


def free_bytes(folder: Path) -> int:
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize


def used_files(folder: Path) -> list[str]:
    """Every file under ``folder`` but the ballast, relative (what a failed job must not leave)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != BALLAST)
