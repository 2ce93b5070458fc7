"""API tests on real Postgres and Redis: jobs, idempotency, pagination, auth, cancel, bad input.

The helpers at the top are shared with the other ``test_api_*`` modules.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import uuid
from typing import Any

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings
from app.db.models import Analysis, Job, JobEvent, JobStatus
from app.main import create_app
from app.services.keys import create_api_key

DEMO_JOB: dict[str, Any] = {"model": {"id": "demo"}, "target": {"num_layers": 2}}
PROBLEM = "application/problem+json"


def isolated_queue(settings: Settings) -> Settings:
    """The settings with a queue of their own: a worker another test runs on "gpu" must not take our messages."""
    return settings.model_copy(update={"queue_name": f"api-test-{uuid.uuid4().hex[:10]}"})


@pytest.fixture()
def api_settings(service_settings: Settings) -> Settings:
    return isolated_queue(service_settings)


def client_for(settings: Settings, factory: sessionmaker[Session] | None, **kwargs: Any) -> TestClient:
    return TestClient(create_app(settings, sessionmaker=factory), **kwargs)


def assert_problem(response: Any, status: int, field: str | None = None) -> dict[str, Any]:
    """The response is an RFC 9457 problem with ``status`` that names ``field`` (when given)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM), response.headers["content-type"]
    body: dict[str, Any] = response.json()
    for key in ("type", "title", "status", "detail", "instance", "code", "errors"):
        assert key in body, body
    assert body["status"] == status
    if field is not None:
        fields = [e["field"] for e in body["errors"]]
        assert field in fields, body
    return body


def new_key(factory: sessionmaker[Session], name: str, admin: bool = False) -> tuple[str, uuid.UUID]:
    with factory() as session:
        plaintext, row = create_api_key(session, name, admin)
        session.commit()
        return plaintext, row.id


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def insert_job(factory: sessionmaker[Session], **fields: Any) -> uuid.UUID:
    """A job row written directly (as the worker would leave it)."""
    values: dict[str, Any] = {
        "status": JobStatus.queued,
        "request": {"model": {"id": "demo"}, "target": {"num_layers": 2}},
        "request_hash": "0" * 64,
        "model_source": "demo",
        "method": "auto",
        "progress": 0.0,
        "attempts": 0,
        "max_attempts": 3,
    }
    values.update(fields)
    with factory() as session:
        job = Job(**values)
        session.add(job)
        session.commit()
        return job.id


def similarity_stats(n_blocks: int = 12, width: int = 48, seed: int = 0) -> tuple[list[list[float]], list[list[float]]]:
    """S and D of a random residual stream: h_{l+1} = h_l + noise, so nearby blocks are similar."""
    rng = np.random.default_rng(seed)
    h = [rng.normal(size=width)]
    for _ in range(n_blocks):
        h.append(h[-1] + rng.normal(scale=0.6, size=width))
    H = np.stack(h)
    H /= np.linalg.norm(H, axis=1, keepdims=True)
    S = np.clip(H @ H.T, -1.0, 1.0)
    S = (S + S.T) / 2
    np.fill_diagonal(S, 1.0)
    D = np.arccos(np.clip(S, -1.0, 1.0)) / np.pi
    return S.tolist(), D.tolist()


def insert_analysis(factory: sessionmaker[Session], n_blocks: int = 12) -> uuid.UUID:
    S, D = similarity_stats(n_blocks)
    with factory() as session:
        analysis = Analysis(
            fingerprint=uuid.uuid4().hex + uuid.uuid4().hex,
            model_source="demo",
            model_revision=None,
            dataset_sha256="a" * 64,
            num_samples=8,
            seq_len=64,
            seed=0,
            num_tokens=512,
            num_blocks=n_blocks,
            similarity=S,
            angular_distance=D,
            rls=0.42,
            k=3,
            clusters=[0] * 4 + [1] * 4 + [2] * (n_blocks - 8),
            redundancy=[0.5] * n_blocks,
            provenance={"library": "test"},
        )
        session.add(analysis)
        session.commit()
        return analysis.id


def queued_messages(redis_url: str, queue: str = "gpu") -> list[dict[str, Any]]:
    """The Celery messages waiting in the Redis list of ``queue``, decoded."""
    client = redis.Redis.from_url(redis_url)
    try:
        raw = client.lrange(queue, 0, -1)
    finally:
        client.close()
    out = []
    for item in raw:
        message = json.loads(item)
        body = json.loads(base64.b64decode(message["body"]))
        out.append({"task": message["headers"]["task"], "args": body[0]})
    return out


