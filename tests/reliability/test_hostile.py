"""Hostile input, targeted: one test per attack, each asserting a clear refusal and nothing left behind.

API cases go through the in-process app on Postgres (each test rolled back) with keys required;
job cases (hostile model files, calibration text) run through ``worker.runner.run_job`` in this
process against Postgres and a local artifact folder, as a worker would. A refused request leaves no
job row, a refused upload no stored object, a failed job no work folder, artifacts or rows.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from transformers import LlamaForCausalLM

from app.core.config import Settings
from app.db.models import Artifact, Dataset, Job, JobStatus
from app.db.session import session_factory, session_scope
from app.services.keys import revoke_api_key
from app.storage import artifact_store
from lorp import assets
from tests.reliability.conftest import hostile_settings
from tests.reliability.record import HostileCases
from tests.service.api_helpers import assert_problem, bearer, client_for, insert_job, new_key
from tests.service.helpers import create_job, job_request, upload_dataset
from worker import runner

pytestmark = pytest.mark.reliability

Api = tuple[TestClient, dict[str, str]]
COMMAND = ".venv/bin/python -m pytest tests/reliability/test_hostile.py -q"
NUM_LAYERS = 4
CASES = HostileCases(
    "targeted hostile inputs",
    COMMAND,
    (
        "each case asserts a 4xx naming the field (or a failed job with a code and message) and that "
        "nothing is left behind: no job row, no stored object, no work folder or artifacts"
    ),
)
_note = CASES.note


@pytest.fixture(scope="module", autouse=True)
def _record_outcomes() -> Iterator[None]:
    yield from CASES.recording()


# -- fixtures -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_root(hostile_model_root: Path) -> Path:
    return hostile_model_root


@pytest.fixture()
def settings(tmp_path: Path, pg_url: str, model_root: Path) -> Settings:
    """Keys required, a private queue on the shared Redis db (never flushed here), small limits."""
    return hostile_settings(tmp_path, pg_url, model_root, "hostile", max_upload_bytes=4096, max_body_bytes=4096)


@pytest.fixture()
def api(settings: Settings, factory: sessionmaker[Session]) -> Iterator[Api]:
    key, _ = new_key(factory, "hostile")
    with client_for(settings, factory) as client:
        yield client, bearer(key)


def _count(factory: sessionmaker[Session], model: Any) -> int:
    with factory() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def _stored(settings: Settings) -> list[Path]:
    root = Path(settings.artifact_storage_url.removeprefix("file://"))
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def _job(model_id: str, **extra: Any) -> dict[str, Any]:
    return {"model": {"id": model_id, **extra}, "target": {"num_layers": 1}}


# -- model references at the API ----------------------------------------------------------------------


def _refused_model(api: Api, factory: sessionmaker[Session], body: dict[str, Any], field: str) -> str:
    client, auth = api
    before = _count(factory, Job)
    response = client.post("/v1/jobs", json=body, headers=auth)
    problem = assert_problem(response, 422, field)
    assert _count(factory, Job) == before, "a refused request must not leave a job row"
    return str(problem["detail"])


@pytest.mark.parametrize(
    "template",
    [
        "../../etc",
        "{root}/../../etc/passwd",
        "/models/../etc/passwd",
        "{root}/tiny-llama/../../../etc",
        "file:///etc/passwd",
        "file:{root}/../../etc",
        "~/../../etc/shadow",
        "{root}/../elsewhere.gguf",
    ],
)
def test_model_path_traversal_is_refused(
    template: str,
    api: Api,
    factory: sessionmaker[Session],
    model_root: Path,
) -> None:
    detail = _refused_model(api, factory, _job(template.format(root=model_root)), "model.id")
    assert "model roots" in detail
    _note(f"model path {template}", "422 model.id, no job row")


def test_symlink_under_a_model_root_pointing_outside_is_refused(
    api: Api,
    factory: sessionmaker[Session],
    model_root: Path,
    tmp_path: Path,
) -> None:
    outside = tmp_path / "outside-model"
    shutil.copytree(model_root / "tiny-llama", outside)
    link = model_root / f"escape-{uuid.uuid4().hex[:6]}"
    link.symlink_to(outside, target_is_directory=True)
    try:
        detail = _refused_model(api, factory, _job(str(link)), "model.id")
    finally:
        link.unlink()
    assert "model roots" in detail
    _note("symlink under a model root pointing outside", "422 model.id, no job row")


@pytest.mark.parametrize(
    "model_id",
    [
        "http://127.0.0.1:9/model",
        "https://example.com/org/model",
        "ftp://example.com/model",
        "hf://org/model",
        "s3://another-bucket/models/llama",
    ],
)
def test_urls_outside_the_configured_stores_are_refused(
    model_id: str, api: Api, factory: sessionmaker[Session]
) -> None:
    _refused_model(api, factory, _job(model_id), "model.id")
    _note(f"model URL {model_id.split(':')[0]}:", "422 model.id, no job row")


def test_s3_in_another_bucket_is_refused_when_the_store_is_s3(
    settings: Settings, factory: sessionmaker[Session]
) -> None:
    s3 = settings.model_copy(update={"storage_url": "s3://lorp-artifacts/prefix"})
    key, _ = new_key(factory, "hostile-s3")
    with client_for(s3, factory) as client:
        api = (client, bearer(key))
        for model_id in ("s3://other-bucket/llama", "s3://lorp-artifacts-evil/llama", "s3://lorp-artifacts/../x"):
            _refused_model(api, factory, _job(model_id), "model.id")
    _note("s3:// in another bucket (and '..' in ours)", "422 model.id, no job row")


def test_trust_remote_code_for_an_unlisted_model_is_refused(
    api: Api, factory: sessionmaker[Session], model_root: Path
) -> None:
    body = _job(str(model_root / "tiny-llama"), trust_remote_code=True)
    detail = _refused_model(api, factory, body, "model.trust_remote_code")
    assert "LORP_TRUST_REMOTE_CODE_MODELS" in detail
    _note("trust_remote_code=true for an unlisted model", "422 model.trust_remote_code, no job row")


# -- uploads and bodies --------------------------------------------------------------------------------


def _upload(api: Api, filename: str, data: bytes, **form: str) -> Any:
    client, auth = api
    return client.post("/v1/datasets", files={"file": (filename, io.BytesIO(data))}, data=form, headers=auth)


@pytest.mark.parametrize(
    ("case", "filename", "data", "form", "status", "field"),
    [
        ("empty", "c.txt", b"", {}, 422, "file"),
        ("whitespace only", "c.txt", b" \n\t\n", {}, 422, "file"),
        ("binary (NUL bytes)", "c.txt", b"\x7fELF\x00\x01\x02" * 20, {}, 422, "file"),
        ("not UTF-8", "c.txt", b"caf\xe9 " * 30, {}, 422, "file"),
        ("jsonl without the text field", "c.jsonl", b'{"body": "x"}\n', {}, 422, "text_field"),
        ("executable suffix", "../../x.exe", b"hello", {}, 422, "file"),
        ("oversized (over max_upload_bytes)", "c.txt", b"word " * 1000, {}, 413, "file"),
        ("NUL in name", "c.txt", b"hello world", {"name": "a\x00b"}, 422, "name"),
    ],
)
def test_refused_upload_stores_nothing(
    case: str,
    filename: str,
    data: bytes,
    form: dict[str, str],
    status: int,
    field: str | None,
    api: Api,
    settings: Settings,
    factory: sessionmaker[Session],
) -> None:
    before = _count(factory, Dataset)
    assert_problem(_upload(api, filename, data, **form), status, field)
    assert _count(factory, Dataset) == before
    assert _stored(settings) == [], "a refused upload must not leave a stored object"
    _note(f"upload: {case}", f"{status} {field or 'body'}, nothing stored")


def test_upload_filename_with_traversal_is_only_a_label(api: Api, settings: Settings, tmp_path: Path) -> None:
    response = _upload(api, "../../x.txt", b"some calibration text " * 10)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["name"] == "x.txt"
    stored = _stored(settings)
    storage_root = Path(settings.artifact_storage_url.removeprefix("file://"))
    assert [p.relative_to(storage_root).as_posix() for p in stored] == [f"datasets/{body['id']}/data.txt"]
    assert not (storage_root.parent / "x.txt").exists() and not (tmp_path / "x.txt").exists()
    _note("upload filename ../../x.txt", "201, name 'x.txt', stored under datasets/{id}/ only")


def test_oversized_json_body_is_413_and_leaves_no_job(api: Api, factory: sessionmaker[Session]) -> None:
    client, auth = api
    body = _job("demo")
    body["options"] = {"protected_layers": list(range(1000)) * 2}
    raw = json.dumps(body).encode()
    assert len(raw) > 4096
    before = _count(factory, Job)
    assert_problem(client.post("/v1/jobs", content=raw, headers={**auth, "Content-Type": "application/json"}), 413)
    # Without Content-Length (streamed): counted while read.
    chunks = iter([raw[i : i + 1024] for i in range(0, len(raw), 1024)])
    streamed = client.post("/v1/jobs", content=chunks, headers={**auth, "Content-Type": "application/json"})
    assert_problem(streamed, 413)
    assert _count(factory, Job) == before
    _note("JSON body over max_body_bytes (declared and streamed)", "413, no job row")


# -- artifact names --------------------------------------------------------------------------------------


def test_artifact_name_traversal_is_404(
    api: Api,
    settings: Settings,
    factory: sessionmaker[Session],
    model_root: Path,
) -> None:
    client, auth = api
    key_id = _key_id(factory, auth)
    job_id = insert_job(factory, status=JobStatus.succeeded, owner_id=key_id)
    storage = artifact_store(settings)
    stored = storage.put_bytes(f"jobs/{job_id}/report.json", b"{}", content_type="application/json")
    with factory() as session:
        session.add(
            Artifact(
                job_id=job_id,
                name="report.json",
                storage_key=f"jobs/{job_id}/report.json",
                size_bytes=stored.size,
                sha256=stored.sha256,
                content_type="application/json",
            )
        )
        session.commit()
    secret = Path(settings.artifact_storage_url.removeprefix("file://")).parent / "secret.txt"
    secret.write_text("do not serve")
    ok = client.get(f"/v1/jobs/{job_id}/artifacts/report.json", headers=auth)
    assert ok.status_code == 200, ok.text
    # httpx removes dot segments before sending; a raw request (curl --path-as-is) does not.
    for raw in ("../../secret.txt", "../../../../../../etc/passwd", "report.json/../../secret.txt"):
        status, content = _raw_get(client.app, f"/v1/jobs/{job_id}/artifacts/{raw}", auth)
        assert status == 404 and b"do not serve" not in content and b"root:" not in content, (raw, status)
    for name in (
        "%2e%2e/%2e%2e/secret.txt",
        "..%2F..%2Fsecret.txt",
        "%2e%2e%2f%2e%2e%2fsecret.txt",
        "%2Fetc%2Fpasswd",
        "..%5C..%5Csecret.txt",
    ):
        response = client.get(f"/v1/jobs/{job_id}/artifacts/{name}", headers=auth)
        assert response.status_code == 404, (name, response.status_code, response.text)
        assert b"do not serve" not in response.content
    _note("artifact names ../, %2e%2e, %2F, backslashes, absolute", "404, nothing outside the job served")


def _raw_get(app: Any, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
    """GET ``path`` exactly as given (no dot-segment removal), straight into the ASGI app."""
    import anyio

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()] + [(b"host", b"testserver")],
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    anyio.run(app, scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, body


def _key_id(factory: sessionmaker[Session], auth: dict[str, str]) -> uuid.UUID:
    from app.core.security import hash_api_key
    from app.db.models import ApiKey

    token = auth["Authorization"].removeprefix("Bearer ")
    with factory() as session:
        key_id = session.scalar(select(ApiKey.id).where(ApiKey.key_hash == hash_api_key(token)))
    assert key_id is not None
    return key_id


# -- ownership and keys ------------------------------------------------------------------------------------


def test_another_keys_job_and_dataset_are_404(api: Api, factory: sessionmaker[Session]) -> None:
    client, auth = api
    other, other_id = new_key(factory, "other")
    job_id = insert_job(factory, owner_id=other_id)
    dataset = _upload((client, bearer(other)), "theirs.txt", b"their calibration text " * 5)
    assert dataset.status_code == 201, dataset.text
    dataset_id = dataset.json()["id"]
    for path in (
        f"/v1/jobs/{job_id}",
        f"/v1/jobs/{job_id}/analysis",
        f"/v1/jobs/{job_id}/artifacts",
        f"/v1/jobs/{job_id}/heatmap.png",
        f"/v1/datasets/{dataset_id}",
    ):
        assert_problem(client.get(path, headers=auth), 404)
    assert_problem(client.post(f"/v1/jobs/{job_id}/cancel", headers=auth), 404)
    assert_problem(client.post("/v1/plans", json={"job_id": str(job_id), "budgets": [1]}, headers=auth), 404)
    # Nor may a job of ours use their dataset.
    before = _count(factory, Job)
    body = {**_job("demo"), "calibration": {"dataset": dataset_id}}
    assert_problem(client.post("/v1/jobs", json=body, headers=auth), 422, "calibration.dataset")
    assert _count(factory, Job) == before
    with factory() as session:
        assert session.get(Job, job_id).status == JobStatus.queued  # type: ignore[union-attr]
    _note("another key's job and dataset", "404 on every read, cancel and plan; 422 using their dataset")


def test_missing_wrong_and_revoked_keys_are_401(api: Api, factory: sessionmaker[Session]) -> None:
    client, _ = api
    revoked, revoked_id = new_key(factory, "revoked")
    with factory() as session:
        assert revoke_api_key(session, revoked_id)
        session.commit()
    before = _count(factory, Job)
    cases = {
        "missing": {},
        "wrong": bearer("lorp_" + "x" * 43),
        "not a lorp key": bearer("hunter2"),
        "wrong scheme": {"Authorization": "Basic dXNlcjpwYXNz"},
        "empty bearer": {"Authorization": "Bearer "},
        "revoked": bearer(revoked),
    }
    for name, headers in cases.items():
        for method, path, kwargs in (
            ("POST", "/v1/jobs", {"json": _job("demo")}),
            ("GET", "/v1/jobs", {}),
            ("GET", f"/v1/jobs/{uuid.uuid4()}", {}),
            ("POST", "/v1/datasets", {"files": {"file": ("c.txt", b"text")}}),
        ):
            response = client.request(method, path, headers=headers, **kwargs)
            assert_problem(response, 401)
            assert response.headers.get("www-authenticate") == "Bearer", (name, path)
    assert _count(factory, Job) == before
    _note("missing, wrong, malformed and revoked keys", "401 with WWW-Authenticate on every route, no job row")


def test_nul_in_job_list_filter_is_a_422(settings: Settings, factory: sessionmaker[Session]) -> None:
    key, _ = new_key(factory, "nul")
    with client_for(settings, factory, raise_server_exceptions=False) as client:
        response = client.get("/v1/jobs", params={"model": "a\x00b"}, headers=bearer(key))
    assert_problem(response, 422, "model")


# -- jobs on hostile models and text (run in process, as a worker) ------------------------------------------


def _variant(model_root: Path, tmp_path: Path, name: str) -> Path:
    target = model_root / f"{name}-{uuid.uuid4().hex[:6]}"
    shutil.copytree(model_root / "tiny-llama", target)
    return target


def _create_job(settings: Settings, model_id: str, dataset: str = "builtin", seq_len: int = 32) -> uuid.UUID:
    request = job_request(model_id, dataset, num_layers=1, num_samples=4, seq_len=seq_len, eval_windows=1)
    return create_job(settings, request, max_attempts=1)


def _run_failed(settings: Settings, job_id: uuid.UUID, code: str, *needles: str) -> str:
    """Run the job in process; it must fail with ``code``, a message holding ``needles``, and leave nothing."""
    started = time.monotonic()
    assert runner.run_job(job_id, settings) == "failed"
    elapsed = time.monotonic() - started
    with session_scope(session_factory(settings.sqlalchemy_url)) as session:
        job = session.get(Job, job_id)
        assert job is not None
        status, error_code, message = job.status, job.error_code, job.error_message or ""
        artifacts = session.scalar(select(func.count()).select_from(Artifact).where(Artifact.job_id == job_id))
    assert status == JobStatus.failed
    assert error_code == code, (error_code, message)
    for needle in needles:
        assert needle in message, message
    assert str(settings.work_dir) not in message, f"the message exposes the worker's folders: {message}"
    assert artifacts == 0
    assert not (settings.work_dir / str(job_id)).exists(), "the work folder must be removed"
    assert artifact_store(settings).list(f"jobs/{job_id}") == []
    return f"failed {error_code} in {elapsed:.1f}s: {message[:120]}"


@pytest.fixture()
def job_settings(settings: Settings) -> Settings:
    """The same settings; jobs run with their own sessions on the test database (not rolled back)."""
    return settings


def _rewrite_header(path: Path, edit: Any) -> None:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def _q_proj(header: dict[str, Any]) -> dict[str, Any]:
    return next(v for k, v in header.items() if k.endswith("layers.0.self_attn.q_proj.weight"))


def test_pickled_bin_weights_fail_the_job(job_settings: Settings, model_root: Path, tmp_path: Path) -> None:
    model = _variant(model_root, tmp_path, "pickled")
    state = LlamaForCausalLM.from_pretrained(model).state_dict()
    (model / "model.safetensors").unlink()
    torch.save(state, model / "pytorch_model.bin")
    outcome = _run_failed(job_settings, _create_job(job_settings, str(model)), "model_load_failed", "pickled")
    _note("pickled .bin weights only", outcome)


def test_model_needing_trust_remote_code_fails_the_job(
    job_settings: Settings, model_root: Path, tmp_path: Path
) -> None:
    model = _variant(model_root, tmp_path, "remote-code")
    config = json.loads((model / "config.json").read_text())
    config.update(
        model_type="evil_llama",
        auto_map={
            "AutoConfig": "configuration_evil.EvilConfig",
            "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
        },
    )
    (model / "config.json").write_text(json.dumps(config))
    (model / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    (model / "configuration_evil.py").write_text("raise SystemExit('remote code ran')\n")
    outcome = _run_failed(job_settings, _create_job(job_settings, str(model)), "model_load_failed", "trust_remote_code")
    _note("model needing trust_remote_code (auto_map)", outcome)


@pytest.mark.parametrize("keep", ["half", "20 bytes", "4 bytes"])
def test_truncated_safetensors_fails_the_job(
    keep: str, job_settings: Settings, model_root: Path, tmp_path: Path
) -> None:
    model = _variant(model_root, tmp_path, "truncated")
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    size = {"half": len(data) // 2, "20 bytes": 20, "4 bytes": 4}[keep]
    weights.write_bytes(data[:size])
    outcome = _run_failed(job_settings, _create_job(job_settings, str(model)), "model_load_failed", "truncated")
    _note(f"truncated safetensors ({keep})", outcome)


@pytest.mark.parametrize(
    ("case", "shape", "needle"),
    [
        ("shape larger than its data", [64, 64], "needs 16384 bytes"),
        ("shape smaller than its data", [16, 32], "needs 2048 bytes"),
        ("same size, wrong shape", [16, 64], "do not match"),
    ],
)
def test_safetensors_header_lying_about_shapes_fails_the_job(
    case: str, shape: list[int], needle: str, job_settings: Settings, model_root: Path, tmp_path: Path
) -> None:
    model = _variant(model_root, tmp_path, "lying")
    _rewrite_header(model / "model.safetensors", lambda h: _q_proj(h).update(shape=shape))
    outcome = _run_failed(job_settings, _create_job(job_settings, str(model)), "model_load_failed", needle)
    _note(f"safetensors header lies: {case}", outcome)


@pytest.mark.parametrize("keep", ["magic only", "4 MiB of the demo GGUF"])
def test_truncated_gguf_fails_the_job(keep: str, job_settings: Settings, model_root: Path) -> None:
    target = model_root / f"truncated-{uuid.uuid4().hex[:6]}.gguf"
    if keep == "magic only":
        target.write_bytes(b"GGUF\x03\x00\x00\x00")
        needle = "truncated"
    else:
        with assets.demo_gguf_path().open("rb") as src:
            target.write_bytes(src.read(4 << 20))
        needle = "GGUF"
    try:
        outcome = _run_failed(job_settings, _create_job(job_settings, str(target)), "model_load_failed", needle)
    finally:
        target.unlink()
    _note(f"truncated GGUF ({keep})", outcome)


@pytest.mark.parametrize("claimed", [10**6, 1000])
def test_config_claiming_too_many_layers_fails_fast(
    claimed: int, job_settings: Settings, model_root: Path, tmp_path: Path
) -> None:
    model = _variant(model_root, tmp_path, "many-layers")
    config = json.loads((model / "config.json").read_text())
    config["num_hidden_layers"] = claimed
    (model / "config.json").write_text(json.dumps(config))
    started = time.monotonic()
    outcome = _run_failed(
        job_settings, _create_job(job_settings, str(model)), "model_load_failed", f"claims {claimed} decoder blocks"
    )
    assert time.monotonic() - started < 30, "must be refused before the model is built"
    _note(f"config claiming {claimed} layers", outcome)


@pytest.mark.parametrize(
    ("case", "data", "needle"),
    [
        ("empty", b"", "no text"),
        ("binary", os.urandom(64) + b"\x00" * 64, "binary"),
        ("shorter than one window", b"the model", "window"),
    ],
)
def test_unusable_calibration_text_fails_the_job(
    case: str, data: bytes, needle: str, job_settings: Settings, model_root: Path
) -> None:
    dataset = str(upload_dataset(job_settings, data, name="hostile.txt"))
    job_id = _create_job(job_settings, str(model_root / "tiny-llama"), dataset=dataset, seq_len=64)
    # The client knows the file as its dataset id, not as the worker's local copy.
    needles = (needle, f"dataset {dataset}") if case == "binary" else (needle,)
    outcome = _run_failed(job_settings, job_id, "calibration_data", *needles)
    _note(f"calibration text {case}", outcome)
