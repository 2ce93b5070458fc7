"""Bad webhook receivers beside good ones, with real processes: `lorp serve --no-worker` (the API, the
reconciler and the webhook dispatcher) on a Postgres database of its own, Redis, three `celery worker`
processes, and receivers on loopback (tests/service/receivers.py).

1. The figure: a receiver that trickles its answer, one that hangs, one that answers 200 MB, and a job
   whose URL is bad (a control character, as a row stored before URLs were checked), among ten jobs
   with good receivers. Every good delivery arrives within one reconciler interval of its job's end;
   the kill -9 recovery time (a worker killed mid-job, its job requeued) is the same with the bad
   receivers present as without.
2. Hostile URLs and receivers, against the same stack: what each answers (a 422 naming notify.url,
   or the delivery's recorded attempt), asserted and recorded as a hostile scenario row.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, update

from app.core.config import Settings
from app.db.migrate import upgrade_head
from app.db.models import Job, JobEvent, JobStatus, WebhookDelivery
from app.db.session import session_factory, session_scope
from tests.reliability.record import record
from tests.service.conftest import create_test_database, drop_test_database
from tests.service.receivers import Receiver, closed_port
from worker.webhooks import deliver_due

from .conftest import RELIABILITY_REDIS_URL, job_request, job_rows, save_llama, save_mid_llama
from .servers import Processes, cheap_job, service_env, start_api, start_worker, upload_corpus, wait_until

pytestmark = pytest.mark.reliability

COMMAND = ".venv/bin/python -m pytest tests/reliability/test_webhook_receivers.py -q"
RECONCILE_INTERVAL_S = 2.0
DEADLINE_S = 5.0
HEARTBEAT_TIMEOUT_S = 4.0
GOOD = 10
WORKERS = ("w1", "w2", "w3")
SETTINGS = {
    "heartbeat_interval_s": 0.5,
    "heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S,
    "reconcile_interval_s": RECONCILE_INTERVAL_S,
    "progress_min_interval_s": 0,
    "worker_beat_interval_s": 0.5,
    "worker_timeout_s": 3,
    "webhook_timeout_s": DEADLINE_S,
    "webhook_retry_base_s": 1,
    "webhook_allowed_hosts": '["localhost:*", "169.254.169.254", "10.0.0.1", "[::1]:*"]',
    "webhook_allowed_networks": '["127.0.0.0/8"]',
}
SECRET = "s3cret-for-the-reliability-webhooks"
# What the figure's run saw of each bad receiver, for the hostile row.
_OBSERVED: dict[str, str] = {}


class Stack:
    """The processes and the database of one module; workers by name, each in its own process group."""

    def __init__(self, folder: Path, model_root: Path) -> None:
        self.folder = folder
        self.model_root = model_root
        self.db_url = create_test_database("lorp_rel_webhooks")
        self.procs = Processes(folder / "logs")
        self.env = service_env(
            folder / "data", model_root, database_url=self.db_url, broker_url=RELIABILITY_REDIS_URL, **SETTINGS
        )
        self.settings = Settings(database_url=self.db_url, data_dir=folder / "data")
        self.base = ""
        self.dataset = ""
        self.workers: dict[str, Any] = {}
        self.client = httpx.Client(timeout=30)

    def start(self) -> None:
        self.base = start_api(self.procs, self.env)
        self.client = httpx.Client(base_url=self.base, timeout=30)
        for name in WORKERS:  # one is killed for each of the two recovery figures
            self.start_worker(name)
        for name in WORKERS:
            self.wait_ready(name)

    def start_worker(self, name: str) -> None:
        self.workers[name] = start_worker(self.procs, self.env, name=name)

    def wait_ready(self, name: str) -> None:
        wait_until(f"worker {name} ready", lambda: " ready." in self.procs.log(name), 120)

    def kill(self, name: str) -> dt.datetime:
        """kill -9 of the worker's process group (its main process and pool child); returns when."""
        at = dt.datetime.now(dt.UTC)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.workers[name].pid, signal.SIGKILL)
        self.workers[name].wait(timeout=30)
        return at

    def submit(self, body: dict[str, Any]) -> str:
        response = self.client.post("/v1/jobs", json=body)
        assert response.status_code == 202, response.text
        return str(response.json()["id"])

    def job(self, job_id: str) -> dict[str, Any]:
        data: dict[str, Any] = self.client.get(f"/v1/jobs/{job_id}").json()
        return data

    def deliveries(self, job_id: str) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = self.client.get(f"/v1/jobs/{job_id}/deliveries").json()
        return data

    def requeued_at(self, job_id: str) -> dt.datetime | None:
        with session_scope(session_factory(self.db_url)) as session:
            query = select(JobEvent.at).where(JobEvent.job_id == uuid.UUID(job_id), JobEvent.kind == "attempt")
            return session.scalars(query.order_by(JobEvent.at)).first()

    def stop(self) -> None:
        self.client.close()
        self.procs.stop()
        drop_test_database(self.db_url)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("webhook-models")
    save_llama(root, "tiny-llama", tiny_tokenizer)
    save_mid_llama(root, tiny_tokenizer)  # its capture lasts long enough to be caught and killed
    stack = Stack(tmp_path_factory.mktemp("webhook-stack"), root)
    try:
        stack.start()
        stack.dataset = upload_corpus(stack.client)
        yield stack
    finally:
        stack.stop()


