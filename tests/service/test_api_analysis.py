"""A job's analysis: S, D, LoRP's structure for the job's own options, and per-block scores."""

from __future__ import annotations

import numpy as np
import pytest

from app.db.models import JobStatus
from lorp.selection import SelectionOptions, analyze_structure
from lorp.selection import select as engine_select

from .api_helpers import (
    DEMO_JOB,
    assert_problem,
    client_for,
    finished_job,
    insert_analysis,
    insert_job,
    similarity_stats,
)


def test_analysis_is_404_until_it_exists(api_settings, rollback_sessionmaker):
    client = client_for(api_settings, rollback_sessionmaker)
    job_id = client.post("/v1/jobs", json=DEMO_JOB).json()["id"]
    assert_problem(client.get(f"/v1/jobs/{job_id}/analysis"), 404)


def test_analysis_returns_s_d_structure_and_scores(api_settings, rollback_sessionmaker):
    job_id, analysis_id = finished_job(rollback_sessionmaker)
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
