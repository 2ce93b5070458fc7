"""Webhooks with a real receiver on loopback: signed deliveries of a job's final state, retried until the
receiver recovers, every attempt visible at /v1/jobs/{id}/deliveries; hosts an operator did not allow
are refused at submission, and the secret is never shown back."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from app.core.config import Settings
from app.db.models import Job, JobStatus
from app.db.session import session_factory, session_scope
from lorp_client import Client
from lorp_client.webhooks import SignatureError, sign, verify
from worker.webhooks import deliver_due

from .api_helpers import DEMO_JOB, assert_problem, client_for
from .stack import embedded_stack

SECRET = "s3cret-for-the-webhook-tests"


class Receiver:
    """An HTTP server on loopback that answers ``fail_first`` requests with 500, then 200, keeping each one."""

    def __init__(self, fail_first: int = 1) -> None:
        self.fail_first = fail_first
        self.received: list[tuple[dict[str, str], bytes, int]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                status = 500 if len(outer.received) < outer.fail_first else 200
                outer.received.append((dict(self.headers), body, status))
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/lorp"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def receiver() -> Iterator[Receiver]:
    r = Receiver(fail_first=1)
    yield r
    r.close()


@pytest.fixture(scope="module")
def embedded(
    tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any, request: pytest.FixtureRequest
) -> Iterator[dict[str, Any]]:
    env = {
        "LORP_WEBHOOK_ALLOWED_HOSTS": '["127.0.0.1"]',
        "LORP_WEBHOOK_RETRY_BASE_S": "0.5",
        "LORP_RECONCILE_INTERVAL_S": "1",
    }
    with embedded_stack(tmp_path_factory, tiny_tokenizer, request, "webhooks", **env) as stack:
        yield stack


def test_a_job_notifies_its_webhook_signed_and_retries_until_delivered(
    embedded: dict[str, Any], receiver: Receiver
) -> None:
    body = {
        "model": {"id": embedded["model"]},
        "method": "lorp",
        "target": {"num_layers": 1},
        "calibration": {"dataset": "builtin", "num_samples": 4, "seq_len": 32, "batch_size": 2},
        "evaluation": {"max_windows": 1, "speed": False, "prompts": [], "curve_budgets": []},
        "notify": {"url": receiver.url, "secret": SECRET},
    }
    with Client(embedded["base"]) as client:
        job = client.wait(client.submit(body).id, timeout=240, poll_interval=0.2)
        assert job.status == "succeeded", (job.error, embedded["procs"].logs())
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(d.delivered for d in client.deliveries(job.id)):
            time.sleep(0.2)
        deliveries = client.deliveries(job.id)
        shown = client.get(job.id)
    assert [(d.attempt, d.status_code, d.delivered) for d in deliveries] == [(1, 500, False), (2, 200, True)]
    assert {d.event for d in deliveries} == {"job.succeeded"} and deliveries[0].error.startswith("HTTP 500")
    assert shown.notify_url == receiver.url and shown.notified_at is not None
    assert "notify" not in shown.request and SECRET not in shown.model_dump_json()  # the secret never comes back

    assert len(receiver.received) == 2
    ids = set()
    for headers, raw, _status in receiver.received:
        verify(SECRET, raw, headers["Lorp-Signature"])
        payload = json.loads(raw)
        assert payload["event"] == "job.succeeded" == headers["Lorp-Event"]
        assert payload["job"]["id"] == str(job.id) and payload["job"]["status"] == "succeeded"
        assert payload["job"]["summary"]["pruned_layers"] == job.summary.pruned_layers
        ids.add(headers["Lorp-Delivery"])
    assert len(ids) == 1  # the same delivery id on a retry: receivers can drop repeats
    headers, raw, _ = receiver.received[0]
    with pytest.raises(SignatureError):
        verify("another-secret-of-some-length", raw, headers["Lorp-Signature"])
    with pytest.raises(SignatureError):
        verify(SECRET, raw + b" ", headers["Lorp-Signature"])
    with pytest.raises(SignatureError):
        verify(SECRET, raw, sign(SECRET, raw, timestamp=int(time.time()) - 3600))  # too old: a replay


def test_webhook_urls_are_checked_at_submission(api_settings: Settings, rollback_sessionmaker: Any) -> None:
    off = client_for(api_settings, rollback_sessionmaker)
    job = {**DEMO_JOB, "notify": {"url": "http://127.0.0.1:9/hook", "secret": SECRET}}
    body = assert_problem(off.post("/v1/jobs", json=job), 422, "notify.url")
    assert "LORP_WEBHOOK_ALLOWED_HOSTS" in body["detail"]
    allowed = api_settings.model_copy(update={"webhook_allowed_hosts": ["hooks.example.com", "*.internal.test"]})
    client = client_for(allowed, rollback_sessionmaker)
    for url in ("http://127.0.0.1:9/hook", "ftp://hooks.example.com/x", "https://user:pw@hooks.example.com/x"):
        assert_problem(
            client.post("/v1/jobs", json={**job, "notify": {"url": url, "secret": SECRET}}), 422, "notify.url"
        )
    short = {**job, "notify": {"url": "https://hooks.example.com/x", "secret": "short"}}
    assert_problem(client.post("/v1/jobs", json=short), 422, "notify.secret")
    for url in ("https://hooks.example.com/lorp", "https://ci.internal.test/hook"):
        created = client.post("/v1/jobs", json={**job, "notify": {"url": url, "secret": SECRET}})
        assert created.status_code == 202, created.text
        assert created.json()["notify_url"] == url and SECRET not in created.text
        assert client.get(f"/v1/jobs/{created.json()['id']}/deliveries").json() == []


def test_a_receiver_that_never_recovers_is_given_up_on(api_settings: Settings, committed_jobs: list[Any]) -> None:
    failing = Receiver(fail_first=100)
    settings = api_settings.model_copy(
        update={"webhook_allowed_hosts": ["127.0.0.1"], "webhook_max_attempts": 3, "webhook_retry_base_s": 0}
    )
    try:
        with session_scope(session_factory(settings.sqlalchemy_url)) as session:
            job = Job(
                request={}, request_hash="0" * 64, model_source="demo", method="lorp", queue=settings.queue_name,
                status=JobStatus.failed, error_code="worker_lost", notify_url=failing.url, notify_secret=SECRET,
            )  # fmt: skip
            session.add(job)
            session.flush()
            job_id = job.id
            committed_jobs.append(job_id)
        for _ in range(5):
            deliver_due(settings, job_id=job_id)
    finally:
        failing.close()
    assert [s for _, _, s in failing.received] == [500, 500, 500]  # three attempts, then no more
    assert json.loads(failing.received[0][1])["event"] == "job.failed"
    with session_scope(session_factory(settings.sqlalchemy_url)) as session:
        row = session.get(Job, job_id)
        assert row.notify_attempts == 3 and row.notified_at is None and row.notify_next_at is None
