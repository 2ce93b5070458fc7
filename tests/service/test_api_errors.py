"""Errors across the API: malformed bodies, oversized bodies, a database outage and unexpected errors, all
as problem+json that reveal no internals."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from sqlalchemy import func, select

from app.core.config import Settings
from app.db.migrate import upgrade_head
from app.db.models import Dataset, JobStatus
from app.db.session import session_factory

from .api_helpers import (
    DEMO_JOB,
    assert_problem,
    client_for,
    insert_job,
    job_count,
    row_count,
)
from .tmpfs import fill, mounted_tmpfs, used_files


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


def test_storage_errors_map_to_problems_without_keys_or_buckets(api_settings, rollback_sessionmaker):
    """The one mapping of the error tree: a missing object is 404, an unreachable store 503, and neither
    names the key, the bucket or the endpoint."""
    from app.db.models import JobStatus
    from app.storage import artifact_store

    from .api_helpers import FILES, insert_job, publish_files

    job_id = insert_job(rollback_sessionmaker, status=JobStatus.succeeded)
    storage = artifact_store(api_settings)
    publish_files(rollback_sessionmaker, storage, job_id, FILES)
    storage.delete_prefix(f"jobs/{job_id}/heatmap.png")  # the row stays, the object goes
    client = client_for(api_settings, rollback_sessionmaker)
    missing = assert_problem(client.get(f"/v1/jobs/{job_id}/artifacts/heatmap.png"), 404)
    assert missing["code"] == "object_missing" and missing["detail"] == "the stored file is missing"
    assert str(job_id) not in json.dumps({k: v for k, v in missing.items() if k != "instance"})

    unreachable = api_settings.model_copy(
        update={
            "storage_url": "s3://secret-bucket-name/x",
            "s3_endpoint_url": "http://127.0.0.1:9",
            "s3_access_key": "k",
            "s3_secret_key": "s",
        }
    )
    upload = client_for(unreachable, rollback_sessionmaker).post(
        "/v1/datasets", files={"file": ("a.txt", b"some calibration text", "text/plain")}
    )
    down = assert_problem(upload, 503)
    assert down["code"] == "storage_unavailable" and "retry later" in down["detail"]
    assert "secret-bucket-name" not in upload.text and "127.0.0.1:9" not in upload.text


# -- text no database can store, JSON nested too deep: 422 naming the field, on every route -----------------

JSON = {"content-type": "application/json"}
NOTIFY = {"url": "https://hooks.example.com/lorp", "secret": "s" * 24}


def _job_with(path: str, value: str) -> dict[str, Any]:
    """DEMO_JOB with ``value`` placed at the dotted ``path`` (created where DEMO_JOB has nothing)."""
    body: dict[str, Any] = json.loads(json.dumps({**DEMO_JOB, "notify": NOTIFY}))
    *parents, leaf = path.split(".")
    node = body
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return body


@pytest.mark.parametrize(
    ("raw", "field", "message"),
    [
        pytest.param(
            json.dumps(_job_with("notify.url", "https://hooks.example.com/\x00x")), "notify.url", "NUL", id="notify.url"
        ),
        pytest.param(json.dumps(_job_with("notify.secret", "s" * 20 + "\x00")), "notify.secret", "NUL", id="secret"),
        pytest.param(json.dumps(_job_with("model.id", "org/na\x00me")), "model.id", "NUL", id="model.id"),
        pytest.param(
            json.dumps({**DEMO_JOB, "evaluation": {"prompts": ["fine", "a\x00b"]}}),
            "evaluation.prompts.1",
            "NUL",
            id="prompt",
        ),
        pytest.param(
            json.dumps({**DEMO_JOB, "calibration": {"dataset": "hf:x\x00"}}), "calibration.dataset", "NUL", id="dataset"
        ),
        pytest.param(json.dumps({**DEMO_JOB, "unknown\x00": 1}), "unknown\\u0000", "NUL", id="NUL in a key"),
        pytest.param(
            '{"model": {"id": "demo"}, "target": {"num_layers": 2}, "evaluation": {"prompts": ["\\ud800"]}}',
            "evaluation.prompts.0",
            "surrogate",
            id="surrogate in a prompt",
        ),
        pytest.param(
            '{"model": {"id": "demo"}, "target": {"num_layers": 2}, "\\udfff": 1}',
            "\\udfff",
            "surrogate",
            id="surrogate key",
        ),
    ],
)
def test_job_body_text_no_database_can_store_is_422_naming_it(api_settings, rollback_sessionmaker, raw, field, message):
    """NUL reached Postgres (a 500 for notify.url, notify.secret and prompts); an unpaired surrogate was a 422
    that did not say why, or named only ``body``."""
    settings = api_settings.model_copy(update={"webhook_allowed_hosts": ["hooks.example.com"]})
    before = job_count(rollback_sessionmaker)
    client = client_for(settings, rollback_sessionmaker, raise_server_exceptions=False)
    response = client.post("/v1/jobs", content=raw.encode(), headers=JSON)
    body = assert_problem(response, 422, field)
    assert message in next(e["message"] for e in body["errors"] if e["field"] == field)
    assert job_count(rollback_sessionmaker) == before


def test_plans_body_and_idempotency_key_with_nul_are_422(api_settings, rollback_sessionmaker):
    client = client_for(api_settings, rollback_sessionmaker, raise_server_exceptions=False)
    plans = client.post(
        "/v1/plans", json={"job_id": str(uuid.uuid4()), "budgets": [1], "methods": ["lorp\x00"]}, headers=JSON
    )
    assert "NUL" in assert_problem(plans, 422, "methods.0")["errors"][0]["message"]
    # Idempotency-Key is stored with the job and looked up first: a NUL in it reached Postgres (500).
    keyed = client.post("/v1/jobs", json=DEMO_JOB, headers={"Idempotency-Key": "key-\x00"})
    assert "NUL" in assert_problem(keyed, 422, "Idempotency-Key")["errors"][0]["message"]


def test_path_and_query_parameters_with_nul_are_422(api_settings, rollback_sessionmaker):
    job_id = insert_job(rollback_sessionmaker, status=JobStatus.succeeded)
    client = client_for(api_settings, rollback_sessionmaker, raise_server_exceptions=False)
    # An artifact name is looked up in the database: a NUL in it was a 500.
    artifact = client.get(f"/v1/jobs/{job_id}/artifacts/model%00.safetensors")
    problem = assert_problem(artifact, 422, "name")
    assert "\x00" not in json.dumps(problem)  # the response names it escaped, never raw
    listed = client.get("/v1/jobs", params={"cursor": "x\x00"})
    assert "NUL" in assert_problem(listed, 422, "cursor")["errors"][0]["message"]


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        pytest.param(
            b'{"model": {"id": "demo"}, "target": {"num_layers": 2}, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            "nests deeper than",
            id="100,000 nested arrays",
        ),
        pytest.param(b'{"model": {"id": "demo"}, "target": {"ratio": NaN}}', "NaN is not a JSON number", id="NaN"),
        pytest.param(
            b'{"model": {"id": "demo"}, "target": {"num_layers": 2}, "x": -Infinity}',
            "-Infinity is not a JSON number",
            id="-Infinity",
        ),
    ],
)
def test_json_nested_too_deep_or_with_nan_is_422_body(api_settings, rollback_sessionmaker, raw, needle):
    """100,000 nested arrays made the parser recurse until it failed (400 "error parsing the body")."""
    settings = api_settings.model_copy(update={"max_body_bytes": 512 * 1024})
    client = client_for(settings, rollback_sessionmaker, raise_server_exceptions=False)
    body = assert_problem(client.post("/v1/jobs", content=raw, headers=JSON), 422, "body")
    assert needle in body["errors"][0]["message"]


# -- a full disk: 503 disk_full, not a 500 -------------------------------------------------------------------


def test_upload_onto_a_full_disk_is_503_disk_full_and_stores_nothing(api_settings, rollback_sessionmaker, tmp_path):
    with mounted_tmpfs(tmp_path / "full", 512) as disk:
        settings = api_settings.model_copy(update={"storage_url": (disk / "artifacts").as_uri()})
        fill(disk, leave_bytes=16 * 1024)
        datasets_before = row_count(rollback_sessionmaker, Dataset)
        client = client_for(settings, rollback_sessionmaker, raise_server_exceptions=False)
        response = client.post("/v1/datasets", files={"file": ("c.txt", b"calibration text " * 4096)})
        body = assert_problem(response, 503)
        assert body["code"] == "disk_full" and "disk is full" in body["detail"]
        assert response.headers["retry-after"] == "5"
        assert str(disk) not in response.text
        assert used_files(disk) == []  # the store's temporary file is gone too
    with rollback_sessionmaker() as session:
        assert session.scalar(select(func.count()).select_from(Dataset)) == datasets_before


def test_embedded_database_on_a_full_disk_is_503_disk_full(tmp_path):
    """SQLite on a full disk answers reads and fails writes ("database or disk is full").

    Reads need the WAL index (``lorp.db-shm``), which SQLite deletes when a database's last connection
    closes and cannot create again on a full disk ("disk I/O error"): the service has read before its
    disk fills, as a running one has, and its pool keeps that connection (and so the index) open."""
    with mounted_tmpfs(tmp_path / "embedded", 4096) as disk:
        settings = Settings(data_dir=disk)
        upgrade_head(settings.sqlalchemy_url)
        client = client_for(settings, session_factory(settings.sqlalchemy_url), raise_server_exceptions=False)
        assert client.get("/v1/jobs").status_code == 200
        fill(disk)
        big = {**DEMO_JOB, "evaluation": {"prompts": ["p" * 2000] * 16}}
        response = client.post("/v1/jobs", json=big)
        body = assert_problem(response, 503)
        assert body["code"] == "disk_full", body
        assert client.get("/v1/jobs").status_code == 200  # reads still work


def test_input_that_reads_like_a_full_disk_is_still_the_callers_error(api_settings, rollback_sessionmaker):
    """Errors that quote the caller's input are never taken for a full disk by their wording."""
    client = client_for(api_settings, rollback_sessionmaker)
    body = {**DEMO_JOB, "model": {"id": "./No space left on device (os error 28)"}}
    problem = assert_problem(client.post("/v1/jobs", json=body), 422, "model.id")
    assert problem["code"] == "invalid_request"
