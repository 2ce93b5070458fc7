"""lorp.atomic: a file is replaced whole or not at all, by one process or several, killed or not."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lorp.atomic import PARTIAL_PREFIX, replacing, write_atomically

REPO = Path(__file__).resolve().parents[2]


def _leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.startswith(PARTIAL_PREFIX))


def test_a_write_replaces_the_file_and_leaves_nothing_beside_it(tmp_path: Path) -> None:
    target = tmp_path / "entry.json"
    target.write_text("old")
    write_atomically(target, "new é")
    assert target.read_text(encoding="utf-8") == "new é"
    with replacing(target, encoding="utf-8", durable=True) as fh:
        fh.write("text ")
        fh.write("mode")
    assert target.read_text(encoding="utf-8") == "text mode"
    write_atomically(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert _leftovers(tmp_path) == []


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path: Path) -> None:
    target = tmp_path / "entry.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="half way"), replacing(target) as fh:
        fh.write(b"half of the new")
        raise RuntimeError("half way")
    assert target.read_text() == "old"
    with pytest.raises(TypeError):
        write_atomically(target, 3)  # type: ignore[arg-type]
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == []
    # A target that never existed is not created by a failed write either.
    with pytest.raises(RuntimeError), replacing(tmp_path / "new.bin"):
        raise RuntimeError
    assert not (tmp_path / "new.bin").exists() and _leftovers(tmp_path) == []


def test_two_writers_at_once_each_write_their_own_file_and_the_last_rename_wins(tmp_path: Path) -> None:
    target = tmp_path / "shared"
    with replacing(target) as first, replacing(target) as second:
        assert Path(first.name) != Path(second.name)
        first.write(b"A" * 1000)
        second.write(b"B" * 10)
        assert len(_leftovers(tmp_path)) == 2
    # The inner block ended first: its rename came first, the outer one's last.
    assert target.read_bytes() == b"A" * 1000
    assert _leftovers(tmp_path) == []


def test_permissions_follow_the_umask_unless_a_mode_is_given(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        write_atomically(tmp_path / "plain", b"x")
        with replacing(tmp_path / "shared", mode=0o644) as fh:
            fh.write(b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "plain").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "shared").stat().st_mode & 0o777 == 0o644


def test_a_name_as_long_as_the_file_system_allows_still_gets_a_temporary_name(tmp_path: Path) -> None:
    target = tmp_path / ("é" * 127)  # 254 bytes
    write_atomically(target, "long")
    assert target.read_text(encoding="utf-8") == "long" and _leftovers(tmp_path) == []


def test_a_process_killed_mid_write_leaves_the_old_file_whole(tmp_path: Path) -> None:
    target = tmp_path / "weights.bin"
    target.write_bytes(b"old" * 1000)
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from lorp.atomic import replacing
        with replacing(Path({str(target)!r}), durable=True) as fh:
            fh.write(b"new" * 500)
            fh.flush()
            print("writing", flush=True)
            time.sleep(60)
            fh.write(b"new" * 500)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "writing"
        leftover = _leftovers(tmp_path)
        assert len(leftover) == 1 and (tmp_path / leftover[0]).stat().st_size == 1500
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    # What the reader of the target sees: the old file, whole. The half-written one is only a
    # temporary name, which a listing skips by its prefix.
    assert target.read_bytes() == b"old" * 1000
    assert _leftovers(tmp_path) == leftover