def _notify(url: str) -> dict[str, str]:
    return {"url": url, "secret": SECRET}


def _cheap(stack: Stack, seed: int, url: str | None = None) -> dict[str, Any]:
    body = cheap_job(stack.model_root / "tiny-llama", stack.dataset, seed=seed)
    if url is not None:
        body["notify"] = _notify(url)
    return body


def _kill_recovery(stack: Stack, seed: int, then: Callable[[], object] = lambda: None) -> tuple[float, str]:
    """A long job killed -9 in its worker while it runs: seconds from the kill to its requeue. The job
    is then cancelled (running it again is other suites' figure)."""
    body = job_request(
        str(stack.model_root / "mid-llama"),
        stack.dataset,
        num_samples=8,
        batch_size=1,
        seed=seed,
        eval_windows=1,
        perplexity=False,
    ).model_dump(mode="json")
    body["evaluation"]["prompts"] = []
    body["evaluation"]["curve_budgets"] = []
    job_id = stack.submit(body)
    then()  # more jobs, queued behind this one

    def running() -> str | None:  # the node name of the worker running it ("w1@host")
        with session_scope(session_factory(stack.db_url)) as session:
            job = session.get(Job, uuid.UUID(job_id))
            return job.worker if job is not None and job.status == JobStatus.running else None

    worker = wait_until("the long job running", running, 120, 0.05).split("@", 1)[0]
    killed_at = stack.kill(worker)
    requeued = wait_until("the requeue", lambda: stack.requeued_at(job_id), 60, 0.1)
    assert stack.client.post(f"/v1/jobs/{job_id}/cancel").status_code in (200, 202)
    return round((requeued - killed_at).total_seconds(), 2), job_id


def _finished(stack: Stack, job_ids: list[str], timeout: float = 240) -> dict[str, dict[str, Any]]:
    def all_final() -> dict[str, dict[str, Any]] | None:
        jobs = {j: stack.job(j) for j in job_ids}
        return jobs if all(v["status"] in ("succeeded", "failed", "cancelled") for v in jobs.values()) else None

    try:
        return wait_until("the jobs to finish", all_final, timeout, 0.3)
    except TimeoutError as exc:
        states = {j: stack.job(j)["status"] for j in job_ids}
        raise TimeoutError(f"{exc}: {states}\n{stack.procs.logs()}") from None


def _count_jobs(stack: Stack) -> int:
    with session_scope(session_factory(stack.db_url)) as session:
        return int(session.scalar(select(func.count()).select_from(Job)) or 0)


def _at(value: str) -> float:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


