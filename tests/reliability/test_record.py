"""The reliability records: a test run writes them outside the committed tree; `make reliability` into docs/."""

from __future__ import annotations

import subprocess
import uuid

import pytest

from tests.reliability.record import REPO, record, results_dir


def test_a_plain_test_run_records_into_an_ignored_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LORP_RELIABILITY_RESULTS", raising=False)
    path = record("faults", f"probe {uuid.uuid4().hex[:8]}", runs=1, outcomes={"ok": 1}, data_lost=0, command="-")
    try:
        assert path.is_file()
        assert not path.is_relative_to(REPO / "docs"), path
        ignored = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=REPO, check=False)
        assert ignored.returncode == 0, f"{path} is not ignored by git: a test run would dirty the checkout"
    finally:
        path.unlink()


def test_make_reliability_records_into_docs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORP_RELIABILITY_RESULTS", "docs/reliability")
    assert results_dir() == REPO / "docs" / "reliability"
    dry_run = subprocess.run(["make", "-n", "reliability"], cwd=REPO, capture_output=True, text=True, check=True)
    suite = [line for line in dry_run.stdout.splitlines() if "pytest" in line]
    assert suite and all("LORP_RELIABILITY_RESULTS=docs/reliability" in line for line in suite), dry_run.stdout
    assert "reliability_report.py" in dry_run.stdout
