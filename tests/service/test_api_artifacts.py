"""Artifacts: a succeeded job's files listed and streamed (local storage) or redirected to presigned URLs (S3)."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

from app.db.models import JobStatus
from app.storage import artifact_store

from .api_helpers import (
    FILES,
    assert_problem,
    client_for,
    insert_job,
    publish_files,
)


def test_artifacts_are_listed_and_streamed(api_settings, rollback_sessionmaker):
    job_id = insert_job(rollback_sessionmaker, status=JobStatus.succeeded)
    storage = artifact_store(api_settings)
    publish_files(rollback_sessionmaker, storage, job_id, FILES)
    client = client_for(api_settings, rollback_sessionmaker)

    listed = client.get(f"/v1/jobs/{job_id}/artifacts")
    assert listed.status_code == 200
    items = {item["name"]: item for item in listed.json()}
    assert set(items) == set(FILES)
    for name, (data, content_type) in FILES.items():
        item = items[name]
        assert item["size_bytes"] == len(data)
        assert item["sha256"] == hashlib.sha256(data).hexdigest()
        assert item["url"] == f"/v1/jobs/{job_id}/artifacts/{name}"
        download = client.get(item["url"])
        assert download.status_code == 200
        assert download.content == data
        assert download.headers["content-type"].startswith(content_type)
        assert download.headers["content-length"] == str(len(data))

    heatmap = client.get(f"/v1/jobs/{job_id}/heatmap.png")
    assert heatmap.status_code == 200 and heatmap.headers["content-type"] == "image/png"
    assert heatmap.content == FILES["heatmap.png"][0]

    # Names are looked up in the table, never joined into a path.
    (Path(api_settings.artifact_storage_url.removeprefix("file://")) / "secret.txt").write_text("classified-bytes")
    for name in ("%2E%2E/%2E%2E/secret.txt", "..%2F..%2Fsecret.txt", "model/%2E%2E/%2E%2E/secret.txt", "model", "x"):
        response = client.get(f"/v1/jobs/{job_id}/artifacts/{name}")
        assert response.status_code == 404, (name, response.status_code)
        assert b"classified-bytes" not in response.content
    # A literal ../ is collapsed by the client into another route, which does not serve files either.
    response = client.get(f"/v1/jobs/{job_id}/artifacts/../../secret.txt")
    assert response.status_code in (404, 422) and b"classified-bytes" not in response.content

    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["links"]["artifacts"] == f"/v1/jobs/{job_id}/artifacts"
    assert job["links"]["heatmap"] == f"/v1/jobs/{job_id}/heatmap.png"


def test_unfinished_jobs_list_no_artifacts(api_settings, rollback_sessionmaker):
    job_id = insert_job(rollback_sessionmaker, status=JobStatus.running)
    publish_files(rollback_sessionmaker, artifact_store(api_settings), job_id, {"heatmap.png": FILES["heatmap.png"]})
    client = client_for(api_settings, rollback_sessionmaker)
    assert client.get(f"/v1/jobs/{job_id}/artifacts").json() == []
    assert_problem(client.get(f"/v1/jobs/{job_id}/heatmap.png"), 404)
    assert_problem(client.get(f"/v1/jobs/{job_id}/artifacts/heatmap.png"), 404)


def test_s3_artifacts_redirect_to_a_presigned_url(api_settings, rollback_sessionmaker, s3_server):
    import urllib.request

    from .moto_server import ACCESS_KEY, SECRET_KEY, create_bucket

    bucket = f"lorp-api-{uuid.uuid4().hex[:8]}"
    create_bucket(s3_server, bucket)
    settings = api_settings.model_copy(
        update={
            "storage_url": f"s3://{bucket}/artifacts",
            "s3_endpoint_url": s3_server,
            "s3_access_key": ACCESS_KEY,
            "s3_secret_key": SECRET_KEY,
        }
    )
    job_id = insert_job(rollback_sessionmaker, status=JobStatus.succeeded)
    storage = artifact_store(settings)
    publish_files(rollback_sessionmaker, storage, job_id, {"model/config.json": FILES["model/config.json"]})
    client = client_for(settings, rollback_sessionmaker)
    response = client.get(f"/v1/jobs/{job_id}/artifacts/model/config.json", follow_redirects=False)
    assert response.status_code == 302
    location = response.headers["location"]
    assert location.startswith(s3_server) and "Signature" in location
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(location, timeout=10) as fetched:
        assert fetched.read() == FILES["model/config.json"][0]
        assert "config.json" in fetched.headers["Content-Disposition"]
