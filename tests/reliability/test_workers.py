"""Workers as a readiness check, with real processes: `lorp serve`'s supervised worker, and a full stack.

1. Embedded (`lorp serve`: SQLite, the SQLAlchemy broker, local artifacts): kill -9 of the worker
   (the Celery main process and its pool child) while a job captures; serve restarts the worker, the
   reconciler takes the job back, and the job finishes on the restarted worker with attempts 2 and
   one artifact set.
2. Embedded: a worker that dies at once, again and again (each one killed as soon as it appears):
   serve stops restarting after LORP_WORKER_RESTART_LIMIT quick deaths and /readyz turns 503
   `workers`, /metrics says the worker is down.
3. Full stack (Postgres, Redis, moto's S3 server): with no worker, /readyz is 503 `workers` and the
   queued job says `waiting_for: "worker"`; a worker started later takes it and /readyz turns 200;
   a warm stop is seen at once, a kill -9 within LORP_WORKER_TIMEOUT_S.
4. Full stack: a pool child that took a job and hangs before starting it is killed after
   LORP_JOB_START_TIMEOUT_S, the job goes back to the queue and runs on a fresh child; /readyz and
   /metrics say the worker is stuck until a job starts on it again.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from fastapi.testclient import TestClient
from ports import free_port
from sqlalchemy import create_engine, text

from app.core.config import Settings
from app.db.models import JobStatus
from app.main import create_app
from app.queue import enqueue_job
from lorp.stages import STAGES
from tests.reliability.record import record

from .conftest import (
    create_job,
    fleet_of,
    job_request,
    load_job,
    save_mid_llama,
    stack_settings,
    upload_dataset,
    wait_for,
)
from .servers import wait_until

pytestmark = pytest.mark.reliability

REPO = Path(__file__).resolve().parents[2]
LORP = str(Path(sys.executable).with_name("lorp"))
COMMAND = ".venv/bin/python -m pytest tests/reliability/test_workers.py -q -k {}"
# Short timings: a dead worker's job is taken back, and a silent worker stops counting, within seconds.
FAST_ENV = {
    "LORP_HEARTBEAT_INTERVAL_S": "0.5",
    "LORP_HEARTBEAT_TIMEOUT_S": "4",
    "LORP_RECONCILE_INTERVAL_S": "0.5",
    "LORP_PROGRESS_MIN_INTERVAL_S": "0",
    "LORP_WORKER_BEAT_INTERVAL_S": "0.5",
    "LORP_WORKER_TIMEOUT_S": "3",
}
KILL_TRIES = 3
ORDER = (*STAGES, "uploading")


@pytest.fixture(scope="module")
def capture_model_root(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> Path:
    """``mid-llama`` (8 blocks, 256 wide): its capture lasts long enough to be caught."""
    root = tmp_path_factory.mktemp("worker-models")
    save_mid_llama(root, tiny_tokenizer)
    return root


def _job_body(model: str, dataset: str, seed: int, num_samples: int = 8) -> dict[str, Any]:
    body = job_request(
        model, dataset, num_samples=num_samples, batch_size=1, seed=seed, eval_windows=1, perplexity=False
    ).model_dump(mode="json")
    body["evaluation"]["prompts"] = []
    body["evaluation"]["curve_budgets"] = []
    return body


# -- lorp serve, embedded ------------------------------------------------------------------------------


class Serve:
    """`lorp serve` in the embedded mode on a free port, its log kept; its worker is found among its children."""

    def __init__(self, tmp_path: Path, model_root: Path, **env: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.data = tmp_path / "data"
        self.log_path = tmp_path / "serve.log"
        environ = {k: v for k, v in os.environ.items() if not k.startswith("LORP_")}
        environ.update(
            LORP_DATA_DIR=str(self.data),
            LORP_MODEL_ROOTS=json.dumps([str(model_root)]),
            PYTHONUNBUFFERED="1",
            TQDM_DISABLE="1",
            **FAST_ENV,
            **env,
        )
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [LORP, "serve", "--port", str(self.port)], env=environ, cwd=REPO, stdout=log, stderr=subprocess.STDOUT
            )
        self.client = httpx.Client(base_url=self.base, timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def up(self, timeout: float = 120) -> None:
        def answers() -> bool:
            assert self.proc.poll() is None, self.log()
            try:
                return self.client.get("/healthz").status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(answers, timeout, "lorp serve to answer", 0.2)

    def worker_pids(self) -> list[int]:
        """The Celery main processes serve runs (its direct children); each leads its own process group."""
        try:
            return [p.pid for p in psutil.Process(self.proc.pid).children() if p.status() != psutil.STATUS_ZOMBIE]
        except psutil.NoSuchProcess:
            return []

    def kill_worker(self, pid: int) -> None:
        """kill -9 of a worker's process group: the Celery main process and its pool child."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.client.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.client.close()


