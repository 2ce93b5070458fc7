"""API tests for datasets, artifacts, analysis, plans, the job summary, health and metrics."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from app.api.deps import build_storage
from app.core.config import Settings
from app.db.models import Artifact, Dataset, JobEvent, JobStatus, Metric, Plan
from app.storage import storage_from_url
from lorp.selection import SelectionOptions, analyze_structure
from lorp.selection import select as engine_select

from .test_api import (
    DEMO_JOB,
    assert_problem,
    client_for,
    insert_analysis,
    insert_job,
    isolated_queue,
    queued_messages,
    similarity_stats,
)

REPO = Path(__file__).resolve().parents[2]

# ------------------------------------------------------------------------------------------------------
# Datasets
# ------------------------------------------------------------------------------------------------------


@pytest.fixture()
def api_settings(service_settings):
    return isolated_queue(service_settings)


def test_upload_text_dataset_and_use_it(api_settings, rollback_sessionmaker):
    client = client_for(api_settings, rollback_sessionmaker)
    content = "The first article.\n\nThe second one, with ünïcode.\n".encode()
    response = client.post("/v1/datasets", files={"file": ("wiki.txt", content, "text/plain")}, data={"name": "wiki"})
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert response.headers["location"] == f"/v1/datasets/{dataset['id']}"
    assert dataset["format"] == "txt" and dataset["name"] == "wiki" and dataset["text_field"] is None
    assert dataset["size_bytes"] == len(content)
    assert dataset["sha256"] == hashlib.sha256(content).hexdigest()

    with rollback_sessionmaker() as session:
        row = session.get(Dataset, uuid.UUID(dataset["id"]))
        assert row is not None and row.storage_key == f"datasets/{dataset['id']}/data.txt"
    storage = build_storage(api_settings)
    with storage.open(f"datasets/{dataset['id']}/data.txt") as fh:
        assert fh.read() == content

    assert client.get(f"/v1/datasets/{dataset['id']}").json() == dataset
    job = client.post("/v1/jobs", json={**DEMO_JOB, "calibration": {"dataset": dataset["reference"]}})
    assert job.status_code == 202, job.text
    assert job.json()["request"]["calibration"]["dataset"] == dataset["id"]


def test_upload_jsonl_counts_documents(api_settings, rollback_sessionmaker):
    client = client_for(api_settings, rollback_sessionmaker)
    lines = [json.dumps({"body": f"document {i}", "id": i}) for i in range(5)]
    content = ("\n".join(lines) + "\n\n").encode()
    response = client.post("/v1/datasets", files={"file": ("docs.jsonl", content)}, data={"text_field": "body"})
    assert response.status_code == 201, response.text
    assert response.json()["num_documents"] == 5
    assert response.json()["text_field"] == "body" and response.json()["format"] == "jsonl"


@pytest.mark.parametrize(
    ("filename", "content", "data", "field"),
    [
        ("weights.bin", b"hello", {}, "file"),
        ("corpus.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", {}, "file"),
        ("corpus.txt", b"caf\xe9 latin-1", {}, "file"),
        ("corpus.txt", b"   \n\n", {}, "file"),
        ("docs.jsonl", b'{"text": "ok"}\n{"content": "no text field"}\n', {}, "text_field"),
        ("docs.jsonl", b'{"text": "ok"}\n{"text": 3}\n', {}, "text_field"),
        ("docs.jsonl", b'{"text": "ok"}\n["not", "an", "object"]\n', {}, "file"),
        ("docs.jsonl", b'{"text": "ok"}\n{broken\n', {}, "file"),
        ("corpus.txt", b"plain text", {"text_field": "text"}, "text_field"),
    ],
)
def test_bad_uploads_are_422_and_store_nothing(api_settings, rollback_sessionmaker, filename, content, data, field):
    client = client_for(api_settings, rollback_sessionmaker)
    response = client.post("/v1/datasets", files={"file": (filename, content)}, data=data)
    assert_problem(response, 422, field)
    assert build_storage(api_settings).list("datasets") == []
    with rollback_sessionmaker() as session:
        assert session.scalars(select(Dataset)).all() == []


def test_missing_file_is_422(api_settings, rollback_sessionmaker):
    client = client_for(api_settings, rollback_sessionmaker)
    assert_problem(client.post("/v1/datasets", data={"name": "x"}), 422, "file")
    assert_problem(client.get("/v1/datasets/not-a-uuid"), 422, "dataset_id")
    assert_problem(client.get(f"/v1/datasets/{uuid.uuid4()}"), 404)


def test_oversized_upload_is_413_and_stores_nothing(api_settings, rollback_sessionmaker):
    settings = api_settings.model_copy(update={"max_upload_bytes": 2048})
    client = client_for(settings, rollback_sessionmaker)
    # Slightly over the file limit: it passes the request-size guard and is refused while streamed.
    near = client.post("/v1/datasets", files={"file": ("big.txt", b"a" * 3000)})
    assert assert_problem(near, 413)["code"] == "payload_too_large"
    # Far over: refused from its Content-Length before the body is read.
    far = client.post("/v1/datasets", files={"file": ("big.txt", b"a" * 200_000)})
    assert_problem(far, 413)
    assert build_storage(settings).list("datasets") == []


# ------------------------------------------------------------------------------------------------------
# Artifacts
# ------------------------------------------------------------------------------------------------------


def _publish(factory, storage, job_id: uuid.UUID, files: dict[str, tuple[bytes, str]]) -> None:
    with factory() as session:
        for name, (data, content_type) in files.items():
            key = f"jobs/{job_id}/{name}"
            stored = storage.put_bytes(key, data, content_type=content_type)
            session.add(
                Artifact(
                    job_id=job_id,
                    name=name,
                    storage_key=key,
                    size_bytes=stored.size,
                    sha256=stored.sha256,
                    content_type=content_type,
                )
            )
        session.commit()


FILES = {
    "model/config.json": (b'{"num_hidden_layers": 10}', "application/json"),
    "model/model.safetensors": (bytes(range(256)) * 4000, "application/octet-stream"),
    "heatmap.png": (b"\x89PNG\r\n\x1a\nfake-png-bytes", "image/png"),
}


def test_artifacts_are_listed_and_streamed(api_settings, rollback_sessionmaker):
    job_id = insert_job(rollback_sessionmaker, status=JobStatus.succeeded)
    storage = build_storage(api_settings)
    _publish(rollback_sessionmaker, storage, job_id, FILES)
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
    _publish(rollback_sessionmaker, build_storage(api_settings), job_id, {"heatmap.png": FILES["heatmap.png"]})
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
    storage = build_storage(settings)
    _publish(rollback_sessionmaker, storage, job_id, {"model/config.json": FILES["model/config.json"]})
    client = client_for(settings, rollback_sessionmaker)
    response = client.get(f"/v1/jobs/{job_id}/artifacts/model/config.json", follow_redirects=False)
    assert response.status_code == 302
    location = response.headers["location"]
    assert location.startswith(s3_server) and "Signature" in location
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(location, timeout=10) as fetched:
        assert fetched.read() == FILES["model/config.json"][0]
        assert "config.json" in fetched.headers["Content-Disposition"]


# ------------------------------------------------------------------------------------------------------
# Analysis, summary and plans
# ------------------------------------------------------------------------------------------------------


def _finished_job(factory, **fields) -> tuple[uuid.UUID, uuid.UUID]:
    analysis_id = insert_analysis(factory, n_blocks=12)
    job_id = insert_job(
        factory,
        status=JobStatus.succeeded,
        analysis_id=analysis_id,
        chosen_method="lorp",
        pruned_layers=[3, 7],
        **fields,
    )
    with factory() as session:
        session.add_all(
            [
                Plan(job_id=job_id, name="lorp", k=3, pruned_layers=[3, 7], validation_perplexity=21.5, chosen=True),
                Plan(job_id=job_id, name="shortgpt", k=None, pruned_layers=[8, 9], validation_perplexity=25.0),
                Metric(job_id=job_id, name="perplexity", phase="dense", value=20.0, unit="ppl"),
                Metric(job_id=job_id, name="perplexity", phase="pruned", value=22.0, unit="ppl"),
                Metric(job_id=job_id, name="perplexity", phase="ratio", value=1.1, unit=None),
                Metric(job_id=job_id, name="tokens_per_s", phase="dense", value=100.0, unit="tokens/s"),
                Metric(job_id=job_id, name="num_layers", phase="dense", value=12.0, unit=""),
                Metric(job_id=job_id, name="num_layers", phase="pruned", value=10.0, unit=""),
                Metric(job_id=job_id, name="weights_bytes", phase="pruned", value=123456789.0, unit="B"),
            ]
        )
        session.commit()
    return job_id, analysis_id


def test_job_summary_once_finished(api_settings, rollback_sessionmaker):
    job_id, _ = _finished_job(rollback_sessionmaker)
    client = client_for(api_settings, rollback_sessionmaker)
    job = client.get(f"/v1/jobs/{job_id}").json()
    summary = job["summary"]
    assert summary["rls"] == pytest.approx(0.42) and summary["k"] == 3 and len(summary["clusters"]) == 12
    assert summary["chosen_method"] == "lorp" and summary["pruned_layers"] == [3, 7]
    plans = {p["name"]: p for p in summary["plans"]}
    assert plans["lorp"]["chosen"] and plans["lorp"]["validation_perplexity"] == 21.5
    assert not plans["shortgpt"]["chosen"] and plans["shortgpt"]["pruned_layers"] == [8, 9]
    assert summary["metrics"] == {
        "dense": {"perplexity": 20.0, "tokens_per_s": 100.0, "num_layers": 12},
        "pruned": {"perplexity": 22.0, "num_layers": 10, "weights_bytes": 123456789},
        "ratio": {"perplexity": 1.1},
    }
    # Counts are integers in the JSON itself (12, not 12.0), as they are in report.json.
    assert type(summary["metrics"]["dense"]["num_layers"]) is int
    assert type(summary["metrics"]["pruned"]["weights_bytes"]) is int
    assert type(summary["metrics"]["dense"]["tokens_per_s"]) is float
    assert summary["metric_units"]["tokens_per_s"] == "tokens/s"
    assert summary["links"]["analysis"] == f"/v1/jobs/{job_id}/analysis"


def test_job_summary_shows_its_own_structure(api_settings, rollback_sessionmaker):
    """The analysis row is shared; a job's summary shows the RLS/K/clusters its own worker computed."""
    own = {"rls": 0.3, "k": 5, "clusters": [0, 0, 1, 1, 2, 2, 3, 3, 3, 4, 4, 4], "num_blocks": 12}
    job_id, _ = _finished_job(rollback_sessionmaker, summary=own)
    client = client_for(api_settings, rollback_sessionmaker)
    summary = client.get(f"/v1/jobs/{job_id}").json()["summary"]
    assert summary["k"] == 5 and summary["rls"] == pytest.approx(0.3) and summary["clusters"] == own["clusters"]
    assert summary["report"] == own


