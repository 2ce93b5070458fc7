"""The served OpenAPI document reads well to a client generator: operation ids are names, and a client
generated from it by openapi-python-client (from PyPI) drives a real job on `lorp serve` to success."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .stack import embedded_stack

GENERATOR = Path(sys.executable).with_name("openapi-python-client")
PACKAGE = "lorp_generated_client"


@pytest.fixture(scope="module")
def embedded(
    tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any, request: pytest.FixtureRequest
) -> Iterator[dict[str, Any]]:
    with embedded_stack(tmp_path_factory, tiny_tokenizer, request, "openapi") as stack:
        yield stack


def test_operation_ids_are_names(embedded: dict[str, Any]) -> None:
    document = httpx.get(f"{embedded['base']}/openapi.json", timeout=10).json()
    ids = {op["operationId"] for path in document["paths"].values() for op in path.values()}
    assert {"create_job", "get_job", "list_jobs", "cancel_job", "list_artifacts", "download_artifact"} <= ids
    assert {"upload_dataset", "create_plans", "list_tasks", "get_health", "get_readiness"} <= ids
    assert not [i for i in ids if "_v1_" in i or i.endswith(("_get", "_post"))], sorted(ids)


def test_a_generated_client_submits_and_polls_a_job(embedded: dict[str, Any], tmp_path: Path) -> None:
    spec = tmp_path / "openapi.json"
    spec.write_text(json.dumps(httpx.get(f"{embedded['base']}/openapi.json", timeout=10).json()))
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"package_name_override": PACKAGE, "post_hooks": []}))
    out = tmp_path / PACKAGE
    argv = [str(GENERATOR), "generate", "--path", str(spec), "--meta", "none", "--config", str(config)]
    result = subprocess.run(
        [*argv, "--output-path", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Warning" not in result.stdout, result.stdout  # every schema was understood
    sys.path.insert(0, str(out.parent))
    try:
        package = out.name
        client_mod = importlib.import_module(f"{package}.client")
        create_job = importlib.import_module(f"{package}.api.jobs.create_job")
        get_job = importlib.import_module(f"{package}.api.jobs.get_job")
        list_artifacts = importlib.import_module(f"{package}.api.jobs.list_artifacts")
        models = importlib.import_module(f"{package}.models")

        client = client_mod.Client(base_url=embedded["base"], raise_on_unexpected_status=True)
        body = models.JobCreate.from_dict(
            {
                "model": {"id": embedded["model"]},
                "method": "lorp",
                "target": {"num_layers": 1},
                "calibration": {"dataset": "builtin", "num_samples": 4, "seq_len": 32, "batch_size": 2},
                "evaluation": {"max_windows": 1, "speed": False, "prompts": [], "curve_budgets": []},
            }
        )
        created = create_job.sync(client=client, body=body)
        assert isinstance(created, models.JobOut), created
        job_id = created.id
        deadline = time.monotonic() + 240
        job = created
        while time.monotonic() < deadline and str(job.status) not in ("succeeded", "failed", "cancelled"):
            time.sleep(0.2)
            job = get_job.sync(job_id=job_id, client=client)
        assert str(job.status) == "succeeded", (job.to_dict(), embedded["procs"].logs())
        assert job.summary is not None and list(job.summary.pruned_layers) and job.attempts == 1
        artifacts = list_artifacts.sync(job_id=job_id, client=client)
        assert {"report.json", "model/config.json"} <= {a.name for a in artifacts}
    finally:
        sys.path.remove(str(out.parent))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
            del sys.modules[name]