@contextlib.contextmanager
def serving(tmp_path: Path, model_root: Path, **env: str) -> Iterator[Serve]:
    serve = Serve(tmp_path, model_root, **env)
    leftovers: list[psutil.Process] = []
    try:
        serve.up()
        yield serve
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            leftovers = psutil.Process(serve.proc.pid).children(recursive=True)
        serve.stop()
        for child in leftovers:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()


def _stage_of(serve: Serve, job_id: str) -> dict[str, Any] | None:
    """The job once it is in capture, past it, or no longer running; None while before capture."""
    shown = serve.job(job_id)
    if shown["status"] == "queued":
        return None
    stage = shown["stage"]
    past = stage in ORDER and ORDER.index(stage) > ORDER.index("capture")
    return shown if shown["status"] != "running" or stage == "capture" or past else None


def _a_job_in_capture(serve: Serve, model: str, dataset: str) -> tuple[str, list[str]]:
    """Submit jobs until one is caught in capture (a stage that went by between polls is tried again)."""
    tries: list[str] = []
    for attempt in range(KILL_TRIES):
        posted = serve.client.post("/v1/jobs", json=_job_body(model, dataset, seed=500 + attempt, num_samples=48))
        assert posted.status_code == 202, posted.text
        job_id = posted.json()["id"]
        try:
            shown = wait_until("stage capture", functools.partial(_stage_of, serve, job_id), 240, interval=0.02)
        except TimeoutError:
            raise AssertionError(serve.log()[-4000:]) from None
        if shown["status"] == "running" and shown["stage"] == "capture":
            return job_id, tries
        tries.append(f"missed (job {shown['status']} in {shown['stage']})")
        wait_until("the missed job", functools.partial(_finished, serve, job_id), 180)
    pytest.fail(f"never caught a job in capture: {tries}")


def _finished(serve: Serve, job_id: str) -> bool:
    return serve.job(job_id)["status"] in ("succeeded", "failed", "cancelled")


def _succeeded_on_attempt_2(serve: Serve, job_id: str, what: str) -> dict[str, Any]:
    """Wait for a job taken back from a killed worker to finish; it succeeded, on its second attempt."""
    wait_for(lambda: _finished(serve, job_id), 300, what, 0.25)
    job = serve.job(job_id)
    assert job["status"] == "succeeded", (job["error"], serve.log()[-4000:])
    assert job["attempts"] == 2, job
    return job


