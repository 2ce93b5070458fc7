"""`lorp jobs` (lorp_client.cli) as a user runs it, against `lorp serve`: submit and wait with a
progress line per stage, download, list, status, cancel, --json for scripts, and the exit statuses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lorp_client.models import JobListItem, JobOut

from .stack import corpus, embedded_stack

LORP = str(Path(sys.executable).with_name("lorp"))
LORP_JOBS = str(Path(sys.executable).with_name("lorp-jobs"))


@pytest.fixture(scope="module")
def embedded(
    tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any, request: pytest.FixtureRequest
) -> Iterator[dict[str, Any]]:
    with embedded_stack(tmp_path_factory, tiny_tokenizer, request, "jobs-cli") as stack:
        yield stack


def jobs(
    embedded: dict[str, Any], *argv: str, command: str = LORP, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORP_")}
    env["LORP_URL"] = embedded["base"]
    prefix = [command, "jobs"] if command == LORP else [command]
    return subprocess.run([*prefix, *argv], env=env, capture_output=True, text=True, timeout=timeout, check=False)


def test_submit_wait_and_download(embedded: dict[str, Any], tmp_path: Path) -> None:
    data = tmp_path / "corpus.txt"
    data.write_bytes(corpus())
    argv = ["submit", "--model", embedded["model"], "--num-layers", "1", "--method", "lorp"]
    argv += ["--dataset-file", str(data), "--download", str(tmp_path / "out"), "--json"]
    result = jobs(embedded, *argv)
    assert result.returncode == 0, result.stdout + result.stderr
    job = JobOut.model_validate_json(result.stdout)
    assert job.status == "succeeded" and job.summary is not None and len(job.summary.pruned_layers or []) == 1
    # Not a terminal here: a line per stage seen on stderr (polled), then each file as it is checked.
    assert "\nrunning    " in result.stderr and "\nsucceeded  done" in result.stderr, result.stderr
    assert "downloaded model/model.safetensors" in result.stderr and "sha256 checked" in result.stderr
    assert json.loads((tmp_path / "out" / "model" / "config.json").read_text())["num_hidden_layers"] == 3

    listed = jobs(embedded, "list", "--status", "succeeded", "--json")
    assert listed.returncode == 0, listed.stderr
    assert str(job.id) in {str(JobListItem.model_validate_json(line).id) for line in listed.stdout.splitlines()}
    shown = jobs(embedded, "status", str(job.id), command=LORP_JOBS)  # the client-only command
    assert shown.returncode == 0 and str(job.id) in shown.stdout and "succeeded" in shown.stdout
    assert f"removed {job.summary.pruned_layers}" in shown.stdout
    again = jobs(embedded, "download", str(job.id), str(tmp_path / "again"))
    assert again.returncode == 0 and (tmp_path / "again" / "report.json").is_file(), again.stderr


def test_refusals_and_failures_have_their_own_exit_status(embedded: dict[str, Any]) -> None:
    refused = jobs(embedded, "submit", "--model", embedded["model"], "--num-layers", "0", "--dataset", "builtin")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "422" in refused.stderr and "target.num_layers" in refused.stderr
    missing = jobs(embedded, "status", "00000000-0000-0000-0000-000000000000")
    assert missing.returncode == 2 and "404 not_found (field job_id)" in missing.stderr
    # A job that fails: more blocks to remove than a 4-block model has.
    failed = jobs(
        embedded, "submit", "--model", embedded["model"], "--num-layers", "4", "--dataset", "builtin", "--wait"
    )
    assert failed.returncode in (1, 2), failed.stdout + failed.stderr
    assert "num_layers" in failed.stdout + failed.stderr


def test_methods_are_the_services(embedded: dict[str, Any]) -> None:
    """`lorp-jobs methods` lists what GET /v1/methods serves, the default marked; --json is the response."""
    listed = jobs(embedded, "methods", "--json", command=LORP_JOBS)
    assert listed.returncode == 0, listed.stderr
    body = json.loads(listed.stdout)
    assert [m["name"] for m in body["methods"]] == [
        "auto",
        "search",
        "lorp",
        "shortgpt",
        "streamline",
        "angular",
        "reverse",
    ]
    shown = jobs(embedded, "methods")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert len(lines) == 7 and lines[0].startswith("auto") and lines[0].endswith("(default)")
    assert lines[2].startswith("lorp") and "auto,curve" in lines[2]


def test_cancel_from_the_command_line(embedded: dict[str, Any]) -> None:
    submitted = jobs(
        embedded, "submit", "--model", embedded["model"], "--num-layers", "2", "--dataset", "builtin", "--json"
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = str(JobOut.model_validate_json(submitted.stdout).id)
    cancelled = jobs(embedded, "cancel", job_id, "--json")
    assert cancelled.returncode == 0, cancelled.stderr
    view = JobOut.model_validate_json(cancelled.stdout)
    assert view.status == "cancelled" or view.cancel_requested_at is not None
    waited = jobs(embedded, "wait", job_id, "--timeout", "240")
    assert waited.returncode in (0, 1) and job_id in waited.stdout  # cancelled (1), or it finished first (0)


def test_delete_from_the_command_line(embedded: dict[str, Any]) -> None:
    argv = ["submit", "--model", embedded["model"], "--num-layers", "1", "--dataset", "builtin", "--wait", "--json"]
    done = jobs(embedded, *argv)
    assert done.returncode == 0, done.stderr
    job_id = str(JobOut.model_validate_json(done.stdout).id)
    deleted = jobs(embedded, "delete", job_id)
    assert deleted.returncode == 0 and f"{job_id}  deleted (succeeded; files and results removed)" in deleted.stdout
    assert jobs(embedded, "status", job_id).returncode == 2  # gone: 404
