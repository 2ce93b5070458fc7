"""Webhooks with real receivers on loopback (tests/service/receivers.py): signed deliveries of a job's
final state, retried until the receiver recovers, every attempt visible at /v1/jobs/{id}/deliveries.

URLs are checked as URLs at submission (control characters, hosts, ports, internal IP literals: a
422 naming notify.url); every attempt is isolated (a bad row among good ones stops nothing), bounded
by one deadline (a receiver that trickles or hangs is cut at it), reads only the status (a 200 MB
answer costs nothing, a body is never stored), goes only to an address the policy allows (resolved
once, connected to as checked, TLS under the host's name), and is sent once per attempt even by two
dispatchers at once; the dispatcher runs beside the reconciler, never inside its pass. Delivery
tests use a SQLite database of their own (the embedded mode, where two senders once raced) unless
they say Postgres.
"""

from __future__ import annotations

import datetime as dt
import json
import ssl
import threading
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic.config import Config
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import create_engine, select, text, update

from alembic import command
from app.core.config import Settings
from app.core.webhook_policy import address_allowed, address_internal, parse_networks, parse_webhook_url
from app.db.base import utcnow
from app.db.migrate import REPO_ROOT, upgrade_head
from app.db.models import Job, JobStatus, WebhookDelivery
from app.db.session import session_factory, session_scope
from app.jobspec import host_allowed, webhook_url_problem
from app.repositories.webhooks import ABANDONED
from lorp_client import Client
from lorp_client.webhooks import SignatureError, sign, verify
from worker import webhooks
from worker.reconciler import reconcile_once
from worker.service_cli import run_reconciler
from worker.webhooks import deliver_due

from .api_helpers import DEMO_JOB, assert_problem, client_for
from .receivers import Receiver, closed_port
from .stack import embedded_stack

SECRET = "s3cret-for-the-webhook-tests"
INTERNAL_PAGE = b"<h1>internal admin</h1> db password: hunter2"
DEADLINE_S = 2.0


@pytest.fixture()
def receiver() -> Iterator[Receiver]:
    r = Receiver(statuses=(500, 200), body=INTERNAL_PAGE)
    yield r
    r.close()


@pytest.fixture(scope="module")
def embedded(
    tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any, request: pytest.FixtureRequest
) -> Iterator[dict[str, Any]]:
    env = {
        "LORP_WEBHOOK_ALLOWED_HOSTS": '["localhost:*"]',
        "LORP_WEBHOOK_ALLOWED_NETWORKS": '["127.0.0.0/8"]',
        "LORP_WEBHOOK_RETRY_BASE_S": "0.5",
        "LORP_RECONCILE_INTERVAL_S": "30",  # deliveries do not wait for a reconciler pass
    }
    with embedded_stack(tmp_path_factory, tiny_tokenizer, request, "webhooks", **env) as stack:
        yield stack


