"""``worker.retries``: a failing store is waited for, with backoff, for as long as the job may wait
(``LORP_OUTAGE_WAIT_S``), and a cancel ends the wait. The storage errors here are raised on cue:
what is under test is the waiting, not a store (tests/reliability cuts a real one)."""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Callable

import pytest
from pydantic import ValidationError

from app.core.config import Settings
from app.storage import StorageError
from lorp.errors import JobCancelled
from worker import retries
from worker.failures import JobFailure


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retries, "BACKOFF_S", 0.02)
    monkeypatch.setattr(retries, "CANCEL_POLL_S", 0.01)


def failing(times: int, *, retryable: bool = True) -> tuple[Callable[[], str], list[float]]:
    calls: list[float] = []

    def call() -> str:
        calls.append(time.monotonic())
        if len(calls) <= times:
            raise StorageError("the store is away", retryable=retryable)
        return "stored"

    return call, calls


def test_a_store_that_comes_back_within_the_patience_costs_nothing() -> None:
    call, calls = failing(4)
    assert retries.with_storage_retries("uploading x", call, patience_s=30) == "stored"
    assert len(calls) == 5
    waits = [b - a for a, b in itertools.pairwise(calls)]
    assert waits == sorted(waits) and waits[-1] >= 4 * waits[0] * 0.9, waits  # backoff: each wait doubles


def test_a_store_that_stays_away_fails_the_job_once_the_patience_runs_out() -> None:
    call, calls = failing(10_000)
    started = time.monotonic()
    with pytest.raises(JobFailure) as failure:
        retries.with_storage_retries("uploading x", call, patience_s=0.5)
    took = time.monotonic() - started
    assert failure.value.code == "storage_unavailable"
    assert re.match(rf"uploading x failed after {len(calls)} attempts over [01] s: ", failure.value.message)
    assert 0.5 <= took < 1.5 and calls[-1] - started >= 0.5 - 0.01, (took, len(calls))


def test_an_error_that_no_retry_can_help_fails_at_once() -> None:
    call, calls = failing(1, retryable=False)
    with pytest.raises(JobFailure) as failure:
        retries.with_storage_retries("uploading x", call, patience_s=30)
    assert len(calls) == 1 and "after" not in failure.value.message


def test_a_cancel_ends_the_wait() -> None:
    call, calls = failing(10_000)
    asked: list[float] = []

    def should_cancel() -> bool:
        asked.append(time.monotonic())
        return len(asked) > 3

    started = time.monotonic()
    with pytest.raises(JobCancelled, match="waited for object storage"):
        retries.with_storage_retries("uploading x", call, patience_s=30, should_cancel=should_cancel)
    assert time.monotonic() - started < 5 and len(calls) >= 1


def test_the_wait_must_end_before_the_job_counts_as_stalled() -> None:
    with pytest.raises(ValidationError, match=r"LORP_OUTAGE_WAIT_S .* LORP_STALL_TIMEOUT_S"):
        Settings(outage_wait_s=600, stall_timeout_s=300)
    assert Settings().outage_wait_s < Settings().stall_timeout_s