def test_unfinished_job_has_no_summary(api_settings, rollback_sessionmaker):
    client = client_for(api_settings, rollback_sessionmaker)
    for status in (JobStatus.queued, JobStatus.running, JobStatus.failed, JobStatus.cancelled):
        job_id = insert_job(rollback_sessionmaker, status=status)
        body = client.get(f"/v1/jobs/{job_id}").json()
        assert body["status"] == status.value and body["summary"] is None


def test_analysis_is_404_until_it_exists(api_settings, rollback_sessionmaker):
    client = client_for(api_settings, rollback_sessionmaker)
    job_id = client.post("/v1/jobs", json=DEMO_JOB).json()["id"]
    assert_problem(client.get(f"/v1/jobs/{job_id}/analysis"), 404)


def test_analysis_returns_s_d_structure_and_scores(api_settings, rollback_sessionmaker):
    job_id, analysis_id = _finished_job(rollback_sessionmaker)
    client = client_for(api_settings, rollback_sessionmaker)
    response = client.get(f"/v1/jobs/{job_id}/analysis")
    assert response.status_code == 200, response.text
    body = response.json()
    S, D = similarity_stats(12)
    assert body["id"] == str(analysis_id) and body["num_blocks"] == 12
    assert np.allclose(body["similarity"], S) and np.allclose(body["angular_distance"], D)
    assert {p["name"] for p in body["plans"]} == {"lorp", "shortgpt"}
    assert body["provenance"] == {"library": "test"}
    expected = engine_select("shortgpt", S, D, 2, SelectionOptions())
    assert body["scores"]["shortgpt"]["block_influence"] == pytest.approx(expected.scores["block_influence"])
    assert set(body["scores"]) == {"lorp", "shortgpt", "streamline", "angular", "reverse"}