def utc(year: int = 2026, minute: int = 0, second: int = 0) -> dt.datetime:
    return dt.datetime(year, 1, 1, 12, minute, second, tzinfo=dt.UTC)


# ------------------------------------------------------------------------------------------------------
# Submitting
# ------------------------------------------------------------------------------------------------------


def test_create_job_is_queued_recorded_and_enqueued(api_settings, rollback_sessionmaker, redis_url):
    client = client_for(api_settings, rollback_sessionmaker)
    response = client.post("/v1/jobs", json=DEMO_JOB)
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["progress"] == 0.0 and job["error"] is None
    assert job["request"]["target"] == {"num_layers": 2, "ratio": None}
    assert job["links"]["self"] == f"/v1/jobs/{job['id']}"

    job_id = uuid.UUID(job["id"])
    with rollback_sessionmaker() as session:
        row = session.get(Job, job_id)
        assert row is not None and row.status == JobStatus.queued and row.owner_id is None
        assert row.enqueued_at is not None  # the message went out after the commit
        events = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id)).all()
        assert [(e.kind, e.status) for e in events] == [("status", "queued")]

    messages = queued_messages(redis_url, api_settings.queue_name)
    assert messages == [{"task": "lorp.run_job", "args": [job["id"]]}]

    fetched = client.get(job["links"]["self"])
    assert fetched.status_code == 200
    assert fetched.json()["id"] == job["id"] and fetched.json()["summary"] is None


def test_create_job_with_broker_down_still_queues(api_settings, rollback_sessionmaker):
    settings = api_settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    client = client_for(settings, rollback_sessionmaker)
    response = client.post("/v1/jobs", json=DEMO_JOB)
    assert response.status_code == 202, response.text
    with rollback_sessionmaker() as session:
        row = session.get(Job, uuid.UUID(response.json()["id"]))
        assert row is not None and row.status == JobStatus.queued
        assert row.enqueued_at is None  # left for the reconciler


def test_idempotency_key_replays_and_conflicts(api_settings, rollback_sessionmaker, redis_url):
    client = client_for(api_settings, rollback_sessionmaker)
    headers = {"Idempotency-Key": "build-42"}
    first = client.post("/v1/jobs", json=DEMO_JOB, headers=headers)
    assert first.status_code == 202
    again = client.post("/v1/jobs", json=DEMO_JOB, headers=headers)
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["location"] == first.headers["location"]
    # Explicit defaults are the same body as omitted ones.
    explicit = {**DEMO_JOB, "method": "auto", "calibration": {"dataset": "builtin"}}
    assert client.post("/v1/jobs", json=explicit, headers=headers).json()["id"] == first.json()["id"]

    other = client.post("/v1/jobs", json={**DEMO_JOB, "target": {"num_layers": 3}}, headers=headers)
    body = assert_problem(other, 409, "Idempotency-Key")
    assert body["code"] == "idempotency_key_reused"

    # Another key is another job.
    assert client.post("/v1/jobs", json=DEMO_JOB, headers={"Idempotency-Key": "b"}).json()["id"] != first.json()["id"]
    with rollback_sessionmaker() as session:
        count = session.scalar(select(func.count()).select_from(Job).where(Job.idempotency_key == "build-42"))
        assert count == 1
    assert len(queued_messages(redis_url, api_settings.queue_name)) == 2  # no second message for the replay


def test_idempotency_keys_are_per_owner(api_settings, rollback_sessionmaker):
    key_a, _ = new_key(rollback_sessionmaker, "a")
    key_b, _ = new_key(rollback_sessionmaker, "b")
    client = client_for(api_settings, rollback_sessionmaker)
    headers = {"Idempotency-Key": "same"}
    job_a = client.post("/v1/jobs", json=DEMO_JOB, headers={**headers, **bearer(key_a)})
    job_b = client.post("/v1/jobs", json={**DEMO_JOB, "method": "lorp"}, headers={**headers, **bearer(key_b)})
    assert job_a.status_code == job_b.status_code == 202
    assert job_a.json()["id"] != job_b.json()["id"]


