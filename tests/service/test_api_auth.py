"""API keys: owners see only their own jobs, an admin sees all, missing, wrong and revoked keys are refused."""

from __future__ import annotations

import uuid

import pytest

from app.db.models import Job

from .api_helpers import (
    DEMO_JOB,
    assert_problem,
    bearer,
    client_for,
    job_count,
    new_key,
)


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
    before = job_count(rollback_sessionmaker)
    client = client_for(settings, rollback_sessionmaker)
    for response in (client.get("/v1/jobs", headers=headers), client.post("/v1/jobs", json=DEMO_JOB, headers=headers)):
        assert_problem(response, 401)
        assert response.headers["www-authenticate"] == "Bearer"
    assert job_count(rollback_sessionmaker) == before


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
