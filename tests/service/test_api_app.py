"""The API as a whole: the routes in its OpenAPI document, and what the process imports (no torch, no worker)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from app.storage import artifact_store, storage_from_url

from .api_helpers import (
    client_for,
)

REPO = Path(__file__).resolve().parents[2]


def test_api_never_imports_torch_or_the_worker(tmp_path):
    # Serving a submission runs the budget preflight and the enqueue path too, not just the imports.
    code = (
        "import sys, uuid\n"
        "from fastapi.testclient import TestClient\n"
        "from app.core.config import Settings\n"
        "from app.db.migrate import upgrade_head\n"
        "from app.main import create_app\n"
        "s = Settings(data_dir=sys.argv[1])\n"
        "s.resolved_data_dir.mkdir(parents=True)\n"
        "upgrade_head(s.sqlalchemy_url)\n"
        "r = TestClient(create_app(s)).post('/v1/jobs', json={'model': {'id': 'demo'}, 'target': {'num_layers': 99}})\n"
        "assert r.status_code == 422, r.text\n"
        "loaded = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'worker'})\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "data")], check=True, cwd=REPO)


def test_openapi_documents_the_routes(api_settings, rollback_sessionmaker):
    client = client_for(api_settings, rollback_sessionmaker)
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/cancel",
        "/v1/jobs/{job_id}/analysis",
        "/v1/jobs/{job_id}/heatmap.png",
        "/v1/jobs/{job_id}/artifacts",
        "/v1/jobs/{job_id}/artifacts/{name}",
        "/v1/plans",
        "/v1/datasets",
        "/v1/datasets/{dataset_id}",
    ):
        assert path in paths, path
    assert client.get("/docs").status_code == 200


def test_storage_helper_matches_settings(api_settings):
    assert artifact_store(api_settings).describe() == storage_from_url(api_settings.artifact_storage_url).describe()