def sqlite_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Settings on a fresh SQLite database: loopback receivers named ``localhost`` (any port) allowed."""
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "webhook_allowed_hosts": ["localhost:*"],
        "webhook_allowed_networks": ["127.0.0.0/8"],
        "webhook_timeout_s": DEADLINE_S,
        "webhook_retry_base_s": 0,
        **overrides,
    }
    settings = Settings(**values)
    upgrade_head(settings.sqlalchemy_url)
    return settings


def finished_job(
    settings: Settings,
    url: str,
    *,
    ended_s_ago: float = 0.0,
    status: JobStatus = JobStatus.failed,
    secret: str | None = SECRET,
) -> Any:
    """A finished job row with a webhook, as the worker (or the API, for a cancel) leaves it."""
    with session_scope(session_factory(settings.sqlalchemy_url)) as session:
        job = Job(
            request={}, request_hash="0" * 64, model_source="demo", method="lorp", queue=settings.queue_name,
            status=status, error_code="worker_lost" if status == JobStatus.failed else None,
            finished_at=utcnow() - dt.timedelta(seconds=ended_s_ago), notify_url=url, notify_secret=secret,
        )  # fmt: skip
        session.add(job)
        session.flush()
        return job.id


def attempts_of(settings: Settings, job_id: Any) -> list[WebhookDelivery]:
    with session_scope(session_factory(settings.sqlalchemy_url)) as session:
        return list(
            session.scalars(
                select(WebhookDelivery).where(WebhookDelivery.job_id == job_id).order_by(WebhookDelivery.attempt)
            )
        )


def job_row(settings: Settings, job_id: Any) -> Job:
    with session_scope(session_factory(settings.sqlalchemy_url)) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


# -- end to end through `lorp serve` ------------------------------------------------------------------------


def test_a_job_notifies_its_webhook_signed_and_retries_until_delivered(
    embedded: dict[str, Any], receiver: Receiver
) -> None:
    url = receiver.url(host="localhost")
    body = {
        "model": {"id": embedded["model"]},
        "method": "lorp",
        "target": {"num_layers": 1},
        "calibration": {"dataset": "builtin", "num_samples": 4, "seq_len": 32, "batch_size": 2},
        "evaluation": {"max_windows": 1, "speed": False, "prompts": [], "curve_budgets": []},
        "notify": {"url": url, "secret": SECRET},
    }
    with Client(embedded["base"]) as client:
        job = client.wait(client.submit(body).id, timeout=240, poll_interval=0.2)
        assert job.status == "succeeded", (job.error, embedded["procs"].logs())
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(d.delivered for d in client.deliveries(job.id)):
            time.sleep(0.2)
        deliveries = client.deliveries(job.id)
        shown = client.get(job.id)
        raw_deliveries = httpx.get(f"{embedded['base']}/v1/jobs/{job.id}/deliveries", timeout=10).text
    assert [(d.attempt, d.status_code, d.delivered) for d in deliveries] == [(1, 500, False), (2, 200, True)]
    assert {d.event for d in deliveries} == {"job.succeeded"}
    assert deliveries[0].error == "HTTP 500"  # the receiver's page is neither stored nor shown
    assert b"hunter2" not in raw_deliveries.encode() and "internal admin" not in raw_deliveries
    assert shown.notify_url == url and shown.notified_at is not None
    assert "notify" not in shown.request and SECRET not in shown.model_dump_json()  # the secret never comes back
    # From the dispatcher within about a poll interval of the job's end (no reconciler pass: 30 s).
    first_at = receiver.received[0][0]
    assert shown.finished_at is not None
    assert first_at - shown.finished_at.timestamp() < 5, (first_at, shown.finished_at)

    assert len(receiver.received) == 2
    ids = set()
    for _at, headers, raw in receiver.received:
        verify(SECRET, raw, headers["Lorp-Signature"])
        assert headers["Host"] == f"localhost:{receiver.port}"  # the URL's host, though sent to 127.0.0.1
        payload = json.loads(raw)
        assert payload["event"] == "job.succeeded" == headers["Lorp-Event"]
        assert payload["job"]["id"] == str(job.id) and payload["job"]["status"] == "succeeded"
        assert payload["job"]["summary"]["pruned_layers"] == job.summary.pruned_layers
        ids.add(headers["Lorp-Delivery"])
    assert len(ids) == 1  # the same delivery id on a retry: receivers can drop repeats
    _at, headers, raw = receiver.received[0]
    with pytest.raises(SignatureError):
        verify("another-secret-of-some-length", raw, headers["Lorp-Signature"])
    with pytest.raises(SignatureError):
        verify(SECRET, raw + b" ", headers["Lorp-Signature"])
    with pytest.raises(SignatureError):
        verify(SECRET, raw, sign(SECRET, raw, timestamp=int(time.time()) - 3600))  # too old: a replay


# -- at submission ------------------------------------------------------------------------------------------

CONTROL_URLS = [
    "https://hooks.example.com/\x01hook",  # U+0001
    "https://hooks.example.com/hook\x7f",  # DEL
    "https://hooks.example.com/hook\x00",  # NUL
    "https://hooks.example.com\x01/hook",  # in the host
    "https://hooks.example.com/\x85",  # C1
    "https://hooks.example.com/a b",
    "https://hooks.example.com/a\tb",
    "https://hooks.example.com/a\nb",
    "https://hooks.example.com/\u200bhook",  # zero-width space
    "https://hooks.example.com/\u202ekoob",  # right-to-left override
]
MALFORMED_URLS = [
    "ftp://hooks.example.com/x",
    "https://user:pw@hooks.example.com/x",
    "https://@hooks.example.com/x",
    "https://hooks.example.com\\@evil.test/x",
    "https://[::1/x",
    "https://hooks.example.com:99999/x",
    "https://hooks.example.com:0/x",
    "https://hooks.example.com:http/x",
    "https://127.1/x",  # not an IP literal, and read as 127.0.0.1 by some resolvers
    "https://0x7f000001/x",
    "https://under_score.example.com/x",
    "https://-leading.example.com/x",
    "https:///x",
]
ALLOWED_HOSTS = [
    "hooks.example.com",
    "*.internal.test",
    "ports.example.com:8443",
    "any.example.com:*",
    "127.0.0.1:*",
    "10.1.2.3",
    "169.254.169.254",
    "[::1]:*",
    "[::ffff:127.0.0.1]:*",
    "100.64.0.7",
]


def test_webhook_urls_are_checked_at_submission(api_settings: Settings, rollback_sessionmaker: Any) -> None:
    off = client_for(api_settings, rollback_sessionmaker)
    job = {**DEMO_JOB, "notify": {"url": "https://hooks.example.com/hook", "secret": SECRET}}
    body = assert_problem(off.post("/v1/jobs", json=job), 422, "notify.url")
    assert "LORP_WEBHOOK_ALLOWED_HOSTS" in body["detail"]
    allowed = api_settings.model_copy(update={"webhook_allowed_hosts": ALLOWED_HOSTS})
    client = client_for(allowed, rollback_sessionmaker)

    def post(url: str, secret: str = SECRET) -> Any:
        return client.post("/v1/jobs", json={**job, "notify": {"url": url, "secret": secret}})

    for url in CONTROL_URLS:
        body = assert_problem(post(url), 422, "notify.url")
        message = json.dumps(body)  # a NUL may be refused before the URL is read, for every field alike
        assert "control characters or whitespace" in message or "NUL (U+0000)" in message, (url, body)
    for url in MALFORMED_URLS:
        assert_problem(post(url), 422, "notify.url")
    not_allowed = [
        "https://hooks.example.com:8443/x",  # a host without a port allows the default port only
        "http://hooks.example.com:8080/x",
        "https://internal.test/x",  # *.internal.test is its subdomains only
        "https://ports.example.com/x",  # 443, not 8443
        "https://elsewhere.example.com/x",
        "http://127.0.0.2:9/x",
    ]
    for url in not_allowed:
        body = assert_problem(post(url), 422, "notify.url")
        assert "LORP_WEBHOOK_ALLOWED_HOSTS" in body["detail"], (url, body)
    internal = [  # allowed as hosts, refused as addresses (no LORP_WEBHOOK_ALLOWED_NETWORKS)
        "http://127.0.0.1:9/hook",
        "http://10.1.2.3/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:9/hook",
        "http://[::ffff:127.0.0.1]:9/hook",
        "http://100.64.0.7/hook",
    ]
    for url in internal:
        body = assert_problem(post(url), 422, "notify.url")
        assert "LORP_WEBHOOK_ALLOWED_NETWORKS" in body["detail"], (url, body)
    assert_problem(post("https://hooks.example.com/x", secret="short"), 422, "notify.secret")
    assert_problem(post("https://hooks.example.com/x", secret=SECRET + "\x00"), 422, "notify.secret")
    accepted = [
        "https://hooks.example.com/lorp",
        "https://HOOKS.example.com./lorp?job=1",
        "https://hooks.example.com:443/lorp",
        "https://ci.internal.test/hook",
        "https://ports.example.com:8443/hook",
        "http://any.example.com:1234/hook",
    ]
    for url in accepted:
        created = post(url)
        assert created.status_code == 202, (url, created.text)
        assert created.json()["notify_url"] == url and SECRET not in created.text
        assert client.get(f"/v1/jobs/{created.json()['id']}/deliveries").json() == []


def test_an_operator_may_allow_internal_networks(api_settings: Settings, rollback_sessionmaker: Any) -> None:
    settings = api_settings.model_copy(
        update={"webhook_allowed_hosts": ["127.0.0.1:*", "10.1.2.3"], "webhook_allowed_networks": ["127.0.0.0/8"]}
    )
    client = client_for(settings, rollback_sessionmaker)
    ok = client.post("/v1/jobs", json={**DEMO_JOB, "notify": {"url": "http://127.0.0.1:9/hook", "secret": SECRET}})
    assert ok.status_code == 202, ok.text
    refused = client.post("/v1/jobs", json={**DEMO_JOB, "notify": {"url": "http://10.1.2.3/hook", "secret": SECRET}})
    assert_problem(refused, 422, "notify.url")


def test_the_url_and_host_rules() -> None:
    hosts = ["hooks.example.com", "*.internal.test", "ports.example.com:8443", "any.example.com:*", "bücher.example"]
    assert host_allowed("https://hooks.example.com/x", hosts)
    assert host_allowed("http://hooks.example.com:80/x", hosts)
    assert not host_allowed("https://hooks.example.com:8443/x", hosts)
    assert host_allowed("https://a.b.internal.test/x", hosts) and not host_allowed("https://internal.test/x", hosts)
    assert not host_allowed("https://evilinternal.test/x", hosts)
    assert host_allowed("https://ports.example.com:8443/x", hosts) and not host_allowed(
        "https://ports.example.com/", hosts
    )
    assert host_allowed("https://any.example.com:1/x", hosts) and host_allowed("https://any.example.com/x", hosts)
    assert host_allowed("https://xn--bcher-kva.example/x", hosts) and host_allowed("https://BÜCHER.example/x", hosts)
    assert not host_allowed("https://hooks.example.com/\x01", hosts)
    target = parse_webhook_url("https://BÜCHER.example:8443/a b?q=ü".replace(" ", "%20"))
    assert (target.host, target.port, target.host_header) == (
        "xn--bcher-kva.example",
        8443,
        "xn--bcher-kva.example:8443",
    )
    assert target.raw_path == "/a%20b?q=%C3%BC"
    assert parse_webhook_url("http://[::1]:8080").host_header == "[::1]:8080"
    for entry in ("a.example.com:x", "a_b.example.com", "[::1", "*.", "a.example.com:70000"):
        with pytest.raises(ValueError, match="webhook"):
            Settings(webhook_allowed_hosts=[entry])
    with pytest.raises(ValueError, match="LORP_WEBHOOK_ALLOWED_NETWORKS"):
        Settings(webhook_allowed_networks=["10.0.0.0/33"])
    assert webhook_url_problem("https://hooks.example.com/x", hosts) is None
    assert "off" in (webhook_url_problem("https://hooks.example.com/x", []) or "")


INTERNAL = [
    "127.0.0.1", "127.255.255.254", "0.0.0.0", "10.0.0.1", "172.16.0.1", "172.31.255.255", "192.168.1.1",
    "100.64.0.1", "100.127.255.254", "169.254.169.254", "169.254.0.1", "224.0.0.1", "239.255.255.250",
    "255.255.255.255", "240.0.0.1", "192.0.2.1", "198.18.0.1",
    "::1", "::", "fe80::1", "fc00::1", "fd00:ec2::254", "ff02::1", "fec0::1", "2001:db8::1",
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254", "2002:7f00:1::1", "2002:a9fe:a9fe::1",
    "64:ff9b::a9fe:a9fe", "::7f00:1",
]  # fmt: skip
PUBLIC = ["8.8.8.8", "1.1.1.1", "93.184.215.14", "2606:4700:4700::1111", "::ffff:8.8.8.8", "2002:808:808::1"]


def test_the_address_policy() -> None:
    for address in INTERNAL:
        assert address_internal(ip_address(address)), address
        assert not address_allowed(ip_address(address), []), address
    for address in PUBLIC:
        assert not address_internal(ip_address(address)), address
        assert address_allowed(ip_address(address), []), address
    loopback = parse_networks(["127.0.0.0/8"])
    assert address_allowed(ip_address("127.0.0.1"), loopback)
    assert address_allowed(ip_address("::ffff:127.0.0.1"), loopback)  # the same address, mapped
    assert not address_allowed(ip_address("::1"), loopback) and not address_allowed(ip_address("10.0.0.1"), loopback)
    assert address_allowed(ip_address("fd00::5"), parse_networks(["fd00::/8"]))


# -- delivering ---------------------------------------------------------------------------------------------


def test_a_bad_row_among_good_ones_does_not_stop_them(tmp_path: Path) -> None:
    with Receiver() as good:
        settings = sqlite_settings(tmp_path, webhook_allowed_hosts=[f"localhost:{good.port}"])
        # Rows written before URLs were checked, or whose host the operator has since dropped; they
        # ended first, so they sort first.
        bad = {
            "U+0001": finished_job(settings, good.url("/\x01x", host="localhost"), ended_s_ago=30),
            "U+007F": finished_job(settings, good.url("/x\x7f", host="localhost"), ended_s_ago=29),
            "NUL": finished_job(settings, good.url("/x\x00", host="localhost"), ended_s_ago=28),
            "space": finished_job(settings, good.url("/a b", host="localhost"), ended_s_ago=27),
            "host dropped": finished_job(settings, "https://gone.example.com/x", ended_s_ago=26),
            "port dropped": finished_job(settings, "https://localhost/x", ended_s_ago=25),
            "no secret": finished_job(settings, good.url("/x", host="localhost"), ended_s_ago=24.5, secret=None),
            "IP literal": finished_job(settings, good.url(), ended_s_ago=24),  # no longer allowed: not a name
            "not a URL": finished_job(settings, "http://[::1/x", ended_s_ago=23),
        }
        fine = [finished_job(settings, good.url(f"/job/{n}", host="localhost")) for n in range(3)]
        counts = deliver_due(settings)
        assert counts == {"delivered": 3, "failed": 0}
        assert sorted(h[":request-line"] for _, h, _ in good.received) == [f"POST /job/{n} HTTP/1.1" for n in range(3)]
        for job_id in fine:
            assert [(d.attempt, d.status_code, d.delivered) for d in attempts_of(settings, job_id)] == [(1, 200, True)]
        for case, job_id in bad.items():
            rows = attempts_of(settings, job_id)
            reason = webhooks.NOT_BUILT if case == "no secret" else webhooks.NOT_ALLOWED
            assert [(d.attempt, d.error) for d in rows] == [(1, reason)], case
            job = job_row(settings, job_id)
            assert job.notify_attempts == settings.webhook_max_attempts and job.notify_next_at is None, case
        assert deliver_due(settings) == {"delivered": 0, "failed": 0}  # given up: never tried again
        assert len(good.received) == 3


def test_trickling_hanging_and_broken_receivers_are_cut_at_the_deadline(tmp_path: Path) -> None:
    settings = sqlite_settings(tmp_path)
    receivers = {mode: Receiver(mode, interval=0.5) for mode in ("trickle", "hang", "garbage")}
    good = Receiver()
    try:
        jobs = {mode: finished_job(settings, r.url(host="localhost"), ended_s_ago=10) for mode, r in receivers.items()}
        jobs["closed port"] = finished_job(settings, f"http://localhost:{closed_port()}/x", ended_s_ago=10)
        ok = finished_job(settings, good.url(host="localhost"))
        started = time.monotonic()
        counts = deliver_due(settings)
        took = time.monotonic() - started
    finally:
        for r in (*receivers.values(), good):
            r.close()
    assert counts == {"delivered": 1, "failed": 4}
    # The trickle would last ~35 s at a byte per half second: cut at the 2 s deadline, like the rest.
    assert took < DEADLINE_S + 2.5, took
    assert good.received[0][0] - (time.time() - took) < 1.0  # the good one did not wait for the bad
    assert receivers["trickle"].received and receivers["hang"].received  # they did get the request
    no_answer = f"no HTTP answer within {DEADLINE_S:g} s"
    for case, job_id in jobs.items():
        # One text, one duration for all: a caller learns nothing of the network from them.
        assert [(d.error, d.status_code, d.duration_ms) for d in attempts_of(settings, job_id)] == [
            (no_answer, None, DEADLINE_S * 1000)
        ], case
    assert [d.delivered for d in attempts_of(settings, ok)] == [True]


def test_a_200_mb_answer_is_not_read_and_no_body_is_kept(tmp_path: Path) -> None:
    settings = sqlite_settings(tmp_path)
    with Receiver("huge") as huge, Receiver(statuses=(500,), body=INTERNAL_PAGE * 1000) as failing:
        big = finished_job(settings, huge.url(host="localhost"))
        page = finished_job(settings, failing.url(host="localhost"))
        tracemalloc.start()
        started = time.monotonic()
        counts = deliver_due(settings)
        took = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        time.sleep(0.2)
        sent = huge.sent
    assert counts == {"delivered": 1, "failed": 1}
    assert took < 2.0, took
    assert peak < 20 * 1024 * 1024, peak  # a 200 MB body would be 200 MB here
    assert sent < 64 * 1024 * 1024, sent  # the receiver could push only what socket buffers hold
    assert [(d.status_code, d.delivered, d.error) for d in attempts_of(settings, big)] == [(200, True, None)]
    assert [(d.status_code, d.error) for d in attempts_of(settings, page)] == [(500, "HTTP 500")]
    with create_engine(settings.sqlalchemy_url).connect() as conn:
        stored = json.dumps([list(r) for r in conn.execute(text("SELECT * FROM webhook_deliveries"))], default=str)
    assert "hunter2" not in stored and "internal admin" not in stored


def test_internal_addresses_are_refused_unless_an_operator_allows_them(tmp_path: Path) -> None:
    # `localhost` is an allowed host name, but what it resolves to (127.0.0.1) is loopback.
    refusing = sqlite_settings(tmp_path / "refusing", webhook_allowed_networks=[])
    allowing = sqlite_settings(tmp_path / "allowing")
    with Receiver() as r:
        refused = finished_job(refusing, r.url(host="localhost"))
        assert deliver_due(refusing) == {"delivered": 0, "failed": 1}
        assert r.connections == 0  # no connection was made at all
        row = attempts_of(refusing, refused)[0]
        assert (row.error, row.status_code, row.duration_ms) == ("address not allowed", None, DEADLINE_S * 1000)
        assert job_row(refusing, refused).notify_next_at is not None  # retried: names may resolve elsewhere later
        allowed = finished_job(allowing, r.url(host="localhost"))
        assert deliver_due(allowing) == {"delivered": 1, "failed": 0}
        assert r.connections == 1 and [d.delivered for d in attempts_of(allowing, allowed)] == [True]


def _certificate(ca_key: Any, ca: x509.Certificate | None, name: str) -> tuple[Any, x509.Certificate]:
    """A key and a certificate for ``name``, signed by ``ca`` (self-signed, as a CA, when None)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.subject if ca is not None else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
    )
    if ca is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        return key, builder.sign(key, hashes.SHA256())
    builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def _server_context(tmp_path: Path, ca_key: Any, ca: x509.Certificate, name: str) -> ssl.SSLContext:
    key, cert = _certificate(ca_key, ca, name)
    cert_file, key_file = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return context


