"""What the client raises: the API's problem+json as an exception, a wait that ran out, a bad download."""

from __future__ import annotations

from typing import Any


class LorpError(Exception):
    """Base of every error this client raises."""


class ApiError(LorpError):
    """A 4xx or 5xx answer: the problem's ``status``, ``code``, ``field`` (the first input at fault) and ``detail``."""

    def __init__(self, status: int, problem: dict[str, Any], *, retry_after: float | None = None) -> None:
        self.status = status
        self.problem = problem
        self.code: str = str(problem.get("code") or "error")
        self.detail: str = str(problem.get("detail") or problem.get("title") or f"HTTP {status}")
        self.errors: list[dict[str, Any]] = list(problem.get("errors") or [])
        self.field: str | None = next((e.get("field") for e in self.errors if e.get("field")), None)
        self.retry_after = retry_after
        where = f" (field {self.field})" if self.field else ""
        super().__init__(f"{status} {self.code}{where}: {self.detail}")


class ServiceUnreachable(LorpError):
    """The service could not be reached (connection refused, DNS, timeouts) after every retry."""


class WaitTimeout(LorpError):
    """``wait`` gave up before the job reached a final state; ``job`` is its last view."""

    def __init__(self, job: Any, timeout: float) -> None:
        self.job = job
        super().__init__(f"job {job.id} still {job.status} (stage {job.stage}) after {timeout:g} s")


class DownloadError(LorpError):
    """A file could not be downloaded intact (its sha256 never matched, or every retry broke off)."""