# about a minute: make reliability records it; make test has the full stack's kill -9 mid-capture
# (test_faults_worker.py) and serve's restart of a killed worker (tests/service/test_serve_lifecycle.py)
@pytest.mark.long
def test_embedded_kill9_mid_capture_finishes_on_the_restarted_worker(
    tmp_path: Path, capture_model_root: Path, corpus_bytes: bytes
) -> None:
    model = str(capture_model_root / "mid-llama")
    with serving(tmp_path, capture_model_root) as serve:
        uploaded = serve.client.post("/v1/datasets", files={"file": ("corpus.txt", corpus_bytes, "text/plain")})
        assert uploaded.status_code == 201, uploaded.text
        dataset = uploaded.json()["id"]
        job_id, tries = _a_job_in_capture(serve, model, dataset)

        pids = serve.worker_pids()
        assert len(pids) == 1, pids
        killed_at = time.monotonic()
        serve.kill_worker(pids[0])
        restarted: list[int] = []

        def another_worker() -> bool:
            restarted[:] = [p for p in serve.worker_pids() if p != pids[0]]
            return bool(restarted)

        wait_for(another_worker, 60, "serve to start another worker", 0.1)
        restart_s = time.monotonic() - killed_at
        # Taken back and queued again while the restarted worker starts: the job says why it waits.
        states: list[tuple[str, str | None]] = []
        ready_codes: set[int] = set()

        def finished() -> bool:
            shown = serve.job(job_id)
            states.append((shown["status"], shown.get("waiting_for")))
            ready_codes.add(serve.client.get("/readyz").status_code)
            return shown["status"] in ("succeeded", "failed", "cancelled")

        wait_for(finished, 300, "the job to finish on the restarted worker", 0.25)
        finished_s = time.monotonic() - killed_at
        job = serve.job(job_id)
        assert job["status"] == "succeeded", (job["error"], serve.log()[-4000:])
        assert job["attempts"] == 2, job
        listed = serve.client.get(f"/v1/jobs/{job_id}/artifacts").json()
        names = [a["name"] for a in listed]
        assert len(names) == len(set(names)) and {"report.json", "model/config.json"} <= set(names), names
        stored = sorted(
            str(p.relative_to(serve.data / "artifacts" / "jobs" / job_id))
            for p in (serve.data / "artifacts" / "jobs" / job_id).rglob("*")
            if p.is_file()
        )
        assert stored == sorted(names), "the files under the job's folder differ from its artifact rows"
        assert not (serve.data / "work" / job_id).exists(), "the work folder was left behind"
        ready = serve.client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"]["workers"]["restarts"] == 1
        log = serve.log()
        assert "restarting it in" in log and "worker restarted" in log
        waited = sorted({w for s, w in states if s == "queued"} - {None})

    record(
        suite="faults",
        scenario="embedded: kill -9 of lorp serve's worker during capture",
        runs=1,
        outcomes={
            "succeeded_on_restarted_worker": 1,
            "attempts": 2,
            "artifact_sets": 1,
            "missed_stage_retries": len(tries),
            "waiting_for while requeued": waited or ["(not polled while queued)"],
            "/readyz while recovering": sorted(ready_codes),
            "/readyz after": 200,
        },
        data_lost=0,
        command=COMMAND.format("embedded_kill9"),
        notes=(
            "lorp serve in the embedded mode (SQLite, SQLAlchemy broker, local artifacts); kill -9 of the worker's "
            "process group while the job's row said stage=capture. Serve restarted the worker (1 s backoff), the "
            "reconciler (heartbeat timeout 4 s) requeued the job, and the restarted worker finished it: one set of "
            "artifact rows, exactly the files under jobs/{id}/."
        ),
        figures={"kill_to_new_worker_process_s": round(restart_s, 1), "kill_to_succeeded_s": round(finished_s, 1)},
    )


@pytest.mark.long  # about a minute: the engine's resume is in tests/engine/test_sequential.py (make test)
def test_embedded_kill9_of_a_sequential_capture_resumes_at_its_next_block(
    tmp_path: Path, capture_model_root: Path, corpus_bytes: bytes
) -> None:
    """A sequential job's worker killed (-9) once its capture has written some blocks' states to the job's
    scratch: the restarted worker's attempt 2 finds them and resumes at the next block, and the job's
    summary says where; the scratch is removed once the job ends."""
    model = str(capture_model_root / "mid-llama")
    blocks = 8
    with serving(tmp_path, capture_model_root) as serve:
        uploaded = serve.client.post("/v1/datasets", files={"file": ("corpus.txt", corpus_bytes, "text/plain")})
        assert uploaded.status_code == 201, uploaded.text
        body = _job_body(model, uploaded.json()["id"], seed=900, num_samples=96)
        body["options"] = {"execution": "sequential", "heal": "none"}
        posted = serve.client.post("/v1/jobs", json=body)
        assert posted.status_code == 202, posted.text
        job_id = posted.json()["id"]
        capture = serve.data / "scratch" / job_id / "capture"

        def states_written() -> int | None:
            """The states the capture has made complete (its manifest), once it has passed block 2."""
            assert serve.job(job_id)["status"] in ("queued", "running"), serve.job(job_id)
            try:
                done = int(json.loads((capture / "manifest.json").read_text())["done"])
            except (OSError, ValueError, KeyError):
                return None
            return done if 3 <= done < blocks else None

        done = wait_until("the capture past block 2", states_written, 240, interval=0.05)
        pids = serve.worker_pids()
        assert len(pids) == 1, pids
        serve.kill_worker(pids[0])
        killed_at = time.monotonic()
        job = _succeeded_on_attempt_2(serve, job_id, "the job to finish on the restarted worker")
        finished_s = time.monotonic() - killed_at
        execution = job["summary"]["report"]["execution"]
        assert execution["mode"] == "sequential", execution
        # The killed attempt made `done` states complete (more may have landed before the kill took).
        resumed = execution["resumed_at_block"]
        assert resumed is not None and done - 1 <= resumed < blocks, (done, execution)
        # Removed by the worker right after it recorded the outcome.
        wait_for(lambda: not (serve.data / "scratch" / job_id).exists(), 30, "the job's scratch to go", 0.2)

    record(
        suite="faults",
        scenario="embedded: kill -9 of a sequential job's worker mid-capture",
        runs=1,
        outcomes={
            "succeeded": 1,
            "attempts": 2,
            "states complete when killed": done,
            "attempt 2 resumed the capture at block": resumed,
            "blocks": blocks,
            "block loads, whole job": execution["block_loads"],
            "scratch removed": True,
        },
        data_lost=0,
        command=COMMAND.format("sequential_capture"),
        notes=(
            "lorp serve, embedded; a job with options.execution sequential on mid-llama (8 blocks), 96 calibration "
            "windows; its worker's process group killed once the capture's manifest in the job's scratch "
            "(LORP_DATA_DIR/scratch/<job id>) counted at least 3 complete states. The restarted worker's attempt "
            "found them and went on from the last complete state instead of from block 0."
        ),
        figures={"kill_to_succeeded_s": round(finished_s, 1)},
    )


