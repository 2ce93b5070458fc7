"""``worker.failure_log``: a failure repeated every second while the database is away is logged once
with its traceback, then briefly, and its end once; here through a real heartbeat thread whose
database does not answer."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from pathlib import Path

import pytest

from app.core.config import Settings
from app.db.session import session_factory
from worker import failure_log
from worker.failure_log import RepeatedFailure
from worker.heartbeat import Heartbeat

AWAY = "postgresql+psycopg://lorp@127.0.0.1:1/away"


def test_the_first_failure_has_its_traceback_the_next_a_line_at_most_every_so_often(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = logging.getLogger("test.failure_log")
    failures = RepeatedFailure(log, "the beat")
    with caplog.at_level(logging.INFO, logger=log.name):
        for _ in range(50):
            failures.failed(ConnectionRefusedError("connection refused\nmore detail"))
        monkeypatch.setattr(failure_log, "EVERY_S", 0.0)
        failures.failed(ConnectionRefusedError("connection refused"))
        failures.succeeded()
        failures.succeeded()  # nothing more to say
    said = [(r.levelname, r.getMessage(), r.exc_info is not None) for r in caplog.records]
    assert said[0] == ("WARNING", "the beat failed; trying again", True)
    assert said[1][0] == "WARNING" and said[1][1].startswith("the beat still failing: 51 times in ")
    assert said[1][1].endswith("(ConnectionRefusedError: connection refused)") and not said[1][2]
    assert said[2][0] == "INFO" and said[2][1].startswith("the beat works again, after 51 failures over ")
    assert len(said) == 3


def test_a_heartbeat_without_its_database_says_so_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(data_dir=tmp_path, database_url=AWAY, heartbeat_interval_s=0.05)
    job_id = uuid.uuid4()
    beat = Heartbeat(settings, session_factory(AWAY), job_id, 1, lost=threading.Event(), finishing=threading.Event())
    with caplog.at_level(logging.INFO, logger="worker.heartbeat"):
        beat.start()
        time.sleep(1.0)
        beat.stop()
    said = [r for r in caplog.records if r.name == "worker.heartbeat"]
    assert said and said[0].getMessage() == f"heartbeat of job {job_id} failed; trying again"
    assert said[0].exc_info is not None
    assert len(said) == 1, [r.getMessage() for r in said]  # some 20 failed beats, one line
