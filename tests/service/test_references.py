"""What a job may name and what its results show, on Postgres, Redis and S3 (moto) on loopback.

``s3://`` models only from folders ``LORP_MODEL_S3_PREFIXES`` names, never the service's own job outputs
or uploads, copied only within bounds; an analysis reused only within its owner; and no internal path
(the data folder, the work folder) in a real job's report.json, its analysis row, or any API response.
Jobs run through ``worker.runner.run_job`` in this process, as a worker would.
"""

from __future__ import annotations

import json
import random
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import Engine, delete, select
from sqlalchemy.orm import Session, sessionmaker
from tiny import save_tiny_llama

from app.core.config import Settings
from app.core.s3ref import S3Location, parse_s3_location
from app.db.models import Analysis, ApiKey, Job, JobStatus
from app.db.session import session_factory, session_scope
from app.jobspec import (
    DatasetReference,
    JobCreate,
    JobReferences,
    ModelLocation,
    ModelRef,
    RequestError,
    check_model_reference,
    resolve_references,
)
from app.services.keys import create_api_key
from app.storage import artifact_store
from lorp.assets.cache import cache_dir
from worker import runner
from worker.failures import JobFailure
from worker.inputs import JobInputs

from .api_helpers import assert_problem, client_for
from .helpers import job_request, upload_dataset
from .moto_server import ACCESS_KEY, REGION, SECRET_KEY, create_bucket

NUM_LAYERS = 4
WORDS = ("the", "model", "block", "layer", "state", "token", "depth", "river", "mountain", "city", "music")