# ------------------------------------------------------------------------------------------------------
# Listing
# ------------------------------------------------------------------------------------------------------


def test_pagination_is_newest_first_without_duplicates(api_settings, rollback_sessionmaker):
    ids = {}
    for i in range(23):
        # Pairs share a created_at, so the id tie-break is exercised.
        created = utc(minute=i // 2)
        status = JobStatus.succeeded if i % 3 == 0 else JobStatus.queued
        model = "org/model-a" if i % 2 == 0 else "demo"
        ids[insert_job(rollback_sessionmaker, created_at=created, status=status, model_source=model)] = (
            created,
            status,
            model,
        )
    client = client_for(api_settings, rollback_sessionmaker)

    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 5}
        if cursor:
            params["cursor"] = cursor
        page = client.get("/v1/jobs", params=params)
        assert page.status_code == 200, page.text
        body = page.json()
        assert len(body["items"]) <= 5
        seen.extend(item["id"] for item in body["items"])
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert pages == 5
    assert len(seen) == len(set(seen)) == 23
    expected = sorted(ids, key=lambda i: (ids[i][0], i), reverse=True)
    assert seen == [str(i) for i in expected]

    queued = client.get("/v1/jobs", params={"status": "queued", "limit": 100}).json()["items"]
    assert {item["id"] for item in queued} == {str(i) for i, v in ids.items() if v[1] == JobStatus.queued}
    by_model = client.get("/v1/jobs", params={"model": "org/model-a", "status": "succeeded"}).json()["items"]
    assert {item["id"] for item in by_model} == {
        str(i) for i, v in ids.items() if v[2] == "org/model-a" and v[1] == JobStatus.succeeded
    }
    assert all(item["model"] == "org/model-a" for item in by_model)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 101}, "limit"),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"status": "sleeping"}, "status"),
    ],
)
def test_list_rejects_bad_parameters(api_settings, rollback_sessionmaker, params, field):
    client = client_for(api_settings, rollback_sessionmaker)
    assert_problem(client.get("/v1/jobs", params=params), 422, field)


# ------------------------------------------------------------------------------------------------------
# Auth
# ------------------------------------------------------------------------------------------------------


def test_auth_isolates_owners_and_admin_sees_all(api_settings, rollback_sessionmaker):
    settings = api_settings.model_copy(update={"auth_required": True})
    assert settings.auth_enabled()
    key_a, id_a = new_key(rollback_sessionmaker, "team-a")
    key_b, _ = new_key(rollback_sessionmaker, "team-b")
    admin, _ = new_key(rollback_sessionmaker, "ops", admin=True)
    client = client_for(settings, rollback_sessionmaker)

    job = client.post("/v1/jobs", json=DEMO_JOB, headers=bearer(key_a))
    assert job.status_code == 202
    job_id = job.json()["id"]
    dataset = client.post(
        "/v1/datasets", files={"file": ("corpus.txt", b"Some calibration text.\n")}, headers=bearer(key_a)
    )
    assert dataset.status_code == 201, dataset.text
    dataset_id = dataset.json()["id"]
    with rollback_sessionmaker() as session:
        row = session.get(Job, uuid.UUID(job_id))
        assert row is not None and row.owner_id == id_a

    assert client.get(f"/v1/jobs/{job_id}", headers=bearer(key_a)).status_code == 200
    assert_problem(client.get(f"/v1/jobs/{job_id}", headers=bearer(key_b)), 404)
    assert_problem(client.post(f"/v1/jobs/{job_id}/cancel", headers=bearer(key_b)), 404)
    assert_problem(client.get(f"/v1/jobs/{job_id}/artifacts", headers=bearer(key_b)), 404)
    assert_problem(client.get(f"/v1/datasets/{dataset_id}", headers=bearer(key_b)), 404)
    assert client.get("/v1/jobs", headers=bearer(key_b)).json()["items"] == []
    # B cannot use A's dataset either.
    with_dataset = {**DEMO_JOB, "calibration": {"dataset": dataset_id}}
    assert_problem(client.post("/v1/jobs", json=with_dataset, headers=bearer(key_b)), 422, "calibration.dataset")
    assert client.post("/v1/jobs", json=with_dataset, headers=bearer(key_a)).status_code == 202

    assert client.get(f"/v1/jobs/{job_id}", headers=bearer(admin)).status_code == 200
    assert client.get(f"/v1/datasets/{dataset_id}", headers=bearer(admin)).status_code == 200
    assert job_id in {item["id"] for item in client.get("/v1/jobs", headers=bearer(admin)).json()["items"]}


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer lorp_wrong"}, {"Authorization": "Basic dXNlcjpwdw=="}, {"Authorization": "Bearer"}],
)
def test_auth_refuses_missing_or_wrong_keys(api_settings, rollback_sessionmaker, headers):
    settings = api_settings.model_copy(update={"auth_required": True})
    client = client_for(settings, rollback_sessionmaker)
    for response in (client.get("/v1/jobs", headers=headers), client.post("/v1/jobs", json=DEMO_JOB, headers=headers)):
        assert_problem(response, 401)
        assert response.headers["www-authenticate"] == "Bearer"
    with rollback_sessionmaker() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0


