"""The method registry is the one list of methods: a toy method registered once, in
``lorp.selection``, is found by the job spec (and the API's JSON schema), auto's candidates, the budget
curve, the plot styles, ``POST /v1/plans``'s defaults, ``GET /v1/methods`` (what the web form and the
client offer), the Python client, ``lorp jobs methods`` and ``lorp prune --help``."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import numpy as np
import numpy.typing as npt
import pytest
from fastapi.testclient import TestClient

from app.jobspec import JobCreate
from app.schemas import PlansRequest
from lorp import cli as engine_cli
from lorp.curve import curve_plans
from lorp.report import curve_style
from lorp.selection import (
    Selection,
    SelectionOptions,
    Structure,
    analyze_structure,
    candidate_plans,
    eligible_blocks,
    register,
    select,
    unregister,
)
from lorp.spec import PruneSpec
from lorp_client import Client
from lorp_client import cli as client_cli

from .api_helpers import client_for, finished_job, similarity_stats

TOY = "toy_first"


def _first_eligible(
    S: npt.ArrayLike,
    D: npt.ArrayLike | None,
    n: int,
    options: SelectionOptions | None = None,
    *,
    structure: Structure | None = None,
) -> Selection:
    """The toy plan: the n shallowest blocks that are not protected."""
    m = np.asarray(S, dtype=np.float64)
    opts = options or SelectionOptions()
    st = structure if structure is not None else analyze_structure(m, opts)
    return Selection(TOY, eligible_blocks(m.shape[0] - 1, opts)[:n], st, {})


def _relay(http: TestClient, request: httpx.Request) -> httpx.Response:
    """The client's request, answered by the in-process app (the transport only carries it there)."""
    answer = http.request(request.method, request.url.path, headers=request.headers, content=request.content)
    return httpx.Response(answer.status_code, headers=answer.headers, content=answer.content)


@pytest.fixture
def toy() -> Iterator[str]:
    register(TOY, label="the shallowest blocks (a test's toy)", color="#123456", marker="P")(_first_eligible)
    try:
        yield TOY
    finally:
        unregister(TOY)


def test_a_method_registered_once_is_everywhere(toy, api_settings, rollback_sessionmaker, capsys):
    S, D = (np.asarray(x) for x in similarity_stats(12))
    options = SelectionOptions()
    # The engine: the spec accepts it, auto validates it, the curve draws it in its registered style.
    assert PruneSpec.model_validate({"model": {"id": "demo"}, "target": {"num_layers": 2}, "method": toy}).method == toy
    assert toy in PruneSpec.model_json_schema()["properties"]["method"]["enum"]
    assert candidate_plans(S, D, 3, options)[toy].pruned_layers == [1, 2, 3]
    drawn = [(name, n) for name, n, _ in curve_plans(S, D, [2, 4], options, analyze_structure(S, options))]
    assert (toy, 2) in drawn and (toy, 4) in drawn
    assert curve_style(toy) == ("#123456", "P")
    assert select(toy, S, D, 2).pruned_layers == [1, 2]
    # The engine's CLI lists and offers it.
    assert engine_cli.main(["methods", "--json"]) == 0
    assert toy in [row["name"] for row in json.loads(capsys.readouterr().out)]
    parser, _ = engine_cli.build_parser()
    assert toy in parser._subparsers._group_actions[0].choices["prune"].format_help()

    # The service: the request, its JSON schema, /v1/plans' defaults and /v1/methods.
    assert JobCreate.model_validate({"model": {"id": "demo"}, "target": {"num_layers": 2}, "method": toy}).method == toy
    job_id, _ = finished_job(rollback_sessionmaker)
    assert toy in PlansRequest(job_id=job_id, budgets=[2]).methods
    http = client_for(api_settings, rollback_sessionmaker)
    schema = http.get("/openapi.json").json()
    assert toy in schema["components"]["schemas"]["JobCreate"]["properties"]["method"]["enum"]
    plans = http.post("/v1/plans", json={"job_id": str(job_id), "budgets": [2]})
    assert plans.status_code == 200, plans.text
    assert [p["pruned_layers"] for p in plans.json()["plans"] if p["method"] == toy] == [[1, 2]]
    listed = http.get("/v1/methods")
    assert listed.status_code == 200, listed.text
    row = next(m for m in listed.json()["methods"] if m["name"] == toy)
    assert row == {
        "name": toy,
        "label": "the shallowest blocks (a test's toy)",
        "needs_model": False,
        "auto_candidate": True,
        "on_curve": True,
        "needs_distance": False,
    }

    # The client reads the same list, and `lorp jobs methods` prints it.
    with Client("http://testserver", transport=httpx.MockTransport(lambda request: _relay(http, request))) as client:
        assert toy in [m.name for m in client.methods().methods]
        client_cli._show_methods(client, as_json=False)
    assert any(line.startswith(toy) and "auto,curve" in line for line in capsys.readouterr().out.splitlines())


def test_the_built_in_methods_and_what_each_is_used_for(api_settings, rollback_sessionmaker):
    """The registry's built-in entries as /v1/methods serves them: the order a job lists them in, the
    model-scored ones, auto's candidates and the curve's lines (the set the benches were measured with)."""
    http = client_for(api_settings, rollback_sessionmaker)
    body = http.get("/v1/methods").json()
    assert body["default"] == "auto"
    rows = {m["name"]: m for m in body["methods"]}
    assert list(rows) == ["auto", "search", "lorp", "shortgpt", "streamline", "angular", "reverse"]
    assert [n for n, m in rows.items() if m["needs_model"]] == ["auto", "search"]
    assert [n for n, m in rows.items() if m["auto_candidate"]] == [
        "lorp",
        "shortgpt",
        "streamline",
        "angular",
        "reverse",
    ]
    assert [n for n, m in rows.items() if m["on_curve"]] == ["lorp", "shortgpt", "streamline", "angular"]
    assert [n for n, m in rows.items() if m["needs_distance"]] == ["angular"]
    assert all(m["label"] for m in rows.values())
    unknown = http.post("/v1/jobs", json={"model": {"id": "demo"}, "target": {"num_layers": 2}, "method": "nope"})
    assert unknown.status_code == 422
    assert any(e["field"] == "method" and "auto, search, lorp" in e["message"] for e in unknown.json()["errors"])
