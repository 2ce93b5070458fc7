"""The downstream tasks a job may name: published by a worker as it starts, listed at /v1/tasks, and
checked at submission (an unknown task is a 422 naming its entry, before anything is queued)."""

from __future__ import annotations

from sqlalchemy import select

from app.db.models import EvalTask
from app.db.session import session_scope
from app.repositories.eval_tasks import EvalTaskRow, replace_catalogue
from worker.catalogue import publish_catalogue

from .api_helpers import DEMO_JOB, assert_problem, client_for, job_count

CATALOGUE = [
    EvalTaskRow("lorp_cloze", "built-in", ["acc", "acc_norm"]),
    EvalTaskRow("my_local_task", "local", ["acc"]),
    EvalTaskRow("arc_easy", "hub", ["acc", "acc_norm"]),
    EvalTaskRow("hellaswag", "hub", ["acc", "acc_norm"]),
]


def _publish(factory, rows=CATALOGUE) -> None:
    with session_scope(factory) as session:
        replace_catalogue(session, rows)


def _job(tasks: list[dict]) -> dict:
    return {**DEMO_JOB, "evaluation": {"tasks": tasks}}


def test_a_worker_publishes_what_lm_eval_can_run(api_settings, pg_engine) -> None:
    count = publish_catalogue(api_settings)
    with pg_engine.connect() as conn:
        stored = {row.name: row for row in conn.execute(select(EvalTask))}
    assert len(stored) == count > 1000  # lm-eval's registry holds thousands of tasks and groups
    assert stored["lorp_cloze"].source == "built-in" and stored["lorp_cloze"].metrics == ["acc", "acc_norm"]
    assert stored["hellaswag"].source == "hub"
    assert publish_catalogue(api_settings) == count  # publishing again replaces, never duplicates


def test_tasks_are_listed_built_in_first_and_filtered(api_settings, rollback_sessionmaker) -> None:
    _publish(rollback_sessionmaker)
    client = client_for(api_settings, rollback_sessionmaker)
    body = client.get("/v1/tasks").json()
    assert [t["name"] for t in body["tasks"]] == ["lorp_cloze", "my_local_task", "arc_easy", "hellaswag"]
    assert body["total"] == 4 and body["published_at"] is not None
    assert body["tasks"][0] == {"name": "lorp_cloze", "source": "built-in", "metrics": ["acc", "acc_norm"]}
    hub = client.get("/v1/tasks", params={"source": "hub", "limit": 1, "offset": 1}).json()
    assert [t["name"] for t in hub["tasks"]] == ["hellaswag"] and hub["total"] == 2
    assert [t["name"] for t in client.get("/v1/tasks", params={"prefix": "arc"}).json()["tasks"]] == ["arc_easy"]
    assert_problem(client.get("/v1/tasks", params={"source": "elsewhere"}), 422, "source")
    # An offset past any catalogue is a 422, not a database overflow (schemathesis found the 500).
    assert_problem(client.get("/v1/tasks", params={"offset": 3819024611810963577896960}), 422, "offset")


def test_an_unknown_task_is_refused_at_submission_naming_its_entry(api_settings, rollback_sessionmaker) -> None:
    _publish(rollback_sessionmaker)
    before = job_count(rollback_sessionmaker)
    client = client_for(api_settings, rollback_sessionmaker)
    response = client.post("/v1/jobs", json=_job([{"name": "lorp_cloze"}, {"name": "no_such_task"}]))
    body = assert_problem(response, 422, "evaluation.tasks.1.name")
    assert "no_such_task" in body["detail"]
    assert job_count(rollback_sessionmaker) == before  # nothing recorded
    accepted = client.post("/v1/jobs", json=_job([{"name": "lorp_cloze", "limit": 50}, {"name": "hellaswag"}]))
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["request"]["evaluation"]["tasks"][0] == {
        "name": "lorp_cloze",
        "limit": 50,
        "num_fewshot": None,
    }


def test_tasks_are_refused_while_no_worker_has_published(api_settings, rollback_sessionmaker) -> None:
    _publish(rollback_sessionmaker, [])
    client = client_for(api_settings, rollback_sessionmaker)
    assert_problem(client.post("/v1/jobs", json=_job([{"name": "lorp_cloze"}])), 503, "evaluation.tasks")
    assert client.post("/v1/jobs", json=DEMO_JOB).status_code == 202  # a job without tasks still goes


def test_bad_task_entries_are_422_naming_the_field(api_settings, rollback_sessionmaker) -> None:
    _publish(rollback_sessionmaker)
    client = client_for(api_settings, rollback_sessionmaker)
    assert_problem(client.post("/v1/jobs", json=_job([{"name": "a b"}])), 422, "evaluation.tasks.0.name")
    assert_problem(
        client.post("/v1/jobs", json=_job([{"name": "lorp_cloze", "limit": 0}])), 422, "evaluation.tasks.0.limit"
    )
    assert_problem(client.post("/v1/jobs", json=_job([{"name": "lorp_cloze"}, {"name": "lorp_cloze"}])), 422)
    assert_problem(
        client.post("/v1/jobs", json={**DEMO_JOB, "evaluation": {"prompts": [""]}}), 422, "evaluation.prompts.0"
    )
    for curve, field, needle in (
        ([2, 2], "evaluation.curve_budgets", "listed twice"),
        ([0], "evaluation.curve_budgets.0", "greater than or equal to 1"),
    ):
        problem = assert_problem(
            client.post("/v1/jobs", json={**DEMO_JOB, "evaluation": {"curve_budgets": curve}}), 422, field
        )
        assert needle in problem["errors"][0]["message"], problem
