"""A job that hangs while its worker lives is taken back on its stall timeout, not its time limit.

The hang is real: the job's calibration text, as stored, is a named pipe that nothing ever writes, so
the worker's read of it blocks in the kernel, as a read from a hung network filesystem would. (A
model folder holding a FIFO is refused before anything in it is read, so the hang is in the
stored dataset.) Its heartbeat thread keeps beating, so only the stalled progress shows it. The
reconciler requeues the job (attempts left) or fails it with ``stalled``; the stuck pool child ends
itself once the job is no longer its own, and the same worker then runs the next job.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest

from app.core.config import Settings
from app.db.models import JobStatus
from tests.reliability.record import record

from .conftest import fleet_of, job_request, load_job, stack_settings, submit_job, upload_dataset, wait_for

pytestmark = pytest.mark.reliability

STALL_S = 4.0


def hanging_dataset(settings: Settings, corpus: bytes) -> uuid.UUID:
    """An uploaded dataset whose stored file is then replaced by a FIFO without a writer: reading it blocks."""
    dataset_id = upload_dataset(settings, corpus)
    stored = Path(settings.artifact_storage_url.removeprefix("file://")) / "datasets" / str(dataset_id) / "data.txt"
    stored.unlink()
    os.mkfifo(stored)
    return dataset_id


def test_a_hung_job_is_taken_back_and_fails_as_stalled(
    tmp_path: Path, pg_url: str, reliability_redis_url: str, s3_server: str, tiny_model_root: Path, corpus_bytes: bytes
) -> None:
    model = str(tiny_model_root / "tiny-llama")
    # The artifact store in a local folder, where a stored object can be a FIFO.
    settings = stack_settings(
        tmp_path,
        pg_url,
        reliability_redis_url,
        s3_server,
        tiny_model_root,
        stall_timeout_s=STALL_S,
        outage_wait_s=STALL_S / 2,  # shorter than the stall timeout, as the settings require
        storage_url=(tmp_path / "artifacts").as_uri(),
    )
    dataset_id = upload_dataset(settings, corpus_bytes)
    hanging = hanging_dataset(settings, corpus_bytes)
    with fleet_of(settings, tmp_path) as fleet:
        worker = fleet.start_worker("w1")
        started = time.monotonic()
        hung = submit_job(settings, job_request(model, hanging, num_samples=4), max_attempts=2)
        wait_for(lambda: load_job(settings, hung).status.terminal, 120, "the stalled job to end", 0.2)
        ended_s = time.monotonic() - started
        job = load_job(settings, hung)
        assert job.status == JobStatus.failed, (job.status, job.error_code, fleet.logs())
        assert job.error_code == "stalled", job.error_message
        assert f"no progress for {STALL_S:.0f} s" in (job.error_message or "")
        assert "LORP_STALL_TIMEOUT_S" in (job.error_message or "")
        # Attempt 1 stalled and was requeued; attempt 2 stalled the same way and failed.
        assert job.attempts == 2
        # Each stuck pool child ended itself, and the worker process goes on: the next job runs.
        wait_for(lambda: "abandoning it" in worker.log(), 60, "the stuck child to give up", 0.2)
        nxt = submit_job(settings, job_request(model, dataset_id, num_samples=4))
        wait_for(lambda: load_job(settings, nxt).status.terminal, 120, "the next job", 0.2)
        after = load_job(settings, nxt)
        assert after.status == JobStatus.succeeded, (after.error_code, after.error_message, fleet.logs())
        assert worker.alive
    record(
        suite="faults",
        scenario="job hangs while its worker lives",
        runs=1,
        outcomes={"failed_stalled": 1, "attempts": job.attempts, "next_job_succeeded_on_same_worker": 1},
        data_lost=0,
        command=".venv/bin/python -m pytest tests/reliability/test_stall.py -q",
        notes=(
            f"LORP_STALL_TIMEOUT_S={STALL_S:.0f}: the job's stored calibration text is a FIFO nobody writes, so "
            "reading it blocks in the kernel while the heartbeat goes on. The reconciler requeued attempt 1 and failed "
            "attempt 2 as stalled; each stuck pool child exited once the job was no longer its own."
        ),
        figures={"submitted_to_failed_s": round(ended_s, 1), "stall_timeout_s": STALL_S},
    )