def test_revoked_key_is_refused(api_settings, rollback_sessionmaker):
    from app.services.keys import revoke_api_key

    settings = api_settings.model_copy(update={"auth_required": True})
    key, key_id = new_key(rollback_sessionmaker, "soon-gone")
    client = client_for(settings, rollback_sessionmaker)
    assert client.get("/v1/jobs", headers=bearer(key)).status_code == 200
    with rollback_sessionmaker() as session:
        assert revoke_api_key(session, key_id)
        session.commit()
    assert_problem(client.get("/v1/jobs", headers=bearer(key)), 401)


def test_open_embedded_mode_still_checks_a_given_key(api_settings, rollback_sessionmaker):
    assert not api_settings.auth_enabled()
    client = client_for(api_settings, rollback_sessionmaker)
    assert client.get("/v1/jobs").status_code == 200
    assert_problem(client.get("/v1/jobs", headers=bearer("lorp_not-a-key")), 401)
    # Listening beyond loopback turns auth on even without auth_required.
    exposed = api_settings.model_copy(update={"host": "0.0.0.0"})
    assert_problem(client_for(exposed, rollback_sessionmaker).get("/v1/jobs"), 401)


# ------------------------------------------------------------------------------------------------------
# Cancel
# ------------------------------------------------------------------------------------------------------


def test_cancel_queued_job_is_final_and_cannot_be_claimed(api_settings, rollback_sessionmaker):
    client = client_for(api_settings, rollback_sessionmaker)
    job_id = client.post("/v1/jobs", json=DEMO_JOB).json()["id"]
    response = client.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "cancelled"
    assert body["cancel_requested_at"] is not None and body["finished_at"] is not None
    with rollback_sessionmaker() as session:
        # A worker claims with a conditional UPDATE on status='queued': it finds nothing to run.
        claimed = session.execute(
            update(Job)
            .where(Job.id == uuid.UUID(job_id), Job.status == JobStatus.queued)
            .values(status=JobStatus.running)
        ).rowcount
        assert claimed == 0
        events = session.scalars(select(JobEvent).where(JobEvent.job_id == uuid.UUID(job_id))).all()
        assert ("status", "cancelled") in [(e.kind, e.status) for e in events]
    # Cancelling again is an idempotent no-op.
    again = client.post(f"/v1/jobs/{job_id}/cancel")
    assert again.status_code == 200 and again.json()["status"] == "cancelled"


def test_cancel_running_job_requests_a_stop(api_settings, rollback_sessionmaker):
    job_id = insert_job(rollback_sessionmaker, status=JobStatus.running, stage="similarity", attempts=1)
    client = client_for(api_settings, rollback_sessionmaker)
    response = client.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "running"
    requested = response.json()["cancel_requested_at"]
    assert requested is not None
    with rollback_sessionmaker() as session:
        row = session.get(Job, job_id, populate_existing=True)
        assert row is not None and row.cancel_requested_at is not None and row.status == JobStatus.running
    # A second request keeps the first time.
    assert client.post(f"/v1/jobs/{job_id}/cancel").json()["cancel_requested_at"] == requested


@pytest.mark.parametrize("status", [JobStatus.succeeded, JobStatus.failed])
def test_cancel_finished_job_conflicts(api_settings, rollback_sessionmaker, status):
    job_id = insert_job(rollback_sessionmaker, status=status)
    client = client_for(api_settings, rollback_sessionmaker)
    assert_problem(client.post(f"/v1/jobs/{job_id}/cancel"), 409)


