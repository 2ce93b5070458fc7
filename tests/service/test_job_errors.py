"""The job error codes (``app/job_errors.py``): one list, which every error the worker records is in,
the README's table shows, and the API reads ``error.retryable`` from."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

import worker.runner  # noqa: F401 - the worker's modules, so every error class it can raise is defined
from app.core.config import Settings
from app.core.errors import ServiceError
from app.db.models import JobStatus
from app.job_errors import JOB_ERRORS
from app.jobspec import RequestError
from app.storage.base import StorageError
from lorp.errors import JobCancelled, LorpError
from lorp_client import cli as jobs_cli
from lorp_client.models import JobListItem
from worker import failures

from .api_helpers import client_for, insert_job

REPO = Path(__file__).resolve().parents[2]


def _tree(root: type[LorpError]) -> list[type[LorpError]]:
    found, pending = [], [root]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return found


def _a_job_can_end_with(cls: type[LorpError]) -> bool:
    if cls is JobCancelled or cls is failures.JobFailure:  # a cancel; a code given where it is raised
        return False
    if issubclass(cls, ServiceError):  # the API's HTTP errors, but for storage and a refused reference
        return issubclass(cls, StorageError | RequestError)
    return True


def test_every_error_the_worker_can_record_has_a_code_in_the_list() -> None:
    """The worker records any error of the project's tree with the class's code (``worker.failures``):
    each must be in the list, so that the API can say whether it is worth submitting again. Left out:
    the API's own HTTP errors (never raised by a job) and a cancel (a job that ends cancelled)."""
    recorded = {cls.code for cls in _tree(LorpError) if _a_job_can_end_with(cls)}
    assert len(recorded) >= 11, recorded  # the walk found the tree
    assert recorded <= set(JOB_ERRORS), recorded - set(JOB_ERRORS)


def test_the_codes_the_worker_classifies_are_in_the_list() -> None:
    settings = Settings()
    for exc in (MemoryError(), KeyError("boom"), failures.JobFailure("storage_unavailable", "down")):
        code, _ = failures.classify_failure(exc, settings)
        assert code in JOB_ERRORS, code
    assert failures.classify_failure(KeyError("boom"), settings, time_limit=True)[0] == "time_limit_exceeded"


def test_the_readme_table_is_the_list() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("#### Job error codes", 1)[1].split("\n### ", 1)[0]
    rows = re.findall(r"^\| `([a-z_]+)` \| (yes|no) \| (.+?) \|$", section, flags=re.M)
    shown = {code: (flag == "yes", meaning) for code, flag, meaning in rows}
    assert shown == {e.code: (e.retryable, e.meaning) for e in JOB_ERRORS.values()}


def test_a_failed_job_says_whether_submitting_it_again_may_succeed(
    api_settings: Settings, rollback_sessionmaker: sessionmaker[Session]
) -> None:
    """``error.retryable`` in the job's view (and so in its webhook and the client): true for the
    service's condition, false for the request's fault, null for a code this version does not know."""
    client = client_for(api_settings, rollback_sessionmaker)
    expected = {"worker_lost": True, "disk_full": True, "model_load_failed": False, "code_of_an_older_version": None}
    for code, retryable in expected.items():
        job_id = insert_job(
            rollback_sessionmaker, status=JobStatus.failed, error_code=code, error_message=f"it failed: {code}"
        )
        response = client.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        error = response.json()["error"]
        assert error == {"code": code, "message": f"it failed: {code}", "retryable": retryable}
        listed = client.get("/v1/jobs", params={"status": "failed", "limit": 100}).json()["items"]
        assert [item["error"] for item in listed if item["id"] == str(job_id)] == [error]
    succeeded = insert_job(rollback_sessionmaker, status=JobStatus.succeeded)
    assert client.get(f"/v1/jobs/{succeeded}").json()["error"] is None


def _failed_job(code: str, retryable: bool | None) -> dict[str, object]:
    return {
        "id": str(uuid.uuid4()), "status": "failed", "stage": "capture", "progress": 0.4, "model": "demo",
        "method": "lorp", "created_at": "2026-12-07T00:00:00Z", "updated_at": "2026-12-07T00:01:00Z",
        "finished_at": "2026-12-07T00:01:00Z", "links": {"self": "/v1/jobs/x", "cancel": "/v1/jobs/x/cancel"},
        "error": {"code": code, "message": "what happened", "retryable": retryable},
    }  # fmt: skip


def test_lorp_jobs_says_when_submitting_again_may_succeed(capsys: pytest.CaptureFixture[str]) -> None:
    def shown(code: str, retryable: bool | None) -> str:
        jobs_cli._show_job(JobListItem.model_validate(_failed_job(code, retryable)), as_json=False)
        return capsys.readouterr().out

    for code, retryable, status in (("worker_lost", True, 75), ("invalid_budget", False, 1), ("old_code", None, 1)):
        job = JobListItem.model_validate({**_failed_job(code, retryable)})
        assert jobs_cli._outcome(job) == status, code  # the exit status of wait and submit --wait
    assert "error worker_lost: what happened" in shown("worker_lost", True)
    assert "submitting it again may succeed" in shown("worker_lost", True)
    assert "submitting it again" not in shown("invalid_budget", False)
    assert "submitting it again" not in shown("code_of_an_older_version", None)
