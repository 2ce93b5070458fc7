"""Hostile input that used to be a 500 or a wrong answer, and full disks: each case and its answer now.

API cases go through the in-process app on Postgres (each test rolled back): a JSONL line nested
100,000 arrays deep (the upload check's parser recursed until it crashed), NUL characters in
``notify.url``, ``notify.secret``, a prompt, the ``Idempotency-Key`` header or an artifact name (Postgres
refused them: a 500), unpaired surrogates. Disk cases fill a real filesystem, a small tmpfs (mounting
needs root; skipped with the reason where it is not permitted): jobs run through
``worker.runner.run_job`` in this process as a worker would, with their work folder or their artifact
store on the full disk; an upload onto a full disk; ``/readyz`` and ``/metrics`` on a full disk; and the
errors a full disk raises in torch, safetensors and SQLite, as the worker classifies them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings
from app.db.migrate import upgrade_head
from app.db.models import Artifact, Dataset, Job, JobStatus
from app.db.session import session_factory, session_scope
from app.storage import artifact_store
from tests.reliability.conftest import hostile_settings
from tests.reliability.record import HostileCases
from tests.service.api_helpers import assert_problem, bearer, client_for, insert_job, new_key
from tests.service.helpers import create_job, job_request
from tests.service.tmpfs import fill, mounted_tmpfs, used_files
from worker import failures, runner

pytestmark = pytest.mark.reliability

Api = tuple[TestClient, dict[str, str]]
COMMAND = ".venv/bin/python -m pytest tests/reliability/test_hostile_inputs_500.py -q"
JSON = {"content-type": "application/json"}
DEEP = b"[" * 100_000 + b"]" * 100_000
HOOKS = "hooks.example.com"
CASES = HostileCases(
    "inputs that were 500s, and full disks",
    COMMAND,
    (
        "each case was a 500 or a wrong answer before (RecursionError, Postgres refusing NUL, "
        "internal_error for a full disk, /readyz 200 on a full disk); now a 4xx naming the field, a "
        "503 disk_full, or a job failed with disk_full that leaves no work folder, artifacts or rows"
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
    """Keys required, webhooks allowed to one host, a private queue on the shared Redis db."""
    return hostile_settings(
        tmp_path, pg_url, model_root, "hostile500", webhook_allowed_hosts=[HOOKS], max_body_bytes=512 * 1024
    )


@pytest.fixture()
def api(settings: Settings, factory: sessionmaker[Session]) -> Iterator[Api]:
    key, _ = new_key(factory, "hostile-500")
    with client_for(settings, factory, raise_server_exceptions=False) as client:
        yield client, bearer(key)


def _count(factory: sessionmaker[Session], model: Any) -> int:
    with factory() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def _stored(settings: Settings) -> list[Path]:
    root = Path(settings.artifact_storage_url.removeprefix("file://"))
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def _answer(problem: dict[str, Any]) -> str:
    fields = ", ".join(e["field"] for e in problem["errors"] if e["field"]) or "-"
    why = problem["errors"][0]["message"] if problem["errors"] else problem["detail"]
    return f"{problem['status']} {problem['code']} {fields}: {why}"


# -- input that reached the parser's recursion or Postgres ---------------------------------------------------


def test_jsonl_line_nested_100000_deep_is_422(api: Api, settings: Settings, factory: sessionmaker[Session]) -> None:
    client, auth = api
    before = _count(factory, Dataset)  # other suites may leave committed rows in the shared database
    content = b'{"text": "fine"}\n{"text": "x", "meta": ' + DEEP + b"}\n"
    response = client.post("/v1/datasets", files={"file": ("deep.jsonl", content)}, headers=auth)
    problem = assert_problem(response, 422, "file")
    assert "line 2" in problem["detail"] and "nests deeper than 100 levels" in problem["detail"]
    assert _count(factory, Dataset) == before and _stored(settings) == []
    _note("upload: a JSONL line nested 100,000 arrays deep (was a 500)", f"{_answer(problem)}; nothing stored")


def _job(**extra: Any) -> dict[str, Any]:
    return {"model": {"id": "demo"}, "target": {"num_layers": 1}, **extra}


NOTIFY = {"url": f"https://{HOOKS}/lorp", "secret": "s" * 24}


@pytest.mark.parametrize(
    ("case", "raw", "field", "needle"),
    [
        (
            "NUL in notify.url",
            json.dumps(_job(notify={**NOTIFY, "url": f"https://{HOOKS}/a\x00b"})),
            "notify.url",
            "NUL",
        ),
        (
            "NUL in notify.secret",
            json.dumps(_job(notify={**NOTIFY, "secret": "s" * 20 + "\x00"})),
            "notify.secret",
            "NUL",
        ),
        ("NUL in a prompt", json.dumps(_job(evaluation={"prompts": ["ok", "a\x00"]})), "evaluation.prompts.1", "NUL"),
        (
            "unpaired surrogate \\ud800 in a prompt",
            json.dumps(_job(evaluation={"prompts": ["\ud800"]})),
            "evaluation.prompts.0",
            "surrogate",
        ),
        ("NUL in a field name", json.dumps(_job(**{"x\x00": 1})), "x\\u0000", "NUL"),
        (
            "JSON body nested 100,000 arrays deep",
            '{"model": {"id": "demo"}, "target": {"num_layers": 1}, "x": ' + DEEP.decode() + "}",
            "body",
            "nests deeper",
        ),
    ],
)
def test_job_body_that_reached_postgres_is_422(
    case: str, raw: str, field: str, needle: str, api: Api, factory: sessionmaker[Session]
) -> None:
    client, auth = api
    before = _count(factory, Job)
    response = client.post("/v1/jobs", content=raw.encode(), headers={**auth, **JSON})
    problem = assert_problem(response, 422, field)
    assert needle in next(e["message"] for e in problem["errors"] if e["field"] == field)
    assert _count(factory, Job) == before, "a refused request must not leave a job row"
    _note(f"job: {case}", f"{_answer(problem)}; no job row")


def test_nul_in_idempotency_key_and_artifact_name_is_422(
    api: Api, factory: sessionmaker[Session], settings: Settings
) -> None:
    client, auth = api
    before = _count(factory, Job)
    keyed = client.post("/v1/jobs", json=_job(), headers={**auth, "Idempotency-Key": "retry-\x00-1"})
    _note("job: NUL in the Idempotency-Key header (was a 500)", _answer(assert_problem(keyed, 422, "Idempotency-Key")))
    assert _count(factory, Job) == before

    owner, owner_id = new_key(factory, "owner")
    job_id = insert_job(factory, status=JobStatus.succeeded, owner_id=owner_id)
    named = client.get(f"/v1/jobs/{job_id}/artifacts/report%00.json", headers=bearer(owner))
    _note("artifact name with %00 (was a 500)", _answer(assert_problem(named, 422, "name")))


# -- full disks: the API ---------------------------------------------------------------------------------------


def test_upload_onto_a_full_disk_is_503_disk_full(
    api: Api, settings: Settings, factory: sessionmaker[Session], tmp_path: Path
) -> None:
    with mounted_tmpfs(tmp_path / "full", 512) as disk:
        full = settings.model_copy(update={"storage_url": (disk / "artifacts").as_uri()})
        key, _ = new_key(factory, "full-disk")
        before = _count(factory, Dataset)
        with client_for(full, factory, raise_server_exceptions=False) as client:
            fill(disk, leave_bytes=16 * 1024)
            response = client.post(
                "/v1/datasets", files={"file": ("c.txt", b"calibration text " * 4096)}, headers=bearer(key)
            )
        problem = assert_problem(response, 503)
        assert problem["code"] == "disk_full" and str(disk) not in response.text
        assert used_files(disk) == [] and _count(factory, Dataset) == before
    _note("upload onto a full artifact disk (was storage_unavailable)", f"{_answer(problem)}; nothing stored")


def test_readyz_names_a_full_embedded_disk(tmp_path: Path) -> None:
    with mounted_tmpfs(tmp_path / "embedded", 8 * 1024) as disk:
        embedded = Settings(data_dir=disk, min_free_disk_mb=4)
        upgrade_head(embedded.sqlalchemy_url)
        with client_for(embedded, session_factory(embedded.sqlalchemy_url)) as client:
            assert client.get("/readyz").status_code == 200
            fill(disk, leave_bytes=512 * 1024)
            response = client.get("/readyz")  # nearly full: named before a write fails
            fill(disk)
            write = client.post("/v1/jobs", json={**_job(), "evaluation": {"prompts": ["p" * 2000] * 16}})
        problem = assert_problem(response, 503, "disk")
        assert problem["checks"]["database"] == {"ok": True}, "SQLite answers SELECT 1 on a full disk"
        assert (write.status_code, write.json().get("code")) == (503, "disk_full"), write.text[:300]
    _note(
        "/readyz with the embedded data disk full (was 200)",
        f"503 not_ready, errors: disk ({problem['checks']['disk']['error'][:60]}…); a submission: 503 disk_full",
    )


# -- full disks: jobs --------------------------------------------------------------------------------------------


def _run_on_full_disk(settings: Settings, disk: Path, model_root: Path, leave_bytes: int) -> tuple[str, str]:
    """Run a job with ``leave_bytes`` free on ``disk``; it must fail and leave nothing. Returns (code, message)."""
    request = job_request(str(model_root / "tiny-llama"), "builtin", num_layers=1, num_samples=4, seq_len=32)
    job_id = create_job(settings, request, max_attempts=1)
    fill(disk, leave_bytes=leave_bytes)
    assert runner.run_job(job_id, settings) == "failed"
    with session_scope(session_factory(settings.sqlalchemy_url)) as session:
        job = session.get(Job, job_id)
        assert job is not None and job.status == JobStatus.failed
        code, message = job.error_code or "", job.error_message or ""
        artifacts = session.scalar(select(func.count()).select_from(Artifact).where(Artifact.job_id == job_id))
    assert artifacts == 0
    assert not (settings.work_dir / str(job_id)).exists(), "the work folder must be removed"
    assert artifact_store(settings).list(f"jobs/{job_id}") == []
    assert used_files(disk) == [], "nothing of the job may stay on the full disk"
    return code, message


@pytest.mark.parametrize(
    ("where", "leave_kib", "writing", "was"),
    [
        ("work", 96, "saving the pruned model", "internal_error"),
        ("artifacts", 192, "storing the job's files", "storage_unavailable"),
    ],
)
def test_job_that_fills_the_disk_fails_with_disk_full(
    where: str, leave_kib: int, writing: str, was: str, settings: Settings, model_root: Path, tmp_path: Path
) -> None:
    """The tiny model's outputs are ~350 KB (its weights ~210 KB): the disk fills while the weights are
    saved (work folder on the full disk) or while the outputs are stored (artifact store on it)."""
    with mounted_tmpfs(tmp_path / "full", 8 * 1024) as disk:
        update = {"data_dir": disk} if where == "work" else {"storage_url": (disk / "artifacts").as_uri()}
        on_disk = settings.model_copy(update=update)
        started = time.monotonic()
        code, message = _run_on_full_disk(on_disk, disk, model_root, leave_kib * 1024)
    assert code == "disk_full", (code, message)
    assert f"disk filled up while {writing}" in message and "free" in message, message
    assert str(disk) not in message and "/tmp" not in message, f"the message exposes the worker's folders: {message}"
    _note(
        f"job: disk fills while {writing} (was {was})",
        f"failed disk_full in {time.monotonic() - started:.1f}s: {message[:110]}…; nothing left on the disk",
    )


def test_embedded_job_that_fills_its_disk_records_disk_full(model_root: Path, tmp_path: Path) -> None:
    """The embedded mode: the SQLite database shares the disk the job fills. The runner frees the job's
    work folder before it writes the failure, so the failure can be written at all."""
    with mounted_tmpfs(tmp_path / "embedded-full", 8 * 1024) as disk:
        embedded = Settings(data_dir=disk, model_roots=[model_root], heartbeat_interval_s=0.5)
        upgrade_head(embedded.sqlalchemy_url)
        request = job_request(str(model_root / "tiny-llama"), "builtin", num_layers=1, num_samples=4, seq_len=32)
        job_id = create_job(embedded, request, max_attempts=1)
        fill(disk, leave_bytes=700 * 1024)
        started = time.monotonic()
        assert runner.run_job(job_id, embedded) == "failed"
        with session_scope(session_factory(embedded.sqlalchemy_url)) as session:
            job = session.get(Job, job_id)
            assert job is not None
            code, message = job.error_code or "", job.error_message or ""
        left = [f for f in used_files(disk) if not f.startswith("lorp.db")]
    assert (code, left) == ("disk_full", []), (code, message, left)
    _note(
        "embedded job: its disk (the database's too) fills (was stuck running: the failure could not be written)",
        f"failed disk_full in {time.monotonic() - started:.1f}s: {message[:90]}…; work folder freed first",
    )


def test_full_disk_errors_of_torch_safetensors_and_sqlite_are_disk_full(settings: Settings, tmp_path: Path) -> None:
    """The errors a full disk really raises, wrapped as each library wraps them, classified by the worker."""
    with mounted_tmpfs(tmp_path / "full", 2048) as disk:
        on_disk = settings.model_copy(update={"data_dir": disk})
        on_disk.work_dir.mkdir()
        engine = sqlalchemy.create_engine(f"sqlite:///{disk / 'full.db'}")
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text("CREATE TABLE t (x BLOB)"))
        weights = {"w": torch.zeros(1 << 20)}  # 4 MiB: more than the disk holds
        errors: dict[str, BaseException] = {}
        for name, write in (
            ("torch.save", lambda: torch.save(weights, on_disk.work_dir / "w.pt")),
            ("safetensors", lambda: save_file(weights, str(on_disk.work_dir / "w.safetensors"))),
            ("a plain write", lambda: (on_disk.work_dir / "report.json").write_bytes(bytes(4 << 20))),
        ):
            with pytest.raises(Exception) as raised:
                write()
            errors[name] = raised.value
        fill(disk)
        with pytest.raises(sqlalchemy.exc.OperationalError) as raised_db, engine.begin() as conn:
            conn.execute(sqlalchemy.text("INSERT INTO t VALUES (:x)"), {"x": b"x" * 65536})
        engine.dispose()
        errors["SQLite"] = raised_db.value
        codes = {name: failures.classify_failure(exc, on_disk) for name, exc in errors.items()}
    for name, (code, message) in codes.items():
        assert code == "disk_full", (name, code, message)
    assert "saving the pruned model" in codes["safetensors"][1]
    assert "recording the job in the database" in codes["SQLite"][1]
    # What was being written comes from the stage where the error does not say (the runner passes it).
    assert "while writing the job's working files" in codes["a plain write"][1]
    staged = failures.classify_failure(errors["a plain write"], settings, stage="reporting")
    assert staged[0] == "disk_full" and "while writing the report and the heatmap" in staged[1]
    assert not failures.is_database_outage(errors["SQLite"]), "a full disk is not an outage to wait out"
    # torch names no errno: only a full work disk makes its failed write a full disk.
    assert failures.classify_failure(errors["torch.save"], settings)[0] == "internal_error"
    for name, exc in errors.items():
        _note(f"worker: {name} on a full disk ({type(exc).__name__})", f"disk_full: {codes[name][1][:80]}…")
