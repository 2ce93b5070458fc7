"""What-if plans on a finished job's S and D: equal to the engine's and the CLI's, and bad requests named by field."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import numpy as np
import pytest

from app.db.models import JobStatus
from lorp.selection import SelectionOptions
from lorp.selection import select as engine_select

from .api_helpers import (
    DEMO_JOB,
    assert_problem,
    client_for,
    finished_job,
    insert_job,
    similarity_stats,
)


def test_plans_match_the_engine(api_settings, rollback_sessionmaker):
    job_id, analysis_id = finished_job(rollback_sessionmaker)
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
    expected = engine_select("lorp", S, D, 3, SelectionOptions(num_clusters=4, protected_layers=()))
    assert plan["budget"] == 3 and plan["ratio"] == 0.25 and plan["k"] == 4
    assert plan["pruned_layers"] == expected.pruned_layers


def test_plans_agree_with_the_lorp_select_cli(api_settings, rollback_sessionmaker, tmp_path):
    """/v1/plans on a job's stored S and D gives what `lorp select` gives on the exported analysis."""
    job_id, _ = finished_job(rollback_sessionmaker)
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
    job_id, _ = finished_job(rollback_sessionmaker)
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


SEARCH_SUMMARY = {
    "selection": {
        "search_path": [
            {"num_layers": 1, "pruned_layers": [6], "validation_perplexity": 21.0, "tried": 3},
            {"num_layers": 2, "pruned_layers": [6, 7], "validation_perplexity": 22.0, "tried": 5},
            {"num_layers": 3, "pruned_layers": [5, 6, 7], "validation_perplexity": 24.0, "tried": 5},
        ]
    }
}


def test_a_job_that_ran_search_lists_its_searched_plans(api_settings, rollback_sessionmaker):
    job_id, _ = finished_job(rollback_sessionmaker, method="search", summary=SEARCH_SUMMARY)
    client = client_for(api_settings, rollback_sessionmaker)
    body = client.post("/v1/plans", json={"job_id": str(job_id), "budgets": [2, 3, 5]}).json()
    searched = {p["budget"]: p["pruned_layers"] for p in body["plans"] if p["method"] == "search"}
    assert searched == {2: [6, 7], 3: [5, 6, 7]}  # budget 5 is beyond what the job's search reached
    assert len([p for p in body["plans"] if p["method"] != "search"]) == 5 * 3
    only = client.post("/v1/plans", json={"job_id": str(job_id), "budgets": [1], "methods": ["search"]}).json()
    assert [(p["method"], p["pruned_layers"]) for p in only["plans"]] == [("search", [6])]
    without = client.post("/v1/plans", json={"job_id": str(job_id), "budgets": [1], "methods": ["lorp"]}).json()
    assert [p["method"] for p in without["plans"]] == ["lorp"]


def test_search_plans_of_a_job_that_did_not_search_are_a_422(api_settings, rollback_sessionmaker):
    job_id, _ = finished_job(rollback_sessionmaker)
    client = client_for(api_settings, rollback_sessionmaker)
    problem = assert_problem(
        client.post("/v1/plans", json={"job_id": str(job_id), "budgets": [2], "methods": ["lorp", "search"]}),
        422,
        "methods.1",
    )
    assert "did not run it" in problem["detail"]
    body = client.post("/v1/plans", json={"job_id": str(job_id), "budgets": [2]}).json()
    assert "search" not in {p["method"] for p in body["plans"]}


def test_plans_the_job_scored_carry_their_validation_perplexity(api_settings, rollback_sessionmaker):
    S, D = similarity_stats(12)
    shortgpt_2 = engine_select("shortgpt", S, D, 2, SelectionOptions()).pruned_layers
    lorp_1 = engine_select("lorp", S, D, 1, SelectionOptions()).pruned_layers
    curve = {
        "healed": True,
        "dense_validation_perplexity": 20.0,
        "points": [
            {"method": "shortgpt", "budget": 2, "pruned_layers": shortgpt_2[::-1], "validation_perplexity": 30.5},
            {  # drawn distilled (evaluation.curve_distill): /v1/plans keeps the plan's own score
                "method": "lorp",
                "budget": 1,
                "pruned_layers": lorp_1,
                "validation_perplexity": 24.25,
                "distilled_perplexity": 22.5,
            },
        ],
    }
    lorp_2 = engine_select("lorp", S, D, 2, SelectionOptions()).pruned_layers
    candidates = {
        "lorp": {"pruned_layers": lorp_2, "validation_perplexity": 26.0},
        "shortgpt": {"pruned_layers": shortgpt_2, "validation_perplexity": 31.0},  # shipped unhealed, say
    }
    job_id, _ = finished_job(rollback_sessionmaker, summary={"plans": candidates, "budget_curve": curve})
    client = client_for(api_settings, rollback_sessionmaker)
    body = client.post("/v1/plans", json={"job_id": str(job_id), "budgets": [1, 2]}).json()
    scores = {(p["method"], p["budget"]): p["validation_perplexity"] for p in body["plans"]}
    assert scores[("lorp", 1)] == 24.25 and scores[("lorp", 2)] == 26.0  # a curve point; a candidate
    # The same blocks in any order, under any method; the curve's score where both have the set.
    assert scores[("shortgpt", 2)] == scores[("reverse", 2)] == 30.5
    assert scores[("shortgpt", 1)] is None  # block 10 alone was never scored: planning runs no model

    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["links"]["budget_chart"] == f"/v1/jobs/{job_id}/budgets.png"
    served = job["summary"]["budget_curve"]
    assert served["healed"] is True and served["dense_validation_perplexity"] == 20.0
    assert [
        (p["method"], p["budget"], p["validation_perplexity"], p["distilled_perplexity"]) for p in served["points"]
    ] == [
        ("shortgpt", 2, 30.5, None),
        ("lorp", 1, 24.25, 22.5),
    ]
    plain_id, _ = finished_job(rollback_sessionmaker)
    plain = client.get(f"/v1/jobs/{plain_id}").json()
    assert plain["links"]["budget_chart"] is None and plain["summary"]["budget_curve"] is None


def test_a_job_ranked_and_bounded_by_kl_lends_its_selection_options_to_plans(api_settings, rollback_sessionmaker):
    """A job's KL options (selection_metric, a max_kl target) pass through POST /v1/plans' copy of its
    selection options, and its analysis has no budget of its own until plans are scored."""
    request = {
        "model": {"id": "demo"},
        "target": {"max_kl": 0.05},
        "options": {"selection_metric": "kl", "num_clusters": 4},
    }
    job_id, _ = finished_job(rollback_sessionmaker, request=request)
    client = client_for(api_settings, rollback_sessionmaker)
    response = client.post("/v1/plans", json={"job_id": str(job_id), "budgets": [3], "methods": ["lorp"]})
    assert response.status_code == 200, response.text
    (plan,) = response.json()["plans"]
    S, D = similarity_stats(12)
    expected = engine_select("lorp", S, D, 3, SelectionOptions(num_clusters=4, selection_metric="kl"))
    assert plan["k"] == 4 and plan["pruned_layers"] == expected.pruned_layers
    analysis = client.get(f"/v1/jobs/{job_id}/analysis")
    assert analysis.status_code == 200, analysis.text
