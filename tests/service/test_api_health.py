"""Health, readiness and Prometheus metrics, on Postgres and on the embedded mode's SQLite."""

from __future__ import annotations

import datetime as dt

import pytest

from app.core.config import Settings
from app.db.migrate import upgrade_head
from app.db.models import JobEvent, JobStatus
from app.db.session import session_factory

from .api_helpers import (
    DEMO_JOB,
    assert_problem,
    client_for,
    insert_job,
    queued_messages,
)
from .tmpfs import fill, free_bytes, mounted_tmpfs


def test_healthz_and_readyz(api_settings, rollback_sessionmaker):
    client = client_for(api_settings, rollback_sessionmaker)
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    checks = ready.json()["checks"]
    assert {name: checks[name] for name in ("database", "broker", "storage")} == {
        "database": {"ok": True},
        "broker": {"ok": True},
        "storage": {"ok": True},
    }
    assert checks["workers"]["ok"] is True  # nothing queued: no worker is not an error


def test_readyz_is_503_when_the_broker_is_down(api_settings, rollback_sessionmaker):
    settings = api_settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    client = client_for(settings, rollback_sessionmaker)
    response = client.get("/readyz")
    body = assert_problem(response, 503, "broker")
    assert response.headers["retry-after"] == "5"  # when a client may try again
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


# -- free disk space: /readyz's disk check and lorp_disk_free_bytes ------------------------------------------


def test_readyz_names_a_disk_below_the_minimum(api_settings, rollback_sessionmaker):
    ready = client_for(api_settings, rollback_sessionmaker).get("/readyz").json()["checks"]["disk"]
    assert ready["ok"] is True and ready["min_free_mb"] == 100
    assert {"data", "work", "artifacts", "spool"} <= set(ready["free_mb"])
    # A minimum no disk here meets: every folder is named, and no path is shown.
    settings = api_settings.model_copy(update={"min_free_disk_mb": 1 << 40})
    response = client_for(settings, rollback_sessionmaker).get("/readyz")
    body = assert_problem(response, 503, "disk")
    disk = body["checks"]["disk"]
    assert disk["ok"] is False and "LORP_MIN_FREE_DISK_MB" in disk["error"] and "data (" in disk["error"]
    assert body["checks"]["database"] == {"ok": True}
    assert "disk nearly full" in body["detail"] and str(settings.resolved_data_dir) not in response.text


def _disk_gauge(client, label: str) -> float:
    prefix = f'lorp_disk_free_bytes{{path="{label}"}} '
    return float(next(line for line in client.get("/metrics").text.splitlines() if line.startswith(prefix)).split()[-1])


def test_readyz_and_metrics_follow_a_filling_embedded_disk(tmp_path):
    """The embedded mode keeps its SQLite database in the data folder: on a full disk SQLite still answers
    ``SELECT 1`` (the database check passes) but fails every write; the disk check is what says so."""
    with mounted_tmpfs(tmp_path / "embedded", 8 * 1024) as disk:
        settings = Settings(data_dir=disk, min_free_disk_mb=4)
        upgrade_head(settings.sqlalchemy_url)
        client = client_for(settings, session_factory(settings.sqlalchemy_url))
        assert client.get("/readyz").status_code == 200
        assert abs(_disk_gauge(client, "data") - free_bytes(disk)) < 256 * 1024

        ballast = fill(disk, leave_bytes=1024 * 1024)
        body = assert_problem(client.get("/readyz"), 503, "disk")
        assert body["checks"]["database"] == {"ok": True}, "SQLite reads still work on a full disk"
        assert body["checks"]["disk"]["free_mb"]["data"] <= 1 and "data (" in body["checks"]["disk"]["error"]
        assert _disk_gauge(client, "data") <= 1024 * 1024

        ballast.unlink()
        assert client.get("/readyz").status_code == 200  # ready again once space is freed
