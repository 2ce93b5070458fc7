"""The whole service over HTTP with real processes, in both run modes.

- full stack: `lorp serve --no-worker` (API) + `lorp worker` (a Celery worker process), Postgres,
  Redis, and moto's S3 server on loopback; downloads follow presigned URLs;
- embedded: `lorp serve` alone (API + worker, SQLite, kombu's SQLAlchemy broker, local artifacts).

A client uploads a dataset, submits a job on a tiny model, watches it progress to `succeeded`,
downloads every artifact through the API's links and loads the pruned model with transformers.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text
from tiny import save_tiny_llama
from transformers import AutoModelForCausalLM

from .stack import Processes, corpus, start_stack

N_LAYERS = 6


@pytest.fixture(scope="module")
def model_root(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> Path:
    root = tmp_path_factory.mktemp("models")
    save_tiny_llama(root, "tiny", tiny_tokenizer, num_hidden_layers=N_LAYERS, max_position_embeddings=256)
    return root


@pytest.fixture()
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.stop()


def finished(client: httpx.Client, job_id: str, processes: Processes) -> tuple[dict, list]:
    """The job once it succeeded, and the (status, stage, progress) seen while polling it."""
    seen: list[tuple[str, str | None, float]] = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        seen.append((job["status"], job["stage"], job["progress"]))
        if job["status"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"job did not finish: {seen[-3:]}\n{processes.logs()}")
    assert job["status"] == "succeeded", f"{job.get('error')}\n{processes.logs()}"
    return job, seen


@pytest.mark.parametrize("mode", ["full", "embedded"])
def test_job_end_to_end_over_http(mode, tmp_path, processes, model_root, request):
    stack = start_stack(mode, tmp_path, processes, model_root, request)
    base = stack["base"]
    client = httpx.Client(base_url=base, timeout=30)

    upload = client.post("/v1/datasets", files={"file": ("corpus.txt", corpus(), "text/plain")})
    assert upload.status_code == 201, upload.text
    dataset_id = upload.json()["id"]

    # The full stack runs the validated search with distillation asked for; the embedded one runs auto.
    searched = mode == "full"
    body = {
        "model": {"id": str(model_root / "tiny")},
        "method": "search" if searched else "auto",
        "target": {"num_layers": 2},
        "options": {"heal": "distill", "heal_steps": 3} if searched else {},
        "calibration": {"dataset": dataset_id, "num_samples": 8, "seq_len": 32, "batch_size": 2},
        "evaluation": {
            "dataset": dataset_id,
            "max_windows": 4,
            "speed": False,
            "tasks": [{"name": "lorp_cloze", "limit": 3}],
            "prompts": ["the block"],
            "generate_tokens": 4,
        },
    }
    created = client.post("/v1/jobs", json=body)
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    assert created.headers["location"].endswith(f"/v1/jobs/{job_id}")

    job, seen = finished(client, job_id, processes)
    progress = [p for _, _, p in seen]
    assert progress == sorted(progress) and progress[-1] == 1.0
    assert "running" in {s for s, _, _ in seen}
    assert job["attempts"] == 1
    assert job["stage"] == "done"

    summary = job["summary"]
    assert len(summary["pruned_layers"]) == 2 and len(summary["clusters"]) == N_LAYERS
    scored = {p["name"]: p["validation_perplexity"] for p in summary["plans"]}
    assert scored[summary["chosen_method"]] == min(v for v in scored.values() if v is not None)
    worker_summary = summary["report"]
    if searched:
        path = worker_summary["selection"]["search_path"]
        assert [step["num_layers"] for step in path] == [1, 2] and "search" in scored
        heal = worker_summary["heal"]  # distilled, or the linear heal the guard kept, or (maps hurt) unhealed
        if heal["method"] == "none":
            assert heal["reason"].startswith("the chosen plan scored better unhealed") and heal["distill"] is None
        else:
            assert heal["method"] == heal["distill"]["shipped"] in ("distill", "linear"), heal
            assert heal["distill"]["steps"] == 3 and heal["distill"]["tokens"] > 0
            assert "distilling" in worker_summary["timings_s"]
        assert all(s["residual_after"] <= s["residual_before"] for s in heal["spans"])
    plans = client.post("/v1/plans", json={"job_id": job_id, "budgets": [1, 2]}).json()["plans"]
    if searched:
        assert [p["pruned_layers"] for p in plans if p["method"] == "search"] == [s["pruned_layers"] for s in path]
    else:
        heal = worker_summary["heal"]  # unset: linear, unless the chosen plan scored better unhealed
        assert heal["method"] == "linear" or heal["reason"].startswith("the chosen plan scored better unhealed")
        assert worker_summary["selection"]["evaluations"] >= 1

    # The budget curve scored the plans POST /v1/plans lists, at 1 and 2 blocks, and they carry its scores.
    curve = {(p["method"], p["budget"]): p for p in summary["budget_curve"]["points"]}
    assert {n for _, n in curve} == {1, 2} and ("lorp", 2) in curve and (("search", 2) in curve) == searched
    for plan in plans:
        point = curve[(plan["method"], plan["budget"])] if plan["method"] != "reverse" else None
        if point is not None:
            assert sorted(point["pruned_layers"]) == sorted(plan["pruned_layers"])
            assert plan["validation_perplexity"] == pytest.approx(point["validation_perplexity"])

    artifacts = client.get(f"/v1/jobs/{job_id}/artifacts").json()
    names = {a["name"] for a in artifacts}
    expected = {"report.json", "analysis.npz", "heatmap.png", "plans.png", "budgets.png", "model/config.json"}
    assert expected | {"model/model.safetensors", "model/README.md", "model/pruning.json"} <= names
    out = tmp_path / "downloaded"
    for art in artifacts:
        resp = client.get(art["url"], follow_redirects=False)
        if mode == "full":
            assert resp.status_code == 302, resp.text
            assert resp.headers["location"].startswith(stack["endpoint"])
            resp = httpx.get(resp.headers["location"], timeout=30)
        assert resp.status_code == 200
        assert hashlib.sha256(resp.content).hexdigest() == art["sha256"]
        assert len(resp.content) == art["size_bytes"]
        target = out / art["name"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(resp.content)
    report = json.loads((out / "report.json").read_text())
    for phase in ("dense", "pruned"):
        assert summary["metrics"][phase]["num_layers"] == report["metrics"][phase]["num_layers"]
        assert type(summary["metrics"][phase]["num_layers"]) is int
        # lm-eval's scores as the API serves them equal the report's
        served = {t["metric"]: t for t in summary["tasks"] if t["phase"] == phase}
        for score in report["metrics"][phase]["tasks"]:
            assert served[score["metric"]]["value"] == pytest.approx(score["value"])
            assert served[score["metric"]]["num_samples"] == 3
    for name in ("kl_mean", "kl_p99", "top1_agreement"):  # the divergence, in /v1 as in the report
        assert summary["metrics"]["pruned"][name] == pytest.approx(report["metrics"]["pruned"][name])
    assert [g["prompt"] for g in report["generations"]] == ["the block"]
    assert worker_summary["generations"] == report["generations"]
    pruned = AutoModelForCausalLM.from_pretrained(out / "model")
    assert pruned.config.num_hidden_layers == N_LAYERS - 2
    # The folder describes itself under the names the client used (lorp.model_card).
    record = json.loads((out / "model" / "pruning.json").read_text())
    assert (
        record["removed"]
        == sorted(report["chosen"]["pruned_layers"])
        == sorted(set(range(N_LAYERS)) - set(record["kept"]))
    )
    assert record["source"]["id"] == body["model"]["id"] == report["request"]["model"]["id"]
    assert f"`{body['model']['id']}`" in (out / "model" / "README.md").read_text()
    heatmap = client.get(f"/v1/jobs/{job_id}/heatmap.png", follow_redirects=True)
    assert heatmap.content[:4] == b"\x89PNG"
    for link in ("plans_chart", "budget_chart"):
        chart = client.get(job["links"][link], follow_redirects=True)
        assert chart.status_code == 200 and chart.content[:4] == b"\x89PNG", link
    analysis = client.get(f"/v1/jobs/{job_id}/analysis").json()
    assert len(analysis["similarity"]) == N_LAYERS + 1 and len(analysis["angular_distance"]) == N_LAYERS + 1

    query = (
        "select a.num_blocks, (select count(*) from plans p where p.job_id = j.id), "
        "(select count(*) from metrics m where m.job_id = j.id) "
        "from jobs j join analyses a on a.id = j.analysis_id where j.id = :id"
    )
    if mode == "full":
        engine = create_engine(stack["pg_url"])
        with engine.connect() as conn:
            num_blocks, plans, metrics = conn.execute(text(query), {"id": job_id}).one()
        engine.dispose()
    else:
        db = sqlite3.connect(tmp_path / "data" / "lorp.db")
        num_blocks, plans, metrics = db.execute(query.replace(":id", "?"), (uuid.UUID(job_id).hex,)).fetchone()
        db.close()
    assert num_blocks == N_LAYERS and plans >= 5 and metrics >= 4

    # The same job run one block at a time (options.execution: sequential) by the same worker: the same
    # statistics and plan; the summary names the mode and the device, and what it did not measure.
    body["options"] = {**body["options"], "execution": "sequential"}
    refused = client.post("/v1/jobs", json=body)  # lm-eval tasks need the model whole
    assert refused.status_code == 422 and refused.json()["errors"][0]["field"] == "evaluation.tasks", refused.text
    body["evaluation"] = {**body["evaluation"], "tasks": [], "curve_budgets": []}
    again = client.post("/v1/jobs", json=body)
    assert again.status_code == 202, again.text
    rerun, _ = finished(client, again.json()["id"], processes)
    assert rerun["summary"]["pruned_layers"] == summary["pruned_layers"]
    assert rerun["summary"]["clusters"] == summary["clusters"]
    execution = rerun["summary"]["execution"]
    assert (execution["mode"], execution["requested"], execution["device"]) == ("sequential", "sequential", "cpu")
    assert execution["device_name"] and execution["block_loads"] > N_LAYERS
    assert [line.split(":")[0] for line in execution["skipped"]] == ["evaluation.prompts"]
    assert summary["execution"]["mode"] == "resident" and summary["execution"]["skipped"] == []
    assert rerun["summary"]["tasks"] == [] and rerun["summary"]["report"]["generations"] == []
    if searched and worker_summary["heal"]["distill"] is not None:  # sequential: distilled block-locally
        local = rerun["summary"]["report"]["heal"]["distill"]
        assert (local["scope"], local["loss"], local["steps"]) == ("local", "state", 3), local
        assert rerun["summary"]["report"]["heal"]["method"] == local["shipped"] and "block-local" in local["reason"]
    # Its states waited in the job's scratch (a folder per job, kept across attempts); it is gone once
    # the job succeeded: the attempt removes it as it ends, just after the status it reports.
    scratch = tmp_path / "data" / "scratch"
    deadline = time.monotonic() + 60
    while (scratch / rerun["id"]).exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert scratch.is_dir() and not (scratch / rerun["id"]).exists()
    assert execution["resumed_at_block"] is None

    # The worker said what it runs on when it registered: /readyz and /metrics show it.
    devices = client.get("/readyz").json()["checks"]["workers"]["devices"]
    assert devices and all(d["kind"] == "cpu" and d["memory_bytes"] > 2**30 and d["name"] for d in devices)
    assert execution["device_name"] in {d["name"] for d in devices}
    memory = [line for line in client.get("/metrics").text.splitlines() if line.startswith("lorp_worker_device_")]
    assert memory and all('kind="cpu"' in line and float(line.split()[-1]) > 2**30 for line in memory)