@pytest.mark.long  # a figure of minutes: make reliability records it; each receiver alone is tests/service's
def test_bad_receivers_delay_neither_good_deliveries_nor_recovery(stack: Stack) -> None:
    started = time.monotonic()
    baseline_s, baseline_job = _kill_recovery(stack, 100)  # two workers left

    bad = {
        "trickle": Receiver("trickle", interval=1.0),
        "hang": Receiver("hang"),
        "200 MB": Receiver("huge"),
    }
    good = Receiver()
    try:
        bad_jobs = {
            name: stack.submit(_cheap(stack, 200 + n, r.url(host="localhost")))
            for n, (name, r) in enumerate(bad.items())
        }
        # A row stored before URLs were checked: a control character, set while the job is still queued.
        bad_url_job = stack.submit(_cheap(stack, 210, f"http://localhost:{closed_port()}/x"))
        with session_scope(session_factory(stack.db_url)) as session:
            session.execute(
                update(Job).where(Job.id == uuid.UUID(bad_url_job)).values(notify_url="http://localhost:1/\x01hook")
            )
        bad_jobs["bad URL (U+0001)"] = bad_url_job
        _finished(stack, list(bad_jobs.values()))
        # The bad deliveries now take the dispatcher's time (5 s deadlines, retried every few seconds):
        # a worker is killed while they fail, and the good jobs run on the one left.
        good_jobs: list[str] = []
        with_bad_s, with_bad_job = _kill_recovery(
            stack,
            300,
            then=lambda: good_jobs.extend(
                stack.submit(_cheap(stack, 400 + n, good.url(f"/good/{n}", host="localhost"))) for n in range(GOOD)
            ),
        )
        finished = _finished(stack, good_jobs)
        wait_until("every good delivery", lambda: len(good.received) >= GOOD, 60, 0.2)
        bad_rows = {name: stack.deliveries(job_id) for name, job_id in bad_jobs.items()}
        huge_sent = bad["200 MB"].sent
    finally:
        for r in (*bad.values(), good):
            r.close()
    elapsed = round(time.monotonic() - started, 1)

    arrivals = {h[":request-line"].split()[1]: at for at, h, _ in good.received}
    delays = []
    for n, job_id in enumerate(good_jobs):
        job = finished[job_id]
        assert job["status"] == "succeeded", job
        delays.append(round(arrivals[f"/good/{n}"] - _at(job["finished_at"]), 2))
        assert [(d["attempt"], d["delivered"]) for d in stack.deliveries(job_id)] == [(1, True)]
    assert len(good.received) == GOOD  # each good webhook once
    assert max(delays) <= RECONCILE_INTERVAL_S, delays
    no_answer = f"no HTTP answer within {DEADLINE_S:g} s"
    for name in ("trickle", "hang"):
        assert bad_rows[name] and all(d["error"] == no_answer for d in bad_rows[name]), bad_rows[name]
        assert all(d["duration_ms"] == DEADLINE_S * 1000 for d in bad_rows[name]), bad_rows[name]
    assert [(d["status_code"], d["delivered"]) for d in bad_rows["200 MB"]] == [(200, True)]
    assert bad_rows["200 MB"][0]["duration_ms"] < 2000 and huge_sent < 64 * 1024 * 1024, (bad_rows, huge_sent)
    assert [d["error"] for d in bad_rows["bad URL (U+0001)"]] == [
        "not attempted: the URL is not one this service may call (any more)"
    ]
    # Recovery: the heartbeat timeout plus at most a reconciler interval, bad receivers or not.
    assert baseline_s <= HEARTBEAT_TIMEOUT_S + RECONCILE_INTERVAL_S + 2, baseline_s
    assert with_bad_s <= baseline_s + RECONCILE_INTERVAL_S + 1, (baseline_s, with_bad_s)
    for job_id in (baseline_job, with_bad_job):
        final = _finished(stack, [job_id])[job_id]
        assert final["status"] in ("cancelled", "succeeded") and final["attempts"] <= 2, final
    for name in ("trickle", "hang"):
        _OBSERVED[f"receiver that {'trickles its status line' if name == 'trickle' else 'hangs'}"] = (
            f"cut at the deadline: {len(bad_rows[name])} attempts, each '{no_answer}', {DEADLINE_S * 1000:.0f} ms"
        )
    _OBSERVED["receiver that answers 200 MB"] = (
        f"HTTP 200 in {bad_rows['200 MB'][0]['duration_ms']:.0f} ms; it got {huge_sent / 2**20:.0f} MiB out, none read"
    )
    _OBSERVED["a stored URL with U+0001 among good ones"] = "given up, recorded 'not attempted'; the ten good delivered"

    record(
        suite="faults",
        scenario="webhook receivers that trickle, hang and answer 200 MB, and a bad URL, among ten good",
        runs=1,
        outcomes={
            "good_deliveries_on_time": f"{sum(d <= RECONCILE_INTERVAL_S for d in delays)}/{GOOD}",
            "good_delivered_once_each": True,
            "trickle": f"{len(bad_rows['trickle'])} attempts, each '{no_answer}'",
            "hang": f"{len(bad_rows['hang'])} attempts, each '{no_answer}'",
            "200 MB answer": f"HTTP 200 in {bad_rows['200 MB'][0]['duration_ms']:.0f} ms, body not read",
            "bad URL (U+0001)": "given up at once, recorded: not attempted",
            "killed jobs requeued": 2,
        },
        data_lost=0,
        command=COMMAND + " -k bad_receivers",
        notes=(
            "lorp serve --no-worker (API, reconciler, webhook dispatcher) on Postgres, Redis, three celery "
            "workers (one killed for each recovery figure); "
            f"reconciler interval {RECONCILE_INTERVAL_S:g} s, heartbeat timeout {HEARTBEAT_TIMEOUT_S:g} s, webhook "
            f"deadline {DEADLINE_S:g} s (retries from 1 s, doubling). Delay: the receiver's arrival time minus the "
            "job's finished_at. Recovery: kill -9 of the worker running a long job, to the job's requeue event, "
            "once before the bad receivers existed and once while their deliveries were failing and retried "
            "(each killed job then cancelled)."
        ),
        figures={
            "good_delivery_delay_s": sorted(delays),
            "good_delivery_delay_max_s": max(delays),
            "kill_to_requeue_s (without bad receivers)": baseline_s,
            "kill_to_requeue_s (with bad receivers)": with_bad_s,
            "bytes the 200 MB receiver got out": huge_sent,
            "whole_scenario_s": elapsed,
        },
    )


