"""Hostile references: a caller naming what it may not read, and one key crowding out the others.

Each case is an attack from issue 20 (items 5 and 6) with its observed answer, recorded as one
scenario row: a hub-shaped model id or ``hf:`` dataset that matches a folder in the worker's working
directory, a model folder holding links that lead outside the model roots (seen at submission, or
appearing after it), ``s3://`` models inside the service's own job outputs or wider than a model,
and a key submitting past its queued limit. API cases go through the in-process app on Postgres
(each test rolled back) with keys required; job cases run ``worker.runner.run_job`` in this process,
against a real working directory, real links and the moto S3 server on loopback.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings
from app.db.models import Artifact, Job, JobStatus
from app.db.session import session_factory, session_scope
from app.storage import artifact_store
from tests.reliability.conftest import hostile_settings
from tests.reliability.record import HostileCases
from tests.service.api_helpers import assert_problem, bearer, client_for, new_key
from tests.service.helpers import create_job, job_request
from tests.service.moto_server import ACCESS_KEY, REGION, SECRET_KEY, create_bucket
from worker import runner

pytestmark = pytest.mark.reliability

COMMAND = ".venv/bin/python -m pytest tests/reliability/test_hostile_references.py -q"
SECRET = "this line lives outside every model root"
CASES = HostileCases(
    "references outside what a caller may name",
    COMMAND,
    (
        "each case asserts a 4xx naming the field, or a failed job with a code and a message that "
        "neither quotes what it refused to read nor shows a worker path, and no artifact"
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
def outside(tmp_path: Path) -> Path:
    """A folder outside the model roots, holding a file no job may read."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret.jinja").write_text(SECRET)
    return folder


@pytest.fixture()
def settings(tmp_path: Path, pg_url: str, model_root: Path) -> Settings:
    return hostile_settings(tmp_path, pg_url, model_root, "hostile-refs", key_max_queued_jobs=3)


@pytest.fixture()
def api(settings: Settings, factory: sessionmaker[Session]) -> Iterator[tuple[TestClient, dict[str, str]]]:
    key, _ = new_key(factory, "hostile-refs")
    with client_for(settings, factory) as client:
        yield client, bearer(key)


@pytest.fixture()
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache: the hub is unreachable here, so nothing can come from it."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def _variant(model_root: Path, name: str) -> Path:
    target = model_root / f"{name}-{uuid.uuid4().hex[:6]}"
    shutil.copytree(model_root / "tiny-llama", target)
    return target


def _jobs(factory: sessionmaker[Session]) -> int:
    with factory() as session:
        return int(session.scalar(select(func.count()).select_from(Job)) or 0)


def _refused(api: tuple[TestClient, dict[str, str]], factory: sessionmaker[Session], model_id: str) -> str:
    client, auth = api
    before = _jobs(factory)
    response = client.post("/v1/jobs", json={"model": {"id": model_id}, "target": {"num_layers": 1}}, headers=auth)
    problem = assert_problem(response, 422, "model.id")
    assert _jobs(factory) == before, "a refused request must not leave a job row"
    return str(problem["detail"])


def _failed(settings: Settings, job_id: uuid.UUID, *needles: str) -> tuple[str, str]:
    """Run the job in process; it must fail with a message holding ``needles``, no worker path, no artifact."""
    assert runner.run_job(job_id, settings) == "failed"
    with session_scope(session_factory(settings.sqlalchemy_url)) as session:
        job = session.get(Job, job_id)
        assert job is not None and job.status == JobStatus.failed
        code, message = job.error_code or "", job.error_message or ""
        artifacts = session.scalar(select(func.count()).select_from(Artifact).where(Artifact.job_id == job_id))
    for needle in needles:
        assert needle in message, message
    assert str(settings.resolved_data_dir) not in message and SECRET not in message
    assert artifacts == 0 and artifact_store(settings).list(f"jobs/{job_id}") == []
    return code, message


# -- the working directory -------------------------------------------------------------------------------


def test_hub_id_matching_a_folder_in_the_working_directory(
    settings: Settings, model_root: Path, tmp_path: Path, hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``acme/tiny`` with ./acme/tiny holding a loadable model: the worker asks the hub, never the folder."""
    cwd = tmp_path / "worker-cwd"
    shutil.copytree(model_root / "tiny-llama", cwd / "acme" / "tiny")
    monkeypatch.chdir(cwd)
    job_id = create_job(settings, job_request("acme/tiny", "builtin", num_layers=1), max_attempts=1)
    code, message = _failed(settings, job_id, "hub is unreachable", "acme/tiny")
    assert code == "model_load_failed" and "model.id" in message
    _note("hub id matching a folder in the worker's working directory", f"failed {code}: {message[:160]}")


def test_hf_dataset_matching_a_folder_in_the_working_directory(
    settings: Settings, model_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``hf:acme/corpus`` with ./acme/corpus/data.csv: not read, not quoted, nothing written beside it."""
    cwd = tmp_path / "worker-cwd"
    (cwd / "acme" / "corpus").mkdir(parents=True)
    (cwd / "acme" / "corpus" / "data.csv").write_text(f"{SECRET},b\n1,2\n")
    monkeypatch.chdir(cwd)
    request = job_request(str(model_root / "tiny-llama"), "hf:acme/corpus:train#text", num_layers=1)
    job_id = create_job(settings, request, max_attempts=1)
    code, message = _failed(settings, job_id, "hub is unreachable", "acme/corpus")
    assert code == "calibration_data"
    assert sorted(p.name for p in cwd.iterdir()) == ["acme"], "nothing may be written in the working directory"
    _note("hf:NAME matching a folder (a CSV) in the worker's working directory", f"failed {code}: {message[:160]}")


# -- links inside a model folder ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "where"),
    [
        ("tokenizer template linking outside the roots", "chat_template.jinja"),
        ("folder link at depth leading outside the roots", "extra/deeper/templates"),
    ],
)
def test_model_folder_with_a_link_outside_the_roots_is_refused(
    case: str,
    where: str,
    api: tuple[TestClient, dict[str, str]],
    factory: sessionmaker[Session],
    model_root: Path,
    outside: Path,
) -> None:
    model = _variant(model_root, "linked")
    link = model / where
    if link.exists():
        link.unlink()
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside / "secret.jinja" if where.endswith(".jinja") else outside)
    detail = _refused(api, factory, str(model))
    assert f"{where} is a link to a place outside the allowed roots" in detail and str(outside) not in detail
    _note(f"model folder: {case}", "422 model.id, no job row")