@pytest.mark.long  # minutes: make reliability records it; tests/service/test_serve_lifecycle.py checks the kill
@pytest.mark.parametrize("how", ["kill -9", "SIGTERM, then kill -9 3 s later"])
def test_embedded_serve_killed_mid_job_leaves_no_worker_and_a_restart_finishes_it(
    tmp_path: Path, capture_model_root: Path, corpus_bytes: bytes, how: str
) -> None:
    """lorp serve dies while its worker captures (outright, or during the warm shutdown that waits for the
    job): every process of the worker goes with it, and a serve started again on the same data folder is
    the only one to run jobs; the reconciler takes the job back and it finishes there, attempts 2."""
    model = str(capture_model_root / "mid-llama")
    serve = Serve(tmp_path, capture_model_root)
    tree: list[psutil.Process] = []
    try:
        serve.up()
        uploaded = serve.client.post("/v1/datasets", files={"file": ("corpus.txt", corpus_bytes, "text/plain")})
        assert uploaded.status_code == 201, uploaded.text
        job_id, tries = _a_job_in_capture(serve, model, uploaded.json()["id"])
        tree = psutil.Process(serve.proc.pid).children(recursive=True)
        if how != "kill -9":
            serve.proc.send_signal(signal.SIGTERM)
            time.sleep(3)
            assert serve.proc.poll() is None, "serve was expected to wait for its worker's warm shutdown"
        killed_at = time.monotonic()
        serve.proc.kill()
        serve.proc.wait(timeout=10)

        def all_gone() -> bool:
            return all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in tree)

        wait_for(all_gone, 60, "every worker process to go with serve", 0.05)
        gone_s = time.monotonic() - killed_at
    finally:
        serve.client.close()
        for p in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
    serve.log_path.rename(tmp_path / "serve-killed.log")

    with serving(tmp_path, capture_model_root) as again:
        restarted_at = time.monotonic()
        job = _succeeded_on_attempt_2(again, job_id, "the job on the restarted serve")
        finished_s = time.monotonic() - restarted_at
        assert len(again.worker_pids()) == 1, "one worker runs jobs after the restart"
        stored = sorted(
            str(p.relative_to(again.data / "artifacts" / "jobs" / job_id))
            for p in (again.data / "artifacts" / "jobs" / job_id).rglob("*")
            if p.is_file()
        )
        names = sorted(a["name"] for a in again.client.get(f"/v1/jobs/{job_id}/artifacts").json())
        assert stored == names, "the files under the job's folder differ from its artifact rows"

    record(
        suite="faults",
        scenario=f"embedded: lorp serve killed mid-job ({how})",
        runs=1,
        outcomes={
            "worker processes left after serve died": 0,
            "restarted serve": f"one worker; the job succeeded there, attempts {job['attempts']}",
            "artifact_sets": 1,
            "missed_stage_retries": len(tries),
        },
        data_lost=0,
        command=COMMAND.format("serve_killed_mid_job"),
        notes=(
            f"lorp serve in the embedded mode, a job caught in capture, then {how} of serve. Its worker asked "
            "the kernel for SIGKILL at serve's death, and each of the fork server's reapers kills its pool "
            "process when the worker's main process dies: the whole tree goes at once, nothing waits for the "
            "job. A serve started again on the same data folder took the job back (heartbeat timeout 4 s) "
            "and finished it."
        ),
        figures={
            "serve_killed_to_every_worker_process_gone_s": round(gone_s, 2),
            "restart_to_succeeded_s": round(finished_s, 1),
        },
    )


