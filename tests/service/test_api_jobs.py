"""Jobs: submit (recorded, then enqueued; idempotency), list (pagination), get (the summary), cancel, and
bad job requests named by field."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from sqlalchemy import func, select, update

from app.db.models import Job, JobEvent, JobStatus
from lorp_client.models import PlanOut

from .api_helpers import (
    DEMO_JOB,
    assert_problem,
    bearer,
    client_for,
    finished_job,
    insert_job,
    job_count,
    new_key,
    queued_messages,
    utc,
)


def test_create_job_is_queued_recorded_and_enqueued(api_settings, rollback_sessionmaker, redis_url):
    client = client_for(api_settings, rollback_sessionmaker)
    response = client.post("/v1/jobs", json=DEMO_JOB)
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["progress"] == 0.0 and job["error"] is None
    assert job["request"]["target"] == {"num_layers": 2, "ratio": None, "max_perplexity_ratio": None, "max_kl": None}
    assert job["request"]["options"]["selection_metric"] == "perplexity"
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
    total = job_count(rollback_sessionmaker)

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
    # Jobs other tests' workers committed are listed too (older than ours: created now, ours in 2026).
    assert len(seen) == len(set(seen)) == total and pages == -(-total // 5)
    expected = sorted(ids, key=lambda i: (ids[i][0], i), reverse=True)
    assert [i for i in seen if uuid.UUID(i) in ids] == [str(i) for i in expected]

    queued = client.get("/v1/jobs", params={"status": "queued", "limit": 100}).json()["items"]
    assert all(item["status"] == "queued" for item in queued)
    ours = {item["id"] for item in queued if uuid.UUID(item["id"]) in ids}
    assert ours == {str(i) for i, v in ids.items() if v[1] == JobStatus.queued}
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


def test_job_summary_once_finished(api_settings, rollback_sessionmaker):
    job_id, _ = finished_job(rollback_sessionmaker)
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
    job_id, _ = finished_job(rollback_sessionmaker, summary=own)
    client = client_for(api_settings, rollback_sessionmaker)
    summary = client.get(f"/v1/jobs/{job_id}").json()["summary"]
    assert summary["k"] == 5 and summary["rls"] == pytest.approx(0.3) and summary["clusters"] == own["clusters"]
    assert summary["report"] == own


def test_job_summary_shows_each_plans_validation_kl_where_the_job_measured_it(api_settings, rollback_sessionmaker):
    """The KL is kept in the job's summary (the worker's, from report.json), not in the plan table."""
    kept = {
        "plans": {
            "lorp": {"pruned_layers": [3, 7], "validation_perplexity": 21.5, "validation_kl": 0.0125},
            "shortgpt": {"pruned_layers": [8, 9], "validation_perplexity": 25.0, "validation_kl": None},
        }
    }
    job_id, _ = finished_job(rollback_sessionmaker, summary=kept)
    client = client_for(api_settings, rollback_sessionmaker)
    for body in (client.get(f"/v1/jobs/{job_id}").json()["summary"], client.get(f"/v1/jobs/{job_id}/analysis").json()):
        plans = {p["name"]: p for p in body["plans"]}
        assert plans["lorp"]["validation_kl"] == 0.0125 and plans["lorp"]["validation_perplexity"] == 21.5
        assert plans["shortgpt"]["validation_kl"] is None
        assert [PlanOut.model_validate(p).validation_kl for p in body["plans"]] == [
            p["validation_kl"] for p in body["plans"]
        ]
    job_id, _ = finished_job(rollback_sessionmaker)  # a summary without KL (a job ranked by perplexity)
    plans = client.get(f"/v1/jobs/{job_id}").json()["summary"]["plans"]
    assert [p["validation_kl"] for p in plans] == [None, None]


def test_unfinished_job_has_no_summary(api_settings, rollback_sessionmaker):
    client = client_for(api_settings, rollback_sessionmaker)
    for status in (JobStatus.queued, JobStatus.running, JobStatus.failed, JobStatus.cancelled):
        job_id = insert_job(rollback_sessionmaker, status=status)
        body = client.get(f"/v1/jobs/{job_id}").json()
        assert body["status"] == status.value and body["summary"] is None


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
        ({**DEMO_JOB, "model": {"id": "~no-such-user-here/model"}}, "model.id"),  # was a 500 (schemathesis)
        ({**DEMO_JOB, "model": {"id": "https://example.com/model.bin"}}, "model.id"),
        ({**DEMO_JOB, "model": {"id": "some/model", "trust_remote_code": True}}, "model.trust_remote_code"),
        ({**DEMO_JOB, "calibration": {"dataset": str(uuid.UUID(int=7))}}, "calibration.dataset"),
        ({**DEMO_JOB, "calibration": {"dataset": "wikitext2!"}}, "calibration.dataset"),
        ({**DEMO_JOB, "method": "magic"}, "method"),
        ({**DEMO_JOB, "options": {"heal": "cubic"}}, "options.heal"),
        ({**DEMO_JOB, "target": {"max_perplexity_ratio": 0.9}}, "target.max_perplexity_ratio"),
        ({**DEMO_JOB, "target": {"max_perplexity_ratio": "loose"}}, "target.max_perplexity_ratio"),
        ({**DEMO_JOB, "target": {"num_layers": 2, "max_perplexity_ratio": 1.5}}, "target"),
        ({**DEMO_JOB, "target": {"max_kl": 0}}, "target.max_kl"),
        ({**DEMO_JOB, "target": {"max_kl": -0.5}}, "target.max_kl"),
        ({**DEMO_JOB, "target": {"max_kl": "tight"}}, "target.max_kl"),
        ({**DEMO_JOB, "target": {"max_perplexity_ratio": 1.5, "max_kl": 0.1}}, "target"),
        ({**DEMO_JOB, "options": {"selection_metric": "bleu"}}, "options.selection_metric"),
        ({**DEMO_JOB, "options": {"selection_metric": 1}}, "options.selection_metric"),
        ({**DEMO_JOB, "calibration": {"num_samples": 0}}, "calibration.num_samples"),
        ({"target": {"num_layers": 2}}, "model"),
        ([1, 2, 3], "body"),
    ],
)
def test_bad_job_requests_name_the_field(api_settings, rollback_sessionmaker, body, field):
    before = job_count(rollback_sessionmaker)
    client = client_for(api_settings, rollback_sessionmaker)
    assert_problem(client.post("/v1/jobs", json=body), 422, field)
    assert job_count(rollback_sessionmaker) == before


@pytest.mark.parametrize(
    "extra",
    [
        {"method": "search"},
        {"options": {"heal": "linear"}},
        {"options": {"heal": "none"}, "method": "shortgpt"},
        {"target": {"max_perplexity_ratio": 1.5}},
        {"method": "search", "target": {"max_perplexity_ratio": 1.25}, "options": {"heal": "linear"}},
        {"target": {"max_kl": 0.05}, "options": {"selection_metric": "kl"}},
        {"method": "search", "options": {"selection_metric": "kl"}},
    ],
)
def test_heal_search_and_quality_targets_are_accepted_and_recorded(api_settings, rollback_sessionmaker, extra):
    client = client_for(api_settings, rollback_sessionmaker)
    response = client.post("/v1/jobs", json={**DEMO_JOB, **extra})
    assert response.status_code == 202, response.text
    job = client.get(f"/v1/jobs/{response.json()['id']}").json()
    for key, value in extra.items():
        recorded = job["request"][key]
        if isinstance(value, dict):
            assert {k: recorded[k] for k in value} == value
        else:
            assert recorded == value
