"""Errors across the API: malformed bodies, oversized bodies, a database outage and unexpected errors, all
as problem+json that reveal no internals."""

from __future__ import annotations

import json
import uuid
from typing import Any

from app.core.config import Settings

from .api_helpers import (
    DEMO_JOB,
    assert_problem,
    client_for,
)


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
    from app.api.deps import build_storage
    from app.db.models import JobStatus

    from .api_helpers import FILES, insert_job, publish_files

    job_id = insert_job(rollback_sessionmaker, status=JobStatus.succeeded)
    storage = build_storage(api_settings)
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