# ------------------------------------------------------------------------------------------------------
# Bad input: every caller mistake is a 4xx problem naming the field
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**DEMO_JOB, "colour": "blue"}, "colour"),
        ({**DEMO_JOB, "model": {"id": "demo", "revison": "main"}}, "model.revison"),
        ({**DEMO_JOB, "target": {"num_layers": 2, "ratio": 0.25}}, "target"),
        ({**DEMO_JOB, "target": {"ratio": 1.5}}, "target.ratio"),
        ({**DEMO_JOB, "target": {"num_layers": 0}}, "target.num_layers"),
        ({**DEMO_JOB, "model": {"id": "/etc/models/llama"}}, "model.id"),
        ({**DEMO_JOB, "model": {"id": "../../secret.gguf"}}, "model.id"),
        ({**DEMO_JOB, "model": {"id": "https://example.com/model.bin"}}, "model.id"),
        ({**DEMO_JOB, "model": {"id": "some/model", "trust_remote_code": True}}, "model.trust_remote_code"),
        ({**DEMO_JOB, "calibration": {"dataset": str(uuid.UUID(int=7))}}, "calibration.dataset"),
        ({**DEMO_JOB, "calibration": {"dataset": "wikitext2!"}}, "calibration.dataset"),
        ({**DEMO_JOB, "method": "magic"}, "method"),
        ({**DEMO_JOB, "calibration": {"num_samples": 0}}, "calibration.num_samples"),
        ({"target": {"num_layers": 2}}, "model"),
        ([1, 2, 3], "body"),
    ],
)
def test_bad_job_requests_name_the_field(api_settings, rollback_sessionmaker, body, field):
    client = client_for(api_settings, rollback_sessionmaker)
    assert_problem(client.post("/v1/jobs", json=body), 422, field)
    with rollback_sessionmaker() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0


def test_malformed_json_and_bad_headers(api_settings, rollback_sessionmaker):
    client = client_for(api_settings, rollback_sessionmaker)
    bad_json = client.post("/v1/jobs", content=b'{"model": ', headers={"content-type": "application/json"})
    assert_problem(bad_json, 422, "body")
    long_key = client.post("/v1/jobs", json=DEMO_JOB, headers={"Idempotency-Key": "k" * 256})
    assert_problem(long_key, 422, "Idempotency-Key")
    assert_problem(client.get("/v1/jobs/not-a-uuid"), 422, "job_id")
    assert_problem(client.get(f"/v1/jobs/{uuid.uuid4()}"), 404, "job_id")
    assert_problem(client.delete("/v1/jobs"), 405)
    assert_problem(client.get("/v1/nothing-here"), 404)


def test_oversized_json_body_is_413(api_settings, rollback_sessionmaker):
    settings = api_settings.model_copy(update={"max_body_bytes": 2048})
    client = client_for(settings, rollback_sessionmaker)
    big = {**DEMO_JOB, "model": {"id": "demo", "revision": "r" * 200}, "padding": "x" * 4096}
    body = assert_problem(client.post("/v1/jobs", json=big), 413)
    assert body["code"] == "payload_too_large" and body["instance"] == "/v1/jobs"

    # Without a Content-Length the limit is enforced while the body streams.
    def chunks():
        for _ in range(8):
            yield b" " * 1024

    streamed = client.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert_problem(streamed, 413)


def test_database_outage_is_503(tmp_path):
    settings = Settings(
        data_dir=tmp_path,
        database_url="postgresql+psycopg://postgres@127.0.0.1:1/nowhere",
        broker_url="redis://127.0.0.1:1/0",
        storage_url=(tmp_path / "artifacts").as_uri(),
    )
    client = client_for(settings, None)
    body = assert_problem(client.get("/v1/jobs"), 503)
    assert body["code"] == "database_unavailable"
    assert "127.0.0.1" not in body["detail"]


def test_unexpected_errors_are_500_problems_without_internals(api_settings, rollback_sessionmaker, monkeypatch):
    from app.services import jobs as jobs_service

    def explode(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("secret internals at /srv/lorp")

    monkeypatch.setattr(jobs_service, "list_jobs", explode)
    client = client_for(api_settings, rollback_sessionmaker, raise_server_exceptions=False)
    body = assert_problem(client.get("/v1/jobs"), 500)
    assert "secret" not in json.dumps(body)