def test_embedded_crash_loop_stops_the_restarts_and_turns_readyz_503(tmp_path: Path, capture_model_root: Path) -> None:
    limit = 3
    with serving(tmp_path, capture_model_root, LORP_WORKER_RESTART_LIMIT=str(limit)) as serve:
        killed: list[int] = []
        started = time.monotonic()

        def given_up() -> bool:
            for pid in serve.worker_pids():
                if pid not in killed:
                    serve.kill_worker(pid)  # each worker dies as soon as it appears
                    killed.append(pid)
            return "not restarting it" in serve.log()

        wait_for(given_up, 120, "serve to give up on its worker", 0.1)
        gave_up_s = time.monotonic() - started
        time.sleep(1.5)  # no further restart comes
        assert serve.worker_pids() == [], serve.worker_pids()
        assert len(killed) == limit, killed
        ready = serve.client.get("/readyz")
        assert ready.status_code == 503, ready.text
        problem = ready.json()
        assert [e["field"] for e in problem["errors"]] == ["workers"], problem
        assert f"the embedded worker is down: the worker exited {limit} times in a row" in problem["detail"]
        assert problem["checks"]["workers"]["restarts"] == limit - 1
        metrics = serve.client.get("/metrics").text
        assert "lorp_embedded_worker_up 0.0" in metrics
        assert f"lorp_embedded_worker_restarts_total {float(limit - 1)}" in metrics
        assert serve.client.get("/healthz").status_code == 200  # the API itself lives on
    assert serve.proc.returncode == 0, serve.log()[-3000:]

    record(
        suite="faults",
        scenario="embedded: the worker dies at once, again and again",
        runs=1,
        outcomes={
            "worker processes started": len(killed),
            "restarts": limit - 1,
            "then": "not restarted; /readyz 503 naming workers; lorp_embedded_worker_up 0",
            "lorp serve": "kept serving; exited 0 on SIGTERM",
        },
        data_lost=0,
        command=COMMAND.format("crash_loop"),
        notes=(
            f"LORP_WORKER_RESTART_LIMIT={limit}: every worker process serve started was killed (kill -9 of its "
            "group) as soon as it appeared; the waits between restarts doubled (1 s, 2 s) and after the third quick "
            "death serve stopped restarting and said why, in its log and in /readyz."
        ),
        figures={"first_start_to_given_up_s": round(gave_up_s, 1)},
    )


# -- full stack -----------------------------------------------------------------------------------------