def test_https_goes_to_the_checked_address_under_the_host_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca_key, ca = _certificate(None, None, "lorp test CA")
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))  # the dispatcher trusts certificates as httpx does
    settings = sqlite_settings(tmp_path)
    right = Receiver(tls=_server_context(tmp_path, ca_key, ca, "localhost"))
    wrong = Receiver(tls=_server_context(tmp_path, ca_key, ca, "other.test"))
    try:
        good = finished_job(settings, right.url(host="localhost", scheme="https"))
        bad = finished_job(settings, wrong.url(host="localhost", scheme="https"))
        assert deliver_due(settings) == {"delivered": 1, "failed": 1}
    finally:
        right.close()
        wrong.close()
    # Connected to 127.0.0.1 (the address checked), but TLS and Host name the URL's host.
    assert right.sni == ["localhost"] and right.received[0][1]["Host"] == f"localhost:{right.port}"
    assert [d.delivered for d in attempts_of(settings, good)] == [True]
    assert wrong.received == []  # its certificate is not for localhost: nothing was sent
    assert [d.error for d in attempts_of(settings, bad)] == [f"no HTTP answer within {DEADLINE_S:g} s"]


@pytest.fixture(params=["sqlite", "postgresql"])
def race_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Two databases, retries an hour apart (a round of the race is one attempt per job)."""
    if request.param == "sqlite":
        return sqlite_settings(tmp_path, webhook_retry_base_s=3600, webhook_concurrency=4)
    pg_url = request.getfixturevalue("pg_url")
    return Settings(
        data_dir=tmp_path / "data",
        database_url=pg_url,
        webhook_allowed_hosts=["localhost:*"],
        webhook_allowed_networks=["127.0.0.0/8"],
        webhook_timeout_s=DEADLINE_S,
        webhook_retry_base_s=3600,
        webhook_concurrency=4,
    )


def test_two_dispatch_passes_at_once_send_each_attempt_once(
    race_settings: Settings, committed_jobs: list[uuid.UUID]
) -> None:
    settings = race_settings
    with Receiver(statuses=(500,), delay=0.1) as r:
        jobs = [finished_job(settings, r.url(f"/job/{n}", host="localhost")) for n in range(12)]
        committed_jobs.extend(jobs)
        for round_ in (1, 2):
            with session_scope(session_factory(settings.sqlalchemy_url)) as session:  # the retry is due
                session.execute(update(Job).where(Job.id.in_(jobs)).values(notify_next_at=None))
            barrier = threading.Barrier(2)
            results: list[dict[str, int]] = []

            def dispatch(barrier: threading.Barrier = barrier, results: list[dict[str, int]] = results) -> None:
                barrier.wait()
                results.append(deliver_due(settings, job_ids=jobs))

            threads = [threading.Thread(target=dispatch) for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert sum(c["failed"] for c in results) == 12, results  # between them, each job once
            # An attempt the sender gave up on (no answer in its timeout, on a loaded machine) may still
            # be on its way into the receiver: wait for it, then count exactly (a second send shows).
            deadline = time.monotonic() + 10
            while len(r.received) < 12 * round_ and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(r.received) == 12 * round_
            for job_id in jobs:
                assert [d.attempt for d in attempts_of(settings, job_id)] == list(range(1, round_ + 1))
                assert job_row(settings, job_id).notify_attempts == round_


def test_an_attempt_whose_sender_stopped_is_marked_and_made_again(tmp_path: Path) -> None:
    settings = sqlite_settings(tmp_path)
    with Receiver() as r:
        job_id = finished_job(settings, r.url(host="localhost"))
        claimed = webhooks.Store(settings).claim_due(10).deliveries  # then the sender dies: nothing is sent or recorded
        assert [(d.job_id, d.attempt) for d in claimed] == [(job_id, 1)]
        assert [(d.attempt, d.error, d.delivered) for d in attempts_of(settings, job_id)] == [(1, None, False)]
        assert deliver_due(settings) == {"delivered": 0, "failed": 0}  # leased: nobody else takes it
        past = utcnow() - dt.timedelta(seconds=1)
        with session_scope(session_factory(settings.sqlalchemy_url)) as session:  # the lease runs out
            session.execute(update(Job).where(Job.id == job_id).values(notify_next_at=past))
        assert deliver_due(settings) == {"delivered": 1, "failed": 0}
    rows = attempts_of(settings, job_id)
    assert [(d.attempt, d.error, d.delivered) for d in rows] == [(1, ABANDONED, False), (2, None, True)]


def test_the_dispatcher_does_not_delay_a_reconciler_pass(tmp_path: Path) -> None:
    settings = sqlite_settings(tmp_path, webhook_timeout_s=5.0, reconcile_interval_s=0.5)
    stop = threading.Event()
    with Receiver("hang") as hang, Receiver() as good:
        hung = finished_job(settings, hang.url(host="localhost"), ended_s_ago=5)
        ok = finished_job(settings, good.url(host="localhost"))
        started = time.monotonic()
        thread = threading.Thread(target=run_reconciler, args=(settings,), kwargs={"stop": stop}, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not good.received:
                time.sleep(0.05)
            assert good.received, "the good delivery did not go out beside the hanging one"
            assert good.received[0][0] - (time.time() - (time.monotonic() - started)) < 2.5
            assert hang.received and [d.error for d in attempts_of(settings, hung)] == [None]  # still hanging
            passes = []
            for _ in range(3):  # a pass is as quick as ever while a delivery hangs
                t0 = time.monotonic()
                reconcile_once(settings)
                passes.append(time.monotonic() - t0)
            assert max(passes) < 2.0, passes
        finally:
            stop.set()
            thread.join(30)
    assert not thread.is_alive()
    assert [d.delivered for d in attempts_of(settings, ok)] == [True]
    assert [d.error for d in attempts_of(settings, hung)] == ["no HTTP answer within 5 s"]


def test_a_receiver_that_never_recovers_is_given_up_on(api_settings: Settings, committed_jobs: list[Any]) -> None:
    failing = Receiver(statuses=(500,))
    settings = api_settings.model_copy(
        update={
            "webhook_allowed_hosts": ["localhost:*"],
            "webhook_allowed_networks": ["127.0.0.0/8"],
            "webhook_max_attempts": 3,
            "webhook_retry_base_s": 0,
        }
    )
    try:
        job_id = finished_job(settings, failing.url(host="localhost"))
        committed_jobs.append(job_id)
        for _ in range(5):
            deliver_due(settings, job_ids=[job_id])
    finally:
        failing.close()
    assert len(failing.received) == 3  # three attempts, then no more
    assert json.loads(failing.received[0][2])["event"] == "job.failed"
    row = job_row(settings, job_id)
    assert row.notify_attempts == 3 and row.notified_at is None and row.notify_next_at is None
    assert [(d.attempt, d.error) for d in attempts_of(settings, job_id)] == [(n, "HTTP 500") for n in (1, 2, 3)]


def test_the_migration_keeps_one_row_per_attempt_and_no_body(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    cfg = Config(str(REPO_ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(REPO_ROOT / "alembic"))
    cfg.set_main_option("sqlalchemy.url", url)
    command.upgrade(cfg, "0006")
    job_id = uuid.uuid4()
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO jobs (id, status, progress, request, request_hash, model_source, method, queue,"
                " attempts, max_attempts, analysis_reused, notify_url, notify_attempts, queued_at, created_at,"
                " updated_at) VALUES (:id, 'failed', 0, '{}', :h, 'demo', 'lorp', 'gpu', 1, 3, false,"
                " 'https://hooks.example.com/x', 2, :now, :now, :now)"
            ),
            {"id": job_id.hex, "h": "0" * 64, "now": dt.datetime(2026, 12, 1)},
        )
        rows = [  # two senders both wrote attempt 1 (the race), then attempt 2
            (1, "2026-12-01 10:00:00", 500, "HTTP 500: <h1>internal admin</h1> db password: hunter2"),
            (1, "2026-12-01 10:00:01", None, "ConnectError: [Errno 111] Connection refused"),
            (2, "2026-12-01 10:01:00", 200, None),
        ]
        for attempt, at, status, error in rows:
            conn.execute(
                text(
                    "INSERT INTO webhook_deliveries (id, job_id, attempt, event, url, at, status_code, error,"
                    " duration_ms, delivered) VALUES (:id, :job, :attempt, 'job.failed', 'https://hooks.example.com/x',"
                    " :at, :status, :error, 5, :delivered)"
                ),
                {"id": uuid.uuid4().hex, "job": job_id.hex, "attempt": attempt, "at": at, "status": status,
                 "error": error, "delivered": status == 200},
            )  # fmt: skip
    engine.dispose()
    command.upgrade(cfg, "head")
    engine = create_engine(url)
    with engine.connect() as conn:
        after = conn.execute(text("SELECT attempt, status_code, error FROM webhook_deliveries ORDER BY attempt")).all()
        attempts = conn.execute(text("SELECT notify_attempts FROM jobs")).scalar_one()
    engine.dispose()
    assert [tuple(r) for r in after] == [(1, 500, "HTTP 500"), (2, None, "no HTTP answer"), (3, 200, None)]
    assert attempts == 3