def test_hostile_webhook_urls_and_receivers(stack: Stack, tmp_path: Path) -> None:
    started = time.monotonic()
    outcomes: dict[str, str] = {}

    def submit(url: str, secret: str = SECRET) -> httpx.Response:
        return stack.client.post("/v1/jobs", json={**_cheap(stack, 500), "notify": {"url": url, "secret": secret}})

    jobs_before = _count_jobs(stack)

    def refused(case: str, url: str, secret: str = SECRET, field: str = "notify.url") -> None:
        response = submit(url, secret)
        assert response.status_code == 422, (case, response.text)
        fields = [e["field"] for e in response.json()["errors"]]
        assert field in fields, (case, response.json())
        message = next(e["message"] for e in response.json()["errors"] if e["field"] == field)
        outcomes[case] = f"422 {field}: {message[:110]}"

    refused("notify.url with U+0001", "http://localhost:9/\x01hook")
    refused("notify.url with U+007F", "http://localhost:9/hook\x7f")
    refused("notify.url with NUL", "http://localhost:9/hook\x00")
    refused("notify.url with a C1 control (U+0085)", "http://localhost:9/\x85")
    refused("notify.url with a space", "http://localhost:9/a b")
    refused("notify.url with credentials", "http://user:pw@localhost:9/hook")
    refused("notify.url host not a valid name (127.1)", "http://127.1/hook")
    refused("notify.url port not allowed (host without a port)", "http://169.254.169.254:8080/")
    refused("notify.url cloud metadata address (allowed as a host)", "http://169.254.169.254/latest/meta-data/")
    refused("notify.url private address (allowed as a host)", "http://10.0.0.1/hook")
    refused("notify.url IPv6 loopback (allowed as a host)", "http://[::1]:9/hook")
    refused("notify.secret with NUL", "http://localhost:9/hook", secret=SECRET + "\x00", field="notify.secret")

    with Receiver(statuses=(500,), body=b"<h1>internal admin</h1> password: hunter2") as page:
        job_id = stack.submit(_cheap(stack, 501, page.url(host="localhost")))
        _finished(stack, [job_id])
        rows = wait_until("an attempt", lambda: [d for d in stack.deliveries(job_id) if d["error"]], 30, 0.2)
        shown = stack.client.get(f"/v1/jobs/{job_id}/deliveries").text
    assert rows[0]["error"] == "HTTP 500" and "hunter2" not in shown and "internal admin" not in shown
    outcomes["receiver answers 500 with an internal page"] = (
        "attempt recorded 'HTTP 500'; nothing of the body stored or shown"
    )

    # The dispatcher without LORP_WEBHOOK_ALLOWED_NETWORKS (on a database of its own: the stack's
    # dispatcher allows loopback): localhost is an allowed name, but it resolves to loopback.
    settings = Settings(
        data_dir=tmp_path / "data",
        webhook_allowed_hosts=["localhost:*"],
        webhook_timeout_s=2,
        webhook_retry_base_s=3600,
    )
    upgrade_head(settings.sqlalchemy_url)
    with Receiver() as internal, session_scope(session_factory(settings.sqlalchemy_url)) as session:
        job = Job(
            request={}, request_hash="0" * 64, model_source="demo", method="lorp", queue="q", status=JobStatus.failed,
            finished_at=dt.datetime.now(dt.UTC), notify_url=internal.url(host="localhost"), notify_secret=SECRET,
        )  # fmt: skip
        session.add(job)
        session.commit()
        deliver_due(settings)
        connections = internal.connections
    rows = job_rows(settings, WebhookDelivery, job.id)
    assert [d.error for d in rows] == ["address not allowed"] and connections == 0
    outcomes["allowed host name resolving to loopback, no allowed networks"] = (
        "attempt recorded 'address not allowed'; no connection made"
    )
    assert _count_jobs(stack) == jobs_before + 1  # the refused submissions left no row; one job ran
    outcomes.update(_OBSERVED)

    record(
        suite="hostile",
        scenario="hostile: webhook URLs and receivers",
        runs=len(outcomes),
        outcomes=dict(sorted(outcomes.items())),
        data_lost=0,
        command=COMMAND,
        notes=(
            "submissions against lorp serve --no-worker on Postgres (allowed hosts: localhost:*, 169.254.169.254, "
            "10.0.0.1, [::1]:*; allowed networks: 127.0.0.0/8); receivers on loopback; a refused submission "
            "leaves no job row"
        ),
        figures={"cases": len(outcomes), "seconds": round(time.monotonic() - started, 1)},
    )
