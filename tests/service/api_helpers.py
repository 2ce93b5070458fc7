"""Helpers of the API tests: a client on the app under test, problem+json checks, rows written the way
the worker leaves them, and the Redis queue's messages."""

from __future__ import annotations

import base64
import datetime as dt
import json
import uuid
from typing import Any

import numpy as np
import redis
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings
from app.db.models import Analysis, Artifact, Job, JobStatus, Metric, Plan
from app.main import create_app
from app.services.keys import create_api_key

DEMO_JOB: dict[str, Any] = {"model": {"id": "demo"}, "target": {"num_layers": 2}}


PROBLEM = "application/problem+json"


def isolated_queue(settings: Settings) -> Settings:
    """The settings with a queue of their own: a worker another test runs on "gpu" must not take our messages."""
    return settings.model_copy(update={"queue_name": f"api-test-{uuid.uuid4().hex[:10]}"})


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


def row_count(factory: sessionmaker[Session], table: type[Any]) -> int:
    """Rows of ``table`` in the test database as ``factory`` sees them: a refused request must not add
    one (compare before and after: rows other tests' workers committed are there too)."""
    with factory() as session:
        return int(session.scalar(select(func.count()).select_from(table)) or 0)


def job_count(factory: sessionmaker[Session]) -> int:
    """:func:`row_count` of jobs."""
    return row_count(factory, Job)


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


def finished_job(factory, **fields) -> tuple[uuid.UUID, uuid.UUID]:
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


def publish_files(factory, storage, job_id: uuid.UUID, files: dict[str, tuple[bytes, str]]) -> None:
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