def test_link_appearing_after_submission_fails_the_job_and_ships_nothing(
    settings: Settings, model_root: Path, outside: Path
) -> None:
    model = _variant(model_root, "late-link")
    job_id = create_job(settings, job_request(str(model), "builtin", num_layers=1), max_attempts=1)
    (model / "chat_template.jinja").unlink()
    (model / "chat_template.jinja").symlink_to(outside / "secret.jinja")
    code, message = _failed(settings, job_id, "chat_template.jinja is a link", "model.id")
    assert code in ("invalid_request", "model_load_failed")
    stored = artifact_store(settings)
    for key in stored.list(""):
        assert SECRET.encode() not in b"".join(stored.iter_chunks(key)), key
    _note("tokenizer template link appearing after submission", f"failed {code}: {message[:160]}")


# -- s3:// models -----------------------------------------------------------------------------------------


@pytest.fixture()
def s3_settings(settings: Settings, s3_server: str) -> Settings:
    bucket = f"lorp-{uuid.uuid4().hex[:12]}"
    create_bucket(s3_server, bucket)
    return settings.model_copy(
        update={
            "storage_url": f"s3://{bucket}/artifacts",
            # An operator's mistake: a prefix as wide as the artifact folder itself.
            "model_s3_prefixes": [f"s3://{bucket}/models/", f"s3://{bucket}/artifacts/"],
            "s3_endpoint_url": s3_server,
            "s3_region": REGION,
            "s3_access_key": ACCESS_KEY,
            "s3_secret_key": SECRET_KEY,
        }
    )


def test_s3_models_inside_the_service_own_outputs_are_refused(
    s3_settings: Settings, factory: sessionmaker[Session], model_root: Path
) -> None:
    bucket = s3_settings.artifact_storage_url.removeprefix("s3://").split("/", 1)[0]
    victim = uuid.uuid4()
    storage = artifact_store(s3_settings)
    for path in (model_root / "tiny-llama").iterdir():
        storage.put_file(f"jobs/{victim}/model/{path.name}", path)
    key, _ = new_key(factory, "hostile-s3")
    with client_for(s3_settings, factory) as client:
        api = (client, bearer(key))
        cases = {
            "s3:// naming another owner's job outputs": f"s3://{bucket}/artifacts/jobs/{victim}/model",
            "s3:// prefix as wide as jobs/": f"s3://{bucket}/artifacts/jobs/",
            "s3:// prefix holding the whole artifact folder": f"s3://{bucket}/artifacts/",
            "s3:// naming a bucket root": f"s3://{bucket}",
            "s3:// outside the operator's folders": f"s3://{bucket}/elsewhere/model/",
        }
        for case, model_id in cases.items():
            detail = _refused(api, factory, model_id)
            _note(case, f"422 model.id: {detail[:120]}")


def test_s3_model_beyond_the_bounds_is_refused_before_copying(s3_settings: Settings, model_root: Path) -> None:
    settings = s3_settings.model_copy(update={"model_s3_max_objects": 3})
    bucket = settings.artifact_storage_url.removeprefix("s3://").split("/", 1)[0]
    from app.storage import storage_from_url

    models = storage_from_url(f"s3://{bucket}/models/tiny", **settings.s3_options())
    for path in (model_root / "tiny-llama").iterdir():
        models.put_file(path.name, path)
    job_id = create_job(settings, job_request(f"s3://{bucket}/models/tiny/", "builtin", num_layers=1), max_attempts=1)
    code, message = _failed(settings, job_id, "LORP_MODEL_S3_MAX_OBJECTS")
    assert code == "model_load_failed"
    _note("s3:// model holding more objects than LORP_MODEL_S3_MAX_OBJECTS", f"failed {code}: {message[:160]}")


# -- one key filling the queue -------------------------------------------------------------------------------


def test_one_key_cannot_fill_the_queue(api: tuple[TestClient, dict[str, str]], factory: sessionmaker[Session]) -> None:
    client, auth = api
    body = {"model": {"id": "demo"}, "target": {"num_layers": 1}}
    accepted = [client.post("/v1/jobs", json=body, headers=auth).status_code for _ in range(3)]
    assert accepted == [202, 202, 202]
    refused = client.post("/v1/jobs", json=body, headers=auth)
    problem = assert_problem(refused, 429)
    assert problem["code"] == "too_many_jobs" and refused.headers["Retry-After"].isdigit()
    other, _ = new_key(factory, "hostile-refs-other")
    assert client.post("/v1/jobs", json=body, headers=bearer(other)).status_code == 202
    _note(
        "one key submitting past LORP_KEY_MAX_QUEUED_JOBS",
        f"429 too_many_jobs, Retry-After {refused.headers['Retry-After']} s; another key still 202",
    )