# minutes: make reliability records it; make test checks each readiness rule against the workers table
# (tests/service/test_workers_liveness.py) and real workers in the end-to-end tests
@pytest.mark.long
def test_full_stack_no_worker_is_503_until_a_worker_starts(
    tmp_path: Path,
    pg_url: str,
    reliability_redis_url: str,
    s3_server: str,
    capture_model_root: Path,
    corpus_bytes: bytes,
) -> None:
    timings = {k.removeprefix("LORP_").lower(): float(v) for k, v in FAST_ENV.items()}
    settings: Settings = stack_settings(
        tmp_path, pg_url, reliability_redis_url, s3_server, capture_model_root, **timings
    )
    queue = settings.queue_name
    model = str(capture_model_root / "mid-llama")
    with fleet_of(settings, tmp_path) as fleet, TestClient(create_app(settings)) as client:
        uploaded = client.post("/v1/datasets", files={"file": ("corpus.txt", corpus_bytes, "text/plain")})
        assert uploaded.status_code == 201, uploaded.text
        dataset = uploaded.json()["id"]

        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text  # nothing queued: no worker is not an error
        job_id = client.post("/v1/jobs", json=_job_body(model, dataset, seed=900)).json()["id"]
        not_ready = client.get("/readyz")
        assert not_ready.status_code == 503, not_ready.text
        assert [e["field"] for e in not_ready.json()["errors"]] == ["workers"]
        assert not_ready.json()["checks"]["workers"]["queued"][queue] == 1
        waiting = client.get(f"/v1/jobs/{job_id}").json()
        assert waiting["status"] == "queued" and waiting["waiting_for"] == "worker", waiting

        started = time.monotonic()
        worker = fleet.start_worker("w1", wait=False)
        wait_for(lambda: client.get("/readyz").status_code == 200, 120, "readyz 200 once the worker is up", 0.1)
        to_ready_s = time.monotonic() - started
        assert client.get("/readyz").json()["checks"]["workers"]["live"][queue] == 1
        wait_for(lambda: client.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded", 180, "the job", 0.2)
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["attempts"] == 1 and job["waiting_for"] is None

        # A warm stop says so at once: the next queued job waits for a worker, seen a moment ago.
        worker.stop()
        stopped_at = time.monotonic()
        second = client.post("/v1/jobs", json=_job_body(model, dataset, seed=901)).json()["id"]
        shown = client.get(f"/v1/jobs/{second}").json()
        warm_noticed_s = time.monotonic() - stopped_at
        assert shown["waiting_for"] == "worker" and shown["worker_unseen_s"] is not None, shown
        assert shown["worker_unseen_s"] < 30
        assert client.get("/readyz").status_code == 503

        # kill -9: the row is not closed, so it counts until its beats are LORP_WORKER_TIMEOUT_S old.
        w2 = fleet.start_worker("w2", wait=False)
        wait_for(lambda: client.get(f"/v1/jobs/{second}").json()["status"] == "succeeded", 180, "job 2", 0.2)
        third = client.post("/v1/jobs", json=_job_body(model, dataset, seed=902)).json()["id"]
        w2.wait_ready()
        w2.kill_hard()
        killed_at = time.monotonic()
        # Job 3 may be claimed by w2 before the kill; either way the reconciler or the next worker handles it.
        wait_for(
            lambda: client.get("/readyz").json()["checks"]["workers"]["live"][queue] == 0,
            30,
            "the killed worker to stop counting",
            0.1,
        )
        kill_noticed_s = time.monotonic() - killed_at
        assert kill_noticed_s < settings.worker_timeout_s + 5
        fleet.start_worker("w3")
        # Job 3's message was most likely prefetched by w2 (prefetch 1) and died with it: the reconciler
        # sends it again once w2 counts as dead, well before LORP_QUEUED_TIMEOUT_S (900 s).
        wait_for(lambda: client.get(f"/v1/jobs/{third}").json()["status"] == "succeeded", 240, "job 3", 0.2)
        third_s = time.monotonic() - killed_at
        third_job = client.get(f"/v1/jobs/{third}").json()
        assert client.get("/readyz").status_code == 200, fleet.logs()

    record(
        suite="faults",
        scenario="full stack: jobs queued with no worker running",
        runs=1,
        outcomes={
            "/readyz with nothing queued and no worker": 200,
            "/readyz with a job queued and no worker": "503, failing check: workers",
            "queued job": 'waiting_for: "worker"',
            "worker started later": "took the job (attempts 1), /readyz 200",
            "warm stop": "no longer counted at once (the row says stopped)",
            "kill -9": f"no longer counted after LORP_WORKER_TIMEOUT_S={settings.worker_timeout_s:g} s",
            "job sent just before the kill": f"succeeded on the next worker, attempts {third_job['attempts']}",
        },
        data_lost=0,
        command=COMMAND.format("full_stack"),
        notes=(
            "Postgres, Redis and moto's S3 server; the API in-process (TestClient on create_app), workers as real "
            "celery processes that beat every 0.5 s. A job submitted just before the kill -9 was held (prefetched) "
            "by the killed worker; the reconciler sent it again once that worker counted as dead. Each figure is "
            "measured from the event to the first answer that showed it."
        ),
        figures={
            "worker_start_to_readyz_200_s": round(to_ready_s, 1),
            "warm_stop_to_waiting_for_worker_s": round(warm_noticed_s, 2),
            "kill9_to_not_counted_s": round(kill_noticed_s, 1),
            "kill9_to_that_job_succeeded_s": round(third_s, 1),
        },
    )


def test_full_stack_a_pool_child_stuck_before_its_job_starts_is_replaced(
    tmp_path: Path,
    pg_url: str,
    reliability_redis_url: str,
    s3_server: str,
    tiny_model_root: Path,
    corpus_bytes: bytes,
) -> None:
    """A pool child takes a job and hangs before starting it: its claim waits on the job's row, which this
    test holds locked (as a hung database connect or an inherited lock would hold a child). The worker
    kills the child after LORP_JOB_START_TIMEOUT_S, the job goes back to the queue, /readyz and /metrics
    say the worker is stuck while it lasts, and once the row is free a fresh child runs the job."""
    timings = {k.removeprefix("LORP_").lower(): float(v) for k, v in FAST_ENV.items()}
    settings: Settings = stack_settings(
        tmp_path,
        pg_url,
        reliability_redis_url,
        s3_server,
        tiny_model_root,
        **{**timings, "job_start_timeout_s": 3.0},
    )
    queue = settings.queue_name
    dataset = upload_dataset(settings, corpus_bytes)
    engine = create_engine(settings.sqlalchemy_url)
    with fleet_of(settings, tmp_path) as fleet, TestClient(create_app(settings)) as client:
        worker = fleet.start_worker("w1")
        job_id = create_job(settings, job_request(str(tiny_model_root / "tiny-llama"), dataset, num_samples=4))
        lock = engine.connect()
        held = lock.begin()
        lock.execute(text("SELECT id FROM jobs WHERE id = :id FOR UPDATE"), {"id": job_id})
        enqueue_job(job_id, settings)
        sent = time.monotonic()
        wait_for(lambda: "has not started it; killing the child" in worker.log(), 60, "the stuck start found", 0.1)
        found_s = time.monotonic() - sent

        ready = client.get("/readyz")
        assert ready.status_code == 503, ready.text
        workers = ready.json()["checks"]["workers"]
        assert [e["field"] for e in ready.json()["errors"]] == ["workers"]
        (stuck,) = workers["stuck"]
        assert stuck["name"].startswith("w1@") and stuck["stuck_starts"] >= 1
        assert f"took job {job_id}" in stuck["detail"] and "LORP_JOB_START_TIMEOUT_S" in ready.json()["detail"]
        metrics = client.get("/metrics").text
        assert f'lorp_workers_stuck{{queue="{queue}"}} 1.0' in metrics, metrics
        shown = client.get(f"/v1/jobs/{job_id}").json()
        assert shown["status"] == "queued" and shown["waiting_for"] == "worker", shown

        held.rollback()
        lock.close()
        released = time.monotonic()
        wait_for(lambda: load_job(settings, job_id).status.terminal, 120, "the job on a fresh child", 0.1)
        ran_s = time.monotonic() - released
        job = load_job(settings, job_id)
        assert job.status == JobStatus.succeeded, (job.error_code, job.error_message, fleet.logs())
        assert job.attempts == 1, "the stuck children never claimed it"
        wait_for(lambda: client.get("/readyz").status_code == 200, 30, "the worker no longer stuck", 0.2)
        assert "stuck" not in client.get("/readyz").json()["checks"]["workers"]
        metrics = client.get("/metrics").text
        assert f'lorp_workers_stuck{{queue="{queue}"}} 0.0' in metrics
        starts = re.search(rf'lorp_worker_stuck_starts{{queue="{queue}"}} (\S+)', metrics)
        assert starts is not None and float(starts.group(1)) >= 1
        assert worker.alive and "no longer stuck" in worker.log()
        killed = worker.log().count("has not started it; killing the child")
    engine.dispose()

    record(
        suite="faults",
        scenario="full stack: a pool child hangs before its job starts",
        runs=1,
        outcomes={
            "stuck children killed": killed,
            "job": f"succeeded on a fresh child, attempts {job.attempts}",
            "/readyz while stuck": "503 naming workers, checks.workers.stuck lists the worker",
            "lorp_workers_stuck while stuck": 1,
            "/readyz after a job started": 200,
        },
        data_lost=0,
        command=COMMAND.format("stuck_before"),
        notes=(
            "LORP_JOB_START_TIMEOUT_S=3: the test holds the job's row locked (SELECT ... FOR UPDATE) before the "
            "message is sent, so the pool child's claim waits, as a child holding an inherited lock or a hung "
            "connect would. The worker's main process finds the child past the bound at its next liveness beat, "
            "kills it, Celery hands the message back and forks a fresh child (a child that took it again while "
            "the row was still locked was killed the same way); once the lock is released the job runs once."
        ),
        figures={"sent_to_child_killed_s": round(found_s, 1), "released_to_succeeded_s": round(ran_s, 1)},
    )