def test_analysis_structure_follows_each_jobs_options(api_settings, rollback_sessionmaker):
    """Jobs sharing one stored analysis each see LoRP's structure for their own K override."""
    analysis_id = insert_analysis(rollback_sessionmaker, n_blocks=12)
    base = {"model": {"id": "demo"}, "target": {"num_layers": 2}}
    plain = insert_job(rollback_sessionmaker, status=JobStatus.succeeded, analysis_id=analysis_id, request=base)
    forced = insert_job(
        rollback_sessionmaker,
        status=JobStatus.succeeded,
        analysis_id=analysis_id,
        request={**base, "options": {"num_clusters": 5}},
    )
    client = client_for(api_settings, rollback_sessionmaker)
    S, _ = similarity_stats(12)
    for job_id, options in ((plain, SelectionOptions()), (forced, SelectionOptions(num_clusters=5))):
        body = client.get(f"/v1/jobs/{job_id}/analysis").json()
        expected = analyze_structure(S, options)
        assert body["id"] == str(analysis_id)
        assert body["k"] == expected.k and body["clusters"] == expected.clusters, job_id
        assert body["rls"] == pytest.approx(expected.rls)
    assert client.get(f"/v1/jobs/{forced}/analysis").json()["k"] == 5
    assert client.get(f"/v1/jobs/{plain}/analysis").json()["k"] != 5