@pytest.fixture(scope="module")
def model_root(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> Path:
    root = tmp_path_factory.mktemp("models")
    save_tiny_llama(root, "tiny-llama", tiny_tokenizer, num_hidden_layers=NUM_LAYERS, max_position_embeddings=256)
    return root


@pytest.fixture(scope="module")
def corpus() -> bytes:
    rng = random.Random(1)
    return " ".join(rng.choice(WORDS) for _ in range(4000)).encode()


@pytest.fixture()
def local_settings(tmp_path: Path, pg_url: str, redis_url: str, model_root: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=pg_url,
        broker_url=redis_url,
        storage_url=(tmp_path / "artifacts").as_uri(),
        model_roots=[model_root],
        queue_name=f"refs-{uuid.uuid4().hex[:10]}",
        heartbeat_interval_s=0.5,
        progress_min_interval_s=0.0,
    )


@pytest.fixture()
def s3_settings(local_settings: Settings, s3_server: str) -> Settings:
    """Artifacts in a fresh bucket under ``artifacts/``; models may come from its ``models/`` folder."""
    bucket = f"lorp-{uuid.uuid4().hex[:12]}"
    create_bucket(s3_server, bucket)
    return local_settings.model_copy(
        update={
            "storage_url": f"s3://{bucket}/artifacts",
            "model_s3_prefixes": [f"s3://{bucket}/models/"],
            "s3_endpoint_url": s3_server,
            "s3_region": REGION,
            "s3_access_key": ACCESS_KEY,
            "s3_secret_key": SECRET_KEY,
        }
    )


def _bucket(settings: Settings) -> str:
    return parse_s3_location(settings.artifact_storage_url, whole_bucket=True).bucket


def _upload_model(settings: Settings, model_root: Path, url: str) -> None:
    from app.storage import storage_from_url

    store = storage_from_url(url, **settings.s3_options())
    for path in sorted((model_root / "tiny-llama").iterdir()):
        store.put_file(path.name, path)


def _create(settings: Settings, request: JobCreate, owner: uuid.UUID | None = None) -> uuid.UUID:
    with session_scope(session_factory(settings.sqlalchemy_url)) as session:
        job = Job(
            owner_id=owner,
            request=request.model_dump(mode="json"),
            request_hash=request.fingerprint(),
            model_source=request.model.id,
            method=request.method,
            queue=settings.queue_name,
            max_attempts=1,
        )
        session.add(job)
        session.flush()
        return job.id


@pytest.fixture()
def jobs(pg_engine: Engine) -> Iterator[list[uuid.UUID]]:
    """Committed job ids, removed with their analyses afterwards."""
    ids: list[uuid.UUID] = []
    yield ids
    with pg_engine.begin() as conn:
        analyses = [a for a in conn.scalars(select(Job.analysis_id).where(Job.id.in_(ids))) if a is not None]
        conn.execute(delete(Job).where(Job.id.in_(ids)))
        if analyses:
            conn.execute(delete(Analysis).where(Analysis.id.in_(analyses)))


def _run(settings: Settings, request: JobCreate, jobs: list[uuid.UUID], owner: uuid.UUID | None = None) -> Job:
    job_id = _create(settings, request, owner)
    jobs.append(job_id)
    runner.run_job(job_id, settings)
    with session_scope(session_factory(settings.sqlalchemy_url)) as session:
        job = session.get(Job, job_id)
        assert job is not None
        session.expunge(job)
        return job


# -- the parser: what a model.id or an s3:// setting names, before any setting is consulted -----------------


def test_s3_locations_parse_as_the_store_reads_them() -> None:
    assert parse_s3_location("s3://bkt/models/x/") == S3Location("bkt", "models/x")
    assert parse_s3_location("S3://bkt/models/x") == S3Location("bkt", "models/x")  # the scheme in any case
    assert parse_s3_location(" s3://bkt/a%20b/c ") == S3Location("bkt", "a b/c")  # decoded as keys are written
    assert parse_s3_location("s3://bkt", whole_bucket=True) == S3Location("bkt", "")
    assert parse_s3_location("s3://bkt/", whole_bucket=True).url == "s3://bkt/"
    assert S3Location("bkt", "models/x").url == "s3://bkt/models/x/"

    refused = {
        "s3://": "does not name a valid bucket",
        "s3:///x": "does not name a valid bucket",
        "s3://Bkt/x": "does not name a valid bucket",
        "s3://u@bkt/x": "does not name a valid bucket",
        "s3://bkt": "names a whole bucket",
        "s3://bkt/": "names a whole bucket",
        "s3://bkt/a/../b": "'..' segment",
        "s3://bkt/%2e%2e/b": "'..' segment",
        "s3://bkt/a//b": "empty",
        "s3://bkt/a%5Cb": "backslash",
        "s3://bkt/a%00b": "control character",
        "s3://bkt/a?x=1": "query strings",
        "s3://bkt/a#f": "fragments",
        "http://bkt/a": "is not an s3:// URL",
    }
    for value, reason in refused.items():
        with pytest.raises(ValueError, match=re.escape(reason)):
            parse_s3_location(value)
    with pytest.raises(ValueError, match="does not name a valid bucket"):
        parse_s3_location("s3:///x", whole_bucket=True)


def test_s3_locations_nest_by_whole_segments() -> None:
    models, bucket = S3Location("bkt", "models"), S3Location("bkt", "")
    assert S3Location("bkt", "models/x").within(models) and models.within(models)
    assert not S3Location("bkt", "modelsx/y").within(models)
    assert not S3Location("other", "models/x").within(models)
    assert models.within(bucket) and not bucket.within(models) and bucket.overlaps(models)


def test_model_ids_parse_into_one_location_each(tmp_path: Path) -> None:
    assert ModelLocation.parse("demo") == ModelLocation("demo")
    assert ModelLocation.parse("Qwen/Qwen3-8B") == ModelLocation("hub")
    assert ModelLocation.parse("gpt2") == ModelLocation("hub")
    folder = S3Location("bkt", "models/x")
    assert ModelLocation.parse("s3://bkt/models/x/") == ModelLocation("s3", s3=folder)
    assert ModelLocation.parse("S3://bkt/models/x") == ModelLocation("s3", s3=folder)
    assert ModelLocation.parse("s3://bkt/models/x.gguf").kind == "s3"  # s3 first, whatever the suffix
    for local in (str(tmp_path / "m"), f"file:{tmp_path}/m", f"file://{tmp_path}/m"):
        assert ModelLocation.parse(local) == ModelLocation("local", path=tmp_path / "m")
    assert ModelLocation.parse("~/m").path == Path.home() / "m"
    assert ModelLocation.parse("x.gguf").path == Path.cwd() / "x.gguf"

    refused = {
        "s3://": "not a usable s3:// model reference: 's3://' does not name a valid bucket",
        "s3:///x": "not a usable s3:// model reference: 's3:///x' does not name a valid bucket",
        "S3://bkt": "not a usable s3:// model reference: 'S3://bkt' names a whole bucket",
        "s3://bkt/a/../b": "'..' segment",
        "http://host/model": "URLs are not fetched",
        "hf://org/name": "URLs are not fetched",
        "Demo/../x": "not a valid hub model id",
        "org--name": "not a valid hub model id",
        "-org/name": "not a valid hub model id",
        "~no-such-user-here/m": "cannot resolve the local model path",
    }
    for value, message in refused.items():
        with pytest.raises(RequestError) as caught:
            ModelLocation.parse(value)
        assert message in caught.value.message and caught.value.errors[0].field == "model.id", value


def test_an_s3_store_written_in_any_form_is_never_a_model() -> None:
    """The store URL is read by the same parser as the model: an uppercase scheme or an encoded
    prefix still keeps its job outputs out of what a model may name."""
    for store in ("S3://bkt/%61rtifacts/", " s3://bkt/artifacts", "s3://bkt/artifacts"):
        settings = Settings(storage_url=store, model_s3_prefixes=["s3://bkt/models/", "s3://bkt/artifacts/"])
        with pytest.raises(RequestError, match="the service's own job outputs"):
            check_model_reference(ModelRef(id="s3://bkt/artifacts/jobs/x/"), settings)
        assert check_model_reference(ModelRef(id="s3://bkt/models/x/"), settings).s3 == S3Location("bkt", "models/x")


# -- one reading of a request's references, for the API and the worker ------------------------------------


def _request(model: str, calibration: str = "builtin", evaluation: str | None = None, **model_fields: Any) -> JobCreate:
    return JobCreate.model_validate(
        {
            "model": {"id": model, **model_fields},
            "target": {"num_layers": 1},
            "calibration": {"dataset": calibration},
            "evaluation": {"dataset": evaluation},
        }
    )


def _reference_settings(model_root: Path, **update: Any) -> Settings:
    return Settings(
        storage_url="s3://bkt/artifacts", model_s3_prefixes=["s3://bkt/models/"], model_roots=[model_root], **update
    )


def test_each_reference_is_read_once_into_its_kind(model_root: Path) -> None:
    """``resolve_references`` says what every reference of a request is: the model's kind, location and
    the roots a local one stays in (how the engine loads it), and each dataset field's kind."""
    settings = _reference_settings(model_root)
    upload = uuid.uuid4()
    builtin = DatasetReference("builtin", "calibration.dataset", "builtin")
    local = model_root / "tiny-llama"
    expected = {
        "demo": JobReferences("demo", ModelLocation("demo"), None, builtin, None),
        "Qwen/Qwen3-8B": JobReferences("Qwen/Qwen3-8B", ModelLocation("hub"), None, builtin, None),
        str(local): JobReferences(
            str(local),
            ModelLocation("local", path=local),
            (model_root.resolve(), cache_dir().resolve()),
            builtin,
            None,
        ),
        "s3://bkt/models/x/": JobReferences(
            "s3://bkt/models/x/", ModelLocation("s3", s3=S3Location("bkt", "models/x")), None, builtin, None
        ),
    }
    load_kinds = {"demo": "demo", "Qwen/Qwen3-8B": "hub", str(local): "local", "s3://bkt/models/x/": "local"}
    for model, references in expected.items():
        resolved = resolve_references(_request(model), settings)
        assert resolved == references, model
        assert resolved.load_kind == load_kinds[model], model

    hub = "hf:wikitext/wikitext-2-raw-v1:train#text"
    resolved = resolve_references(_request("demo", hub, str(upload)), settings)
    assert resolved.calibration == DatasetReference(hub, "calibration.dataset", "hub")
    assert resolved.evaluation == DatasetReference(str(upload), "evaluation.dataset", "uploaded")
    assert resolved.calibration.upload_id is None and resolved.evaluation.upload_id == upload
    assert builtin.upload_id is None


def test_a_refused_reference_names_its_field(model_root: Path, tmp_path: Path) -> None:
    """The one reading refuses what the settings do not allow, as ``check_model_reference`` does."""
    settings = _reference_settings(model_root)
    refused: dict[str, tuple[JobCreate, Settings, str]] = {
        "model.trust_remote_code": (
            _request("Qwen/Qwen3-8B", trust_remote_code=True),
            settings,
            "trust_remote_code is not allowed for 'Qwen/Qwen3-8B'",
        ),
        "model.id": (_request("org/name"), settings.model_copy(update={"allow_hub_models": False}), "hub models"),
    }
    for field, (request, used, message) in refused.items():
        with pytest.raises(RequestError) as caught:
            resolve_references(request, used)
        assert message in caught.value.message and caught.value.errors[0].field == field
    for model, message in {
        str(tmp_path / "elsewhere"): "must lie inside the configured model roots",
        "s3://bkt/artifacts/jobs/x/": "the service's own job outputs",
        "s3://bkt/elsewhere/x/": "must lie under a folder this service allows",
    }.items():
        with pytest.raises(RequestError, match=re.escape(message)) as caught:
            resolve_references(_request(model), settings)
        assert caught.value.errors[0].field == "model.id", model


def test_the_worker_hands_the_engine_each_reference_as_read(model_root: Path, tmp_path: Path) -> None:
    """References that need no copy reach the engine as they were read: the spec names the local path,
    the hub id or the demo and the datasets as written, and ``Sources`` what each is and the client's names."""
    settings = _reference_settings(model_root, data_dir=tmp_path / "data")
    local = model_root / "tiny-llama"
    hub = "hf:wikitext/wikitext-2-raw-v1:train#text"

    def nothing_stored() -> Any:
        raise AssertionError("no store is needed")

    cases = {
        "demo": ("demo", "demo", None),
        "Qwen/Qwen3-8B": ("hub", "Qwen/Qwen3-8B", None),
        str(local): ("local", str(local), (model_root.resolve(), cache_dir().resolve())),
    }
    for model, (kind, source, roots) in cases.items():
        inputs = JobInputs(settings, sessionmaker(), nothing_stored, tmp_path / "work")
        spec = inputs.resolve(_request(model, hub, "builtin"))
        assert (spec.model.id, spec.calibration.dataset, spec.evaluation.dataset) == (source, hub, "builtin")
        sources = inputs.sources
        assert sources is not None
        assert (sources.model_kind, sources.model_roots, sources.model_name) == (kind, roots, model)
        assert (sources.calibration_name, sources.evaluation_name) == (hub, "builtin")
        assert sources.analysis_scope == "owner:anonymous" and sources.scratch is None
    inputs = JobInputs(settings, sessionmaker(), nothing_stored, tmp_path / "work")
    assert inputs.resolve(_request("demo")).evaluation.dataset is None and inputs.sources is not None
    assert inputs.sources.evaluation_name is None


def test_a_missing_upload_is_refused_naming_its_field(
    local_settings: Settings, model_root: Path, tmp_path: Path
) -> None:
    missing = uuid.uuid4()
    inputs = JobInputs(
        local_settings, session_factory(local_settings.sqlalchemy_url), lambda: artifact_store(local_settings), tmp_path
    )
    with pytest.raises(RequestError) as caught:
        inputs.resolve(_request(str(model_root / "tiny-llama"), "builtin", str(missing)))
    assert caught.value.message == f"dataset {missing} does not exist; upload it with POST /v1/datasets"
    assert caught.value.errors[0].field == "evaluation.dataset"


# -- s3:// models at the API ----------------------------------------------------------------------------


def _submit(settings: Settings, factory: sessionmaker[Session], model_id: str) -> Any:
    with client_for(settings, factory) as client:
        return client.post("/v1/jobs", json={"model": {"id": model_id}, "target": {"num_layers": 1}})


def test_s3_models_are_off_until_an_operator_names_folders(
    s3_settings: Settings, rollback_sessionmaker: sessionmaker[Session]
) -> None:
    off = s3_settings.model_copy(update={"model_s3_prefixes": []})
    problem = assert_problem(_submit(off, rollback_sessionmaker, f"s3://{_bucket(off)}/models/x/"), 422, "model.id")
    assert "LORP_MODEL_S3_PREFIXES" in problem["detail"]
    with pytest.raises(ValidationError, match="names a whole bucket"):
        Settings(model_s3_prefixes=["s3://some-bucket/"])


def test_s3_models_only_under_the_named_folders_and_never_the_service_own(
    s3_settings: Settings, rollback_sessionmaker: sessionmaker[Session], model_root: Path
) -> None:
    bucket = _bucket(s3_settings)
    _upload_model(s3_settings, model_root, f"s3://{bucket}/models/tiny")
    assert _submit(s3_settings, rollback_sessionmaker, f"s3://{bucket}/models/tiny/").status_code == 202
    job = uuid.uuid4()
    # An operator who names the whole artifact folder still never exposes job outputs or uploads.
    wide = s3_settings.model_copy(update={"model_s3_prefixes": [f"s3://{bucket}/models/", f"s3://{bucket}/artifacts/"]})
    refused = {
        f"s3://{bucket}/elsewhere/tiny/": "must lie under a folder this service allows",
        f"s3://other-{bucket}/models/tiny/": "must lie under a folder this service allows",
        f"s3://{bucket}/modelsx/tiny/": "must lie under a folder this service allows",
        f"s3://{bucket}/artifacts/jobs/{job}/model": "the service's own job outputs",
        f"s3://{bucket}/artifacts/jobs/": "the service's own job outputs",
        f"s3://{bucket}/artifacts/datasets/{job}": "the service's own job outputs and uploads",
        f"s3://{bucket}/artifacts/": "the service's own job outputs",
        f"s3://{bucket}/": "names a whole bucket",
        f"s3://{bucket}/models/../artifacts/jobs/": "'..' segment",
        f"s3://{bucket}/models/%2e%2e/artifacts/jobs/": "'..' segment",
        f"s3://{bucket}/models//tiny/": "empty",
    }
    for model_id, needle in refused.items():
        problem = assert_problem(_submit(wide, rollback_sessionmaker, model_id), 422, "model.id")
        assert needle in problem["detail"], (model_id, problem["detail"])


# -- local models at the API --------------------------------------------------------------------------------


def test_local_model_links_are_followed_only_inside_the_roots(
    local_settings: Settings, rollback_sessionmaker: sessionmaker[Session], model_root: Path, tmp_path: Path
) -> None:
    """A folder of links to a sibling under the root (shared files) is accepted; one link at depth to a
    file outside is a 422 naming the file, not where it leads."""
    shared = model_root / f"linked-{uuid.uuid4().hex[:6]}"
    shared.mkdir()
    for path in (model_root / "tiny-llama").iterdir():
        (shared / path.name).symlink_to(path)
    assert _submit(local_settings, rollback_sessionmaker, str(shared)).status_code == 202
    secret = tmp_path / "elsewhere" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("not a model file")
    (shared / "templates" / "nested").mkdir(parents=True)
    (shared / "templates" / "nested" / "tool.jinja").symlink_to(secret)
    problem = assert_problem(_submit(local_settings, rollback_sessionmaker, str(shared)), 422, "model.id")
    assert "templates/nested/tool.jinja is a link to a place outside the allowed roots" in problem["detail"]
    assert str(secret.parent) not in problem["detail"]


# -- s3:// models in the worker ---------------------------------------------------------------------------


def test_another_jobs_outputs_are_never_a_model_even_when_a_row_names_them(
    s3_settings: Settings, model_root: Path, jobs: list[uuid.UUID]
) -> None:
    """A row written past the API (an old request, a changed setting) is checked again by the worker."""
    settings = s3_settings
    bucket = _bucket(settings)
    victim = uuid.uuid4()
    _upload_model(settings, model_root, f"s3://{bucket}/artifacts/jobs/{victim}/model")
    wide = settings.model_copy(update={"model_s3_prefixes": [f"s3://{bucket}/artifacts/"]})
    job = _run(wide, job_request(f"s3://{bucket}/artifacts/jobs/{victim}/model", "builtin", num_layers=1), jobs)
    assert job.status == JobStatus.failed and job.error_code == "invalid_request"
    assert "own job outputs" in (job.error_message or "") and "model.id" in (job.error_message or "")
    assert not (settings.work_dir / str(job.id)).exists()


@pytest.mark.parametrize(
    ("limit", "needle"),
    [
        ({"model_s3_max_objects": 2}, "LORP_MODEL_S3_MAX_OBJECTS"),
        ({"model_s3_max_bytes": 4096}, "LORP_MODEL_S3_MAX_BYTES"),
    ],
)
def test_an_oversized_s3_model_is_refused_before_anything_is_copied(
    limit: dict[str, int], needle: str, s3_settings: Settings, model_root: Path, tmp_path: Path, jobs: list[uuid.UUID]
) -> None:
    settings = s3_settings.model_copy(update=limit)
    url = f"s3://{_bucket(settings)}/models/tiny-llama/"
    _upload_model(settings, model_root, url)
    work = tmp_path / "work-of-one-job"
    inputs = JobInputs(settings, session_factory(settings.sqlalchemy_url), lambda: artifact_store(settings), work)
    with pytest.raises(JobFailure) as err:
        inputs.resolve(job_request(url, "builtin", num_layers=1))
    assert err.value.code == "model_load_failed" and needle in err.value.message
    assert not (work / "model-source").exists(), "nothing may be copied before the bounds are checked"
    job = _run(settings, job_request(url, "builtin", num_layers=1), jobs)
    assert job.error_code == "model_load_failed" and needle in (job.error_message or "")


# -- analyses are an owner's own ----------------------------------------------------------------------------


@pytest.fixture()
def owners(pg_engine: Engine) -> Iterator[tuple[uuid.UUID, uuid.UUID]]:
    factory = sessionmaker(bind=pg_engine)
    with factory() as session:
        ids = [create_api_key(session, f"owner-{n}-{uuid.uuid4().hex[:6]}")[1].id for n in range(2)]
        session.commit()
    yield ids[0], ids[1]
    with pg_engine.begin() as conn:
        conn.execute(delete(Job).where(Job.owner_id.in_(ids)))
        conn.execute(delete(ApiKey).where(ApiKey.id.in_(ids)))


def test_an_analysis_is_reused_only_within_its_owner(
    local_settings: Settings,
    model_root: Path,
    corpus: bytes,
    owners: tuple[uuid.UUID, uuid.UUID],
    jobs: list[uuid.UUID],
) -> None:
    settings, (alice, bob) = local_settings, owners
    dataset = upload_dataset(settings, corpus)
    model = str(model_root / "tiny-llama")
    seed = random.randrange(10**6)  # a capture no other test made
    request = job_request(model, dataset, seed=seed, num_layers=1, method="shortgpt", perplexity=False, eval_windows=1)
    first = _run(settings, request, jobs, alice)
    theirs = _run(settings, request, jobs, bob)
    again = _run(settings, request, jobs, alice)
    assert first.status == theirs.status == again.status == JobStatus.succeeded
    assert first.analysis_reused is False and theirs.analysis_reused is False, "another owner's capture is theirs"
    assert theirs.analysis_id != first.analysis_id
    assert again.analysis_reused is True and again.analysis_id == first.analysis_id
    assert first.summary is not None and theirs.summary is not None
    assert first.summary["fingerprint"] != theirs.summary["fingerprint"]


# -- no internal path in what a client reads -----------------------------------------------------------------


def test_a_real_job_shows_no_internal_path(
    s3_settings: Settings, model_root: Path, corpus: bytes, tmp_path: Path, jobs: list[uuid.UUID]
) -> None:
    """An s3:// model calibrated and evaluated on uploads: report.json, the analysis row, the job, its
    analysis and files as the API serves them name the inputs as the client did, and none holds the
    data folder, the work folder or the test's temporary folder (which holds both)."""
    settings = s3_settings
    url = f"s3://{_bucket(settings)}/models/tiny-llama/"
    _upload_model(settings, model_root, url)
    calibration = upload_dataset(settings, corpus)
    evaluation = upload_dataset(settings, corpus[:6000])
    request = job_request(url, calibration, num_layers=1, method="lorp")
    request = request.model_copy(
        update={"evaluation": request.evaluation.model_copy(update={"dataset": str(evaluation)})}
    )
    job = _run(settings, request, jobs)
    assert job.status == JobStatus.succeeded, job.error_message
    report_text = artifact_store(settings).open(f"jobs/{job.id}/report.json").read().decode()
    report = json.loads(report_text)
    assert report["request"]["model"]["id"] == url and report["provenance"]["model"]["source"] == url
    assert report["request"]["calibration"]["dataset"] == str(calibration)
    assert report["request"]["evaluation"]["dataset"] == str(evaluation)
    assert report["provenance"]["calibration"]["source"] == str(calibration)
    with session_scope(session_factory(settings.sqlalchemy_url)) as session:
        analysis = session.get(Analysis, job.analysis_id)
        assert analysis is not None
        stored = json.dumps(analysis.provenance) + analysis.model_source + json.dumps(job.summary)
    with client_for(settings, None) as client:
        served = [client.get(f"/v1/jobs/{job.id}{path}").text for path in ("", "/analysis", "/artifacts")]
        served.append(client.get("/v1/jobs").text)
    internal = {str(tmp_path), str(settings.resolved_data_dir), str(settings.work_dir), "model-source", "<job folder>"}
    for where, text in {"report.json": report_text, "stored rows": stored, **dict(enumerate(served))}.items():
        leaked = [path for path in internal if path in text]
        assert not leaked, f"{where} shows {leaked}"