def test_plans_match_the_engine(api_settings, rollback_sessionmaker):
    job_id, analysis_id = _finished_job(rollback_sessionmaker)
    client = client_for(api_settings, rollback_sessionmaker)
    response = client.post("/v1/plans", json={"job_id": str(job_id), "budgets": [1, 2, 4]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["analysis_id"] == str(analysis_id) and body["num_blocks"] == 12
    S, D = similarity_stats(12)
    got = {(p["method"], p["budget"]): p for p in body["plans"]}
    assert len(got) == 5 * 3
    for method in ("lorp", "shortgpt", "streamline", "angular", "reverse"):
        for n in (1, 2, 4):
            expected = engine_select(method, S, D, n, SelectionOptions())
            plan = got[(method, n)]
            assert plan["pruned_layers"] == expected.pruned_layers, (method, n)
            assert plan["k"] == expected.structure.k
            assert plan["clusters"] == expected.structure.clusters
            assert plan["rls"] == pytest.approx(expected.structure.rls)

    with_options = client.post(
        "/v1/plans",
        json={"job_id": str(job_id), "ratios": [0.25], "methods": ["lorp"], "num_clusters": 4, "protected_layers": []},
    )
    assert with_options.status_code == 200, with_options.text
    plan = with_options.json()["plans"][0]
    expected = engine_select("lorp", S, D, 3, SelectionOptions(num_clusters=4, protected=()))
    assert plan["budget"] == 3 and plan["ratio"] == 0.25 and plan["k"] == 4
    assert plan["pruned_layers"] == expected.pruned_layers


def test_plans_agree_with_the_lorp_select_cli(api_settings, rollback_sessionmaker, tmp_path):
    """/v1/plans on a job's stored S and D gives what `lorp select` gives on the exported analysis."""
    job_id, _ = _finished_job(rollback_sessionmaker)
    client = client_for(api_settings, rollback_sessionmaker)
    analysis = client.get(f"/v1/jobs/{job_id}/analysis").json()
    npz = tmp_path / "analysis.npz"
    np.savez(npz, S=np.array(analysis["similarity"]), D=np.array(analysis["angular_distance"]))
    plans = client.post("/v1/plans", json={"job_id": str(job_id), "budgets": [3]}).json()["plans"]
    for plan in plans:
        argv = ["select", "--similarity", str(npz), "--num-layers", "3", "--method", plan["method"], "--json"]
        cli = subprocess.run(
            [sys.executable, "-m", "worker.cli", *argv],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert cli.returncode == 0, cli.stderr
        printed = json.loads(cli.stdout)
        assert printed["pruned_layers"] == plan["pruned_layers"]
        assert printed["k"] == plan["k"] and printed["clusters"] == plan["clusters"]


@pytest.mark.parametrize(
    ("extra", "status", "field"),
    [
        ({"budgets": [2], "methods": ["lorp", "auto"]}, 422, "methods.1"),
        ({"budgets": [2], "methods": ["magic"]}, 422, "methods.0"),
        ({"budgets": [2, 11]}, 422, "budgets.1"),
        ({"budgets": [0]}, 422, "budgets.0"),
        ({"ratios": [0.01]}, 422, "ratios.0"),
        ({"ratios": [1.0]}, 422, "ratios.0"),
        ({"budgets": [2], "ratios": [0.2]}, 422, None),
        ({}, 422, None),
        ({"budgets": list(range(1, 66))}, 422, "budgets"),
        ({"budgets": [2], "num_clusters": 11}, 422, "num_clusters"),
        ({"budgets": [2], "protected_layers": [99]}, 422, "protected_layers"),
        ({"budgets": [2], "unknown": 1}, 422, "unknown"),
    ],
)
def test_bad_plan_requests(api_settings, rollback_sessionmaker, extra, status, field):
    job_id, _ = _finished_job(rollback_sessionmaker)
    client = client_for(api_settings, rollback_sessionmaker)
    assert_problem(client.post("/v1/plans", json={"job_id": str(job_id), **extra}), status, field)


def test_plans_need_an_analysis(api_settings, rollback_sessionmaker):
    client = client_for(api_settings, rollback_sessionmaker)
    job_id = client.post("/v1/jobs", json=DEMO_JOB).json()["id"]
    problem = assert_problem(client.post("/v1/plans", json={"job_id": job_id, "budgets": [2]}), 409, "job_id")
    assert "yet (status queued)" in problem["detail"]
    assert_problem(client.post("/v1/plans", json={"job_id": str(uuid.uuid4()), "budgets": [2]}), 404, "job_id")


@pytest.mark.parametrize("status", [JobStatus.failed, JobStatus.cancelled])
def test_a_job_that_ended_without_an_analysis_says_it_will_not_get_one(api_settings, rollback_sessionmaker, status):
    job_id = insert_job(rollback_sessionmaker, status=status, error_code="calibration_data", error_message="no text")
    client = client_for(api_settings, rollback_sessionmaker)
    for response, code in (
        (client.post("/v1/plans", json={"job_id": str(job_id), "budgets": [2]}), 409),
        (client.get(f"/v1/jobs/{job_id}/analysis"), 404),
    ):
        detail = assert_problem(response, code)["detail"]
        assert f"{status.value} before its similarity analysis was computed" in detail, detail
        assert "yet" not in detail


# ------------------------------------------------------------------------------------------------------
# Health and metrics
# ------------------------------------------------------------------------------------------------------


def test_healthz_and_readyz(api_settings, rollback_sessionmaker):
    client = client_for(api_settings, rollback_sessionmaker)
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": {"ok": True}, "broker": {"ok": True}, "storage": {"ok": True}}


def test_readyz_is_503_when_the_broker_is_down(api_settings, rollback_sessionmaker):
    settings = api_settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    client = client_for(settings, rollback_sessionmaker)
    response = client.get("/readyz")
    body = assert_problem(response, 503, "broker")
    assert body["checks"]["database"] == {"ok": True} and body["checks"]["storage"] == {"ok": True}
    assert body["checks"]["broker"]["ok"] is False


def test_metrics_expose_http_jobs_queue_and_stages(api_settings, rollback_sessionmaker, redis_url):
    client = client_for(api_settings, rollback_sessionmaker)
    job_id = client.post("/v1/jobs", json=DEMO_JOB).json()["id"]
    client.get(f"/v1/jobs/{job_id}")
    running = insert_job(rollback_sessionmaker, status=JobStatus.running)
    now = dt.datetime.now(dt.UTC)
    with rollback_sessionmaker() as session:
        session.add_all(
            [
                JobEvent(job_id=running, kind="stage", stage="similarity", at=now - dt.timedelta(seconds=50)),
                JobEvent(job_id=running, kind="stage", stage="selection", at=now - dt.timedelta(seconds=10)),
                JobEvent(job_id=running, kind="stage", stage="evaluation", at=now - dt.timedelta(seconds=8)),
            ]
        )
        session.commit()
    assert len(queued_messages(redis_url, api_settings.queue_name)) == 1

    text = client.get("/metrics").text
    assert 'lorp_http_request_duration_seconds_count{method="GET",route="/v1/jobs/{job_id}",status="200"} 1.0' in text
    assert 'lorp_http_request_duration_seconds_count{method="POST",route="/v1/jobs",status="202"} 1.0' in text
    assert 'lorp_jobs{status="queued"} 1.0' in text
    assert 'lorp_jobs{status="running"} 1.0' in text
    assert f'lorp_queue_depth{{queue="{api_settings.queue_name}"}} 1.0' in text
    assert 'lorp_stage_duration_seconds_bucket{le="30.0",stage="similarity"} 0.0' in text
    assert 'lorp_stage_duration_seconds_bucket{le="60.0",stage="similarity"} 1.0' in text
    assert 'lorp_stage_duration_seconds_gsum{stage="selection"} 2.0' in text
    assert 'stage="evaluation"' not in text  # still running: no duration yet


@pytest.fixture(params=["postgres", "sqlite"])
def any_database(request, api_settings, rollback_sessionmaker, tmp_path):
    """(settings, sessionmaker) on Postgres (rolled back) or on the embedded mode's SQLite database."""
    if request.param == "postgres":
        return api_settings, rollback_sessionmaker
    from app.db.migrate import upgrade_head
    from app.db.session import session_factory

    settings = Settings(data_dir=tmp_path / "embedded")
    settings.resolved_data_dir.mkdir(parents=True)
    upgrade_head(settings.sqlalchemy_url)
    assert settings.sqlalchemy_url.startswith("sqlite")
    return settings, session_factory(settings.sqlalchemy_url)


def test_metrics_with_jobs_in_every_state(any_database):
    settings, factory = any_database
    now = dt.datetime.now(dt.UTC)
    for status in JobStatus:
        job_id = insert_job(factory, status=status, stage="capture", finished_at=now if status.terminal else None)
        with factory() as session:
            session.add_all(
                [
                    JobEvent(job_id=job_id, kind="status", status="queued", at=now - dt.timedelta(seconds=100)),
                    JobEvent(job_id=job_id, kind="stage", stage="loading", at=now - dt.timedelta(seconds=90)),
                    JobEvent(job_id=job_id, kind="stage", stage="capture", at=now - dt.timedelta(seconds=70)),
                ]
            )
            if status.terminal:
                session.add(
                    JobEvent(job_id=job_id, kind="status", status=status.value, at=now - dt.timedelta(seconds=20))
                )
            session.commit()
    client = client_for(settings, factory)
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    text = response.text
    for status in JobStatus:
        assert f'lorp_jobs{{status="{status.value}"}} 1.0' in text
    # Five jobs spent 20 s loading; the three that ended spent 50 s in capture.
    assert 'lorp_stage_duration_seconds_gcount{stage="loading"} 5.0' in text
    assert 'lorp_stage_duration_seconds_gsum{stage="loading"} 100.0' in text
    assert 'lorp_stage_duration_seconds_bucket{le="30.0",stage="capture"} 0.0' in text
    assert 'lorp_stage_duration_seconds_bucket{le="60.0",stage="capture"} 3.0' in text


def test_api_never_imports_torch_or_the_worker(tmp_path):
    # Serving a submission runs the budget preflight and the enqueue path too, not just the imports.
    code = (
        "import sys, uuid\n"
        "from fastapi.testclient import TestClient\n"
        "from app.core.config import Settings\n"
        "from app.db.migrate import upgrade_head\n"
        "from app.main import create_app\n"
        "s = Settings(data_dir=sys.argv[1])\n"
        "s.resolved_data_dir.mkdir(parents=True)\n"
        "upgrade_head(s.sqlalchemy_url)\n"
        "r = TestClient(create_app(s)).post('/v1/jobs', json={'model': {'id': 'demo'}, 'target': {'num_layers': 99}})\n"
        "assert r.status_code == 422, r.text\n"
        "loaded = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'worker'})\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "data")], check=True, cwd=REPO)


def test_openapi_documents_the_routes(api_settings, rollback_sessionmaker):
    client = client_for(api_settings, rollback_sessionmaker)
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/cancel",
        "/v1/jobs/{job_id}/analysis",
        "/v1/jobs/{job_id}/heatmap.png",
        "/v1/jobs/{job_id}/artifacts",
        "/v1/jobs/{job_id}/artifacts/{name}",
        "/v1/plans",
        "/v1/datasets",
        "/v1/datasets/{dataset_id}",
    ):
        assert path in paths, path
    assert client.get("/docs").status_code == 200


def test_storage_helper_matches_settings(api_settings):
    assert build_storage(api_settings).describe() == storage_from_url(api_settings.artifact_storage_url).describe()
